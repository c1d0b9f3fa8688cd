"""The package version, importable without importing anything else of dmlkd."""

__version__ = "0.1.0"
