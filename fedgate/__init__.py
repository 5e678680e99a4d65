"""fedgate: a message proxy for cross-party federated learning.

A drop-in replacement for FATE's Rollsite / OSX proxy. See ``ARCHITECTURE`` in the docs and
the package READMEs under ``fedgate/`` for the layout.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
