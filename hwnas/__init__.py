"""hwnas: compatibility-aware, hardware-aware NAS for heterogeneous visual search."""

__version__ = "0.1.0"

from hwnas.errors import HwnasError  # noqa: F401  (light: no heavy imports here)
