"""`python -m hps` runs the CLI."""

from hps.cli import main

main()
