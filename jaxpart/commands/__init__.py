"""One module per `jaxpart` subcommand (see jaxpart/cli.py)."""
