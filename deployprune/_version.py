"""The package version, in a leaf module: anything may import it without importing the package
``__init__`` (which imports the API and would close an import loop)."""

from __future__ import annotations

__version__ = "0.1.0"
