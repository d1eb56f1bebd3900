"""stardomain: star domains, alignment and barriers in weight space."""

__version__ = "0.1.0"
