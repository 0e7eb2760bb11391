"""atomkit's version (its own module, so that any part of the package can read it without importing the rest)."""
__version__ = "0.1.0"
