"""The package version, in a module of its own so that any layer can read it without importing the package's
front door (`stardomain/__init__.py`, which sits on top of everything)."""

__version__ = "0.1.0"
