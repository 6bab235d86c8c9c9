"""The `zaya-hf` command line (`zaya_hf.cli.main`)."""

from .main import main

__all__ = ["main"]
