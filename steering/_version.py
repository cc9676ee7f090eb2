"""The package version, in one place: ``steering.__version__`` and pyproject.toml read it."""

__version__ = "0.1.0"
