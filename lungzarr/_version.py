"""The package version (a leaf module, so every layer can import it)."""
__version__ = "0.1.0"
