"""The `shardnode` command line (see main.py). `python -m shardnode.cli` runs it."""

from .main import main

__all__ = ["main"]
