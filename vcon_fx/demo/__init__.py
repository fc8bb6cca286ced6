"""The embedded demo: the whole pipeline on real handwritten digits, abrupt against VCON."""

__all__: list[str] = []
