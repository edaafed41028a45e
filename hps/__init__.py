"""The ground of the HPS platform: settings, logging and the store of images and model
versions (a folder or an S3 bucket). It imports nothing else of the project; `cli/` (the
`hps` command) sits on top of everything."""
