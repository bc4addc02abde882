"""theta — the Theta Network Protocol over QUIC, for trio.

The sans-IO protocol core lives in :mod:`theta.core`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
