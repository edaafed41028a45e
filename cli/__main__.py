"""`python -m cli` runs the CLI."""

from cli import main

main()
