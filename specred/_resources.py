"""Locate the static data shipped with specred (``calib/`` and ``pipelines/``).

In an installed package these folders are the sub-packages ``specred.calib_data`` and
``specred.pipelines_data`` (mapped in ``pyproject.toml``); in a bare source checkout they
are the top-level folders of the repository.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import SpecredError

_REPO_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def _data_dir(package: str, folder: str) -> Path:
    try:
        p = Path(str(resources.files(package)))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    p = _REPO_ROOT / folder
    if p.is_dir():
        return p
    raise SpecredError(f"specred data folder '{folder}' not found; reinstall specred")


def calib_path(name: str) -> Path:
    """Path of a file in ``calib/``; raises SpecredError naming the file if absent."""
    p = _data_dir("specred.calib_data", "calib") / name
    if not p.exists():
        raise SpecredError(f"calibration file calib/{name} is missing from the installation")
    return p


def pipeline_path(name: str) -> Path:
    """Path of a YAML recipe in ``pipelines/``."""
    p = _data_dir("specred.pipelines_data", "pipelines") / name
    if not p.exists():
        raise SpecredError(f"pipeline recipe pipelines/{name} is missing from the installation")
    return p


def example_path(name: str) -> Path:
    """Path of a file in ``examples/`` (e.g. the programme's ``targets.ecsv``)."""
    p = _data_dir("specred.examples_data", "examples") / name
    if not p.exists():
        raise SpecredError(f"example file examples/{name} is missing from the installation")
    return p
