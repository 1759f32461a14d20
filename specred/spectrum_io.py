"""Reading and writing 1D spectra.

specred writes 1D products as FITS files that ``specutils.Spectrum.read(path)`` opens
without a format argument (the specutils ``tabular-fits`` layout: an empty primary HDU with
the provenance header and a ``DATA`` binary table with ``wavelength``, ``flux``,
``uncertainty`` (1-sigma) and ``mask`` columns).  The wavelength medium is explicit: the
wavelength column carries the FITS WCS type ``TCTYP1 = 'AWAV'`` (air) or ``'WAVE'``
(vacuum) and the primary header ``WAVEMED = 'AIR'``/``'VACUUM'``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.nddata import StdDevUncertainty

from .errors import SpectrumError
from .io import atomic_write_fits

FLAM = u.Unit("erg s-1 cm-2 AA-1")
MEDIA = {"air": ("AWAV", "AIR"), "vacuum": ("WAVE", "VACUUM")}


def spectrum_hdulist(wave, flux, sigma, mask=None, *, medium: str, flux_unit=FLAM,
                     header: fits.Header | dict | None = None) -> fits.HDUList:
    """Build the HDUList of a 1D product (see module docstring)."""
    if medium not in MEDIA:
        raise ValueError(f"medium must be 'air' or 'vacuum', not {medium!r}")
    wave = np.asarray(u.Quantity(wave, u.AA).value, dtype=float)
    flux = np.asarray(flux, dtype=float)
    sigma = np.asarray(sigma, dtype=float)
    mask = np.zeros(wave.shape, bool) if mask is None else np.asarray(mask, bool)
    unit = u.Unit(flux_unit).to_string("fits")
    cols = [
        fits.Column("wavelength", "D", unit="Angstrom", array=wave),
        fits.Column("flux", "D", unit=unit, array=flux),
        fits.Column("uncertainty", "D", unit=unit, array=sigma),
        fits.Column("mask", "L", array=mask),
    ]
    tab = fits.BinTableHDU.from_columns(cols, name="DATA")
    ctype, med = MEDIA[medium]
    tab.header["TCTYP1"] = (ctype, "wavelength in " + medium)
    prim = fits.PrimaryHDU()
    if header is not None:
        items = header.items() if isinstance(header, dict) else \
            [(c.keyword, (c.value, c.comment)) for c in header.cards]
        for k, v in items:
            if k in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "COMMENT", "HISTORY", ""):
                continue
            if (len(k) > 8 or " " in k) and not k.upper().startswith("HIERARCH "):
                k = "HIERARCH " + k
            prim.header[k] = v
    prim.header["WAVEMED"] = (med, "medium of the wavelength column")
    prim.header["BUNIT"] = (unit, "flux unit")
    return fits.HDUList([prim, tab])


def write_spectrum(path, wave, flux, sigma, mask=None, *, medium: str, flux_unit=FLAM,
                   header=None) -> Path:
    """Write a 1D spectrum atomically (see :func:`spectrum_hdulist`)."""
    return atomic_write_fits(spectrum_hdulist(wave, flux, sigma, mask, medium=medium,
                                              flux_unit=flux_unit, header=header), path)


def spectrum_medium(path) -> str:
    """'air' or 'vacuum' from a specred product header (raises if not stated)."""
    with fits.open(path) as hdul:
        med = hdul[0].header.get("WAVEMED")
        if med is None and len(hdul) > 1:
            ct = hdul[1].header.get("TCTYP1")
            med = {"AWAV": "AIR", "WAVE": "VACUUM"}.get(str(ct).strip().upper())
    if med is None:
        raise SpectrumError(f"{path}: wavelength medium not stated (WAVEMED / TCTYP1)")
    return "air" if str(med).strip().upper() == "AIR" else "vacuum"


def validate_spectrum(wave, flux, sigma=None, *, name: str = "spectrum"):
    """Check a spectrum is usable; raise SpectrumError with a precise reason otherwise."""
    wave = np.asarray(wave, dtype=float)
    flux = np.asarray(flux, dtype=float)
    if wave.size == 0 or flux.size == 0:
        raise SpectrumError(f"{name}: empty spectrum")
    if wave.shape != flux.shape:
        raise SpectrumError(f"{name}: wavelength ({wave.size}) and flux ({flux.size}) differ in length")
    if not np.any(np.isfinite(flux)):
        raise SpectrumError(f"{name}: flux is all NaN/inf")
    d = np.diff(wave)
    if not (np.all(d > 0) or np.all(d < 0)):
        raise SpectrumError(f"{name}: wavelengths are not strictly monotonic")
    if sigma is not None:
        s = np.asarray(sigma, dtype=float)
        good = np.isfinite(s)
        if np.any(s[good] <= 0):
            raise SpectrumError(f"{name}: uncertainties must be positive ({int(np.sum(s[good] <= 0))} are <= 0)")
    return wave, flux


def read_spectrum(path):
    """Read a 1D spectrum product into ``specutils.Spectrum`` and its medium.

    Returns (spectrum, medium).
    """
    from specutils import Spectrum

    path = Path(path)
    try:
        spec = Spectrum.read(path)
    except Exception as exc:  # specutils raises many kinds; turn them into one message
        raise SpectrumError(f"{path}: cannot read as a 1D spectrum ({exc})") from exc
    return spec, spectrum_medium(path)


def sigma_to_uncertainty(sigma, unit=FLAM):
    return StdDevUncertainty(np.asarray(sigma, dtype=float) * u.Unit(unit))
