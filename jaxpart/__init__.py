"""jaxpart: place a dense transformer on N accelerators, prove it right, predict its cost."""

__version__ = "0.1.0"
