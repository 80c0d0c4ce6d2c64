"""hwnas-edge: torch-free query runtime and gallery search service for hwnas bundles."""

__version__ = "0.3.3"
