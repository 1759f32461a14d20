"""Reduction parameters: defaults per instrument mode in ``pipelines/*.yaml``, overridden
by a user YAML.  Unknown or mistyped keys fail with a one-line message naming the key and
the valid choices."""
from __future__ import annotations

import copy
import difflib
from functools import lru_cache
from pathlib import Path

import yaml

from ._resources import pipeline_path
from .errors import ConfigError

RECIPES = {"EFOSC2": "efosc2_gr13.yaml", "SOFI": "sofi_gb.yaml"}


@lru_cache(maxsize=None)
def _defaults(instrument: str) -> dict:
    try:
        name = RECIPES[instrument.upper()]
    except KeyError:
        raise ConfigError(f"no pipeline recipe for instrument {instrument!r}; valid: {', '.join(RECIPES)}") from None
    with open(pipeline_path(name)) as fh:
        return yaml.safe_load(fh)


def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, val in override.items():
        if key not in base:
            close = difflib.get_close_matches(str(key), list(base), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown configuration key '{where}{key}'{hint}; valid keys: {', '.join(base)}")
        if isinstance(base[key], dict):
            if not isinstance(val, dict):
                raise ConfigError(f"configuration key '{where}{key}' must be a mapping with keys {', '.join(base[key])}")
            out[key] = _merge(base[key], val, f"{where}{key}.")
        else:
            ref = base[key]
            if ref is not None and val is not None and not isinstance(val, type(ref)) and not (
                    isinstance(ref, float) and isinstance(val, int) and not isinstance(val, bool)):
                raise ConfigError(f"configuration key '{where}{key}' must be {type(ref).__name__}, got {val!r}")
            out[key] = val
    return out


def load_config(instrument: str, user: str | Path | dict | None = None) -> dict:
    """Parameters for ``instrument`` ('EFOSC2'/'SOFI'); ``user`` is a YAML path or dict whose
    top level may be either the parameters or ``{efosc2: {...}, sofi: {...}}``."""
    base = _defaults(instrument)
    if user is None:
        return copy.deepcopy(base)
    if not isinstance(user, dict):
        p = Path(user)
        if not p.exists():
            raise ConfigError(f"configuration file {p} does not exist")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {p} is not valid YAML: {exc}") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"configuration file {p} must contain a mapping")
    lowered = {str(k).lower(): v for k, v in user.items()}
    if set(lowered) & {"efosc2", "sofi"}:
        unknown = set(lowered) - {"efosc2", "sofi"}
        if unknown:
            raise ConfigError(f"unknown configuration section '{sorted(unknown)[0]}'; valid: efosc2, sofi")
        user = lowered.get(instrument.lower(), {}) or {}
    return _merge(base, user, "")
