"""The ground of the HPS platform: settings, logging and the image store. It imports
nothing else of the project; `cli/` (the `hps` command) sits on top of everything."""
