"""The installed package's version, read from its metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

UNKNOWN = "0+unknown"  # a checkout used without `pip install -e .`


def package_version() -> str:
    try:
        return version("vistok")
    except PackageNotFoundError:
        return UNKNOWN
