"""The package version, in one place: ``pyproject.toml`` reads it from here, model files,
sample manifests and benchmark results record it."""

__version__ = "0.1.0"
