"""The `vcon-fx` command: the only part of vcon-fx that prints."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
