"""The version of vitcompress, in a module of its own: the package root imports the API above it."""

__version__ = "0.1.0"
