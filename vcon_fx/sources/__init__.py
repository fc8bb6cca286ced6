"""Loaders behind `vcon_fx.load`, one file per kind of model source.

`load.load_model` is the public entry point; these modules are its helpers.
"""

__all__: list[str] = []
