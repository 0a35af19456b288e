"""Data files shipped inside installed packages (metric weights), found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str) -> Path | None:
    """``relative`` inside the installed ``package``, or None where either is missing.

    ``find_spec`` locates the package without running its ``__init__``, which for the packages
    that ship our metric weights would import heavy or absent dependencies (cv2, jax).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None
