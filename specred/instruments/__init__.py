"""Instrument knowledge: ESO header -> frame type, set-up key, detector geometry.

This package is the only place in specred that reads instrument-specific (ESO)
keywords.  Use::

    from specred.instruments import classify_header, get_instrument, identify

    info = classify_header(header, path)         # FrameInfo
    geom = identify(header).geometry(header)     # DetectorGeometry

Supported: ESO NTT EFOSC2 (:class:`~specred.instruments.efosc2.EFOSC2`) and SofI
(:class:`~specred.instruments.sofi.SOFI`).
"""
from __future__ import annotations

from astropy.io import fits

from ..errors import BadFrameError, NotNTTError, SpecredError
from .base import FRAME_TYPES, ON_SKY_TYPES, DetectorGeometry, FrameInfo, Instrument, hstr, night_label
from .efosc2 import EFOSC2
from .sofi import SOFI

__all__ = ["INSTRUMENTS", "FRAME_TYPES", "ON_SKY_TYPES", "DetectorGeometry", "FrameInfo", "Instrument",
           "EFOSC2", "SOFI", "identify", "get_instrument", "classify_header", "night_label"]

INSTRUMENTS: dict[str, Instrument] = {"EFOSC2": EFOSC2(), "SOFI": SOFI()}
"""Registry of the supported instruments by canonical name."""

_ALIASES = {"EFOSC": "EFOSC2", "EFOSC2": "EFOSC2", "SOFI": "SOFI"}


def get_instrument(name: str) -> Instrument:
    """The instrument called ``name`` (case-insensitive; ``'efosc'`` works too).

    Raises
    ------
    SpecredError
        Unknown name.
    """
    key = _ALIASES.get(str(name).strip().upper())
    if key is None:
        raise SpecredError(f"unknown instrument {name!r} (known: {', '.join(INSTRUMENTS)})")
    return INSTRUMENTS[key]


def identify(header: fits.Header, path: str = "") -> Instrument:
    """The instrument that wrote ``header``.

    Raises
    ------
    NotNTTError
        Not an NTT frame (other telescope, no TELESCOP/INSTRUME) or an NTT instrument
        specred does not support; the message quotes TELESCOP and INSTRUME.
    BadFrameError
        An NTT frame (TELESCOP says so) without INSTRUME.
    """
    tel = hstr(header, "TELESCOP")
    ins = hstr(header, "INSTRUME")
    quoted = f"TELESCOP={tel!r}, INSTRUME={ins!r}" if (tel or ins) else "no TELESCOP or INSTRUME keyword"
    if tel is not None and "NTT" not in tel.upper():
        raise NotNTTError(path, f"not an NTT frame: {quoted}")
    if ins is None:
        if tel is None:
            raise NotNTTError(path, f"not an NTT frame: {quoted}")
        raise BadFrameError(path, "missing essential keyword INSTRUME")
    for inst in INSTRUMENTS.values():
        if inst.matches(header):
            return inst
    if tel is None:
        raise NotNTTError(path, f"not an NTT frame: {quoted}")
    raise NotNTTError(path, f"NTT instrument {ins!r} is not supported (supported: {', '.join(INSTRUMENTS)})")


def classify_header(header: fits.Header, path: str = "") -> FrameInfo:
    """:func:`identify` the instrument and :meth:`~Instrument.classify` the frame."""
    return identify(header, path).classify(header, path)
