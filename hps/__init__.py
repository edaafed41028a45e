"""The glue of the HPS platform: settings, logging, the image store and the `hps` CLI."""
