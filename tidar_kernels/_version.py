"""The package version, read by pyproject.toml (``attr:``), ``tidar_kernels.__version__`` and ``tidar.__version__``."""

__version__ = "0.1.0"
