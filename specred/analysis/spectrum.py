"""One 1D spectrum ready for analysis, from any of the formats specred meets.

:func:`load_spectrum` turns a file (specred product, SDSS ``spec-*`` file, IRAF 1D image
with a linear WCS, ECSV / FITS table) or an in-memory ``specutils.Spectrum`` into an
:class:`AnalysisSpectrum`: **vacuum** wavelengths in Å (air input is converted with
:func:`specred.calib.air_to_vacuum`), flux density in erg s⁻¹ cm⁻² Å⁻¹, 1σ errors, a mask
of usable pixels and, where known, the instrumental resolution.  Everything downstream
(line fits, redshifts, classification) works on this one representation, so the medium
and the units are settled once.

Bad input raises :class:`specred.errors.SpectrumError` with the reason: empty spectrum,
all-NaN flux, zero or negative errors, non-monotonic wavelengths, unknown or missing
units, unknown medium.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import Table

from .. import calib
from ..errors import SpectrumError
from ..spectrum_io import validate_spectrum

C_KMS = 299792.458
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
FLAM = u.Unit("erg s-1 cm-2 AA-1")

#: Instrumental line-spread FWHM in *pixels* assumed when a file states neither ``LSFPIX``
#: nor ``LSFFWHM``, by INSTRUME (slit-limited resolution is constant in pixels, so the FWHM
#: in Å follows the local dispersion).  Measured on the real reference arcs in
#: ../shared/ntt-reference: EFOSC2 Gr#13, 1.0" slit, 2x2 binning: median arc-line FWHM
#: 3.48 px (19.7 Å at 5.65 Å/px); SofI blue grism (arc_GD71_1_GB): 6.0 px (41.5 Å).
DEFAULT_LSF_PIX = {"EFOSC": 3.48, "SOFI": 6.0}


@dataclass(frozen=True)
class AnalysisSpectrum:
    """A 1D spectrum in the form the analysis uses.

    ``wave`` is the observed **vacuum** wavelength (Å, increasing); ``flux`` and ``sigma``
    are in erg s⁻¹ cm⁻² Å⁻¹ (``flux_scale`` records any factor the input carried, e.g.
    1e-17 for SDSS); ``good`` marks usable pixels (finite flux, finite positive error, not
    masked).  ``lsf_sigma_kms`` is the instrumental Gaussian σ in km/s per pixel (NaN when
    unknown).  ``medium_in`` is the medium of the input wavelengths ('air' or 'vacuum').
    """

    wave: np.ndarray
    flux: np.ndarray
    sigma: np.ndarray
    good: np.ndarray
    medium_in: str
    lsf_sigma_kms: np.ndarray
    name: str = ""
    flags: tuple = ()
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def flux_unit(self):
        return FLAM

    def lsf_sigma_at(self, wave_obs) -> np.ndarray:
        """Instrumental σ (km/s) at observed vacuum wavelengths (NaN if unknown)."""
        return np.interp(wave_obs, self.wave, self.lsf_sigma_kms)

    def to_input_medium(self, wave_vac):
        """Vacuum wavelengths converted back to the medium of the input spectrum."""
        return calib.vacuum_to_air(wave_vac) if self.medium_in == "air" else np.asarray(wave_vac, float)

    def spectrum1d(self):
        """The spectrum as ``specutils.Spectrum`` (vacuum Å, erg/s/cm²/Å, StdDev errors)."""
        from astropy.nddata import StdDevUncertainty
        from specutils import Spectrum
        s = np.where(self.good, self.sigma, np.nan)
        return Spectrum(flux=self.flux * FLAM, spectral_axis=self.wave * u.AA,
                        uncertainty=StdDevUncertainty(s * FLAM), mask=~self.good)


# ============================================================================ construction
def pixel_widths(wave) -> np.ndarray:
    """Width (Å) of every pixel of a wavelength grid: between the midpoints to its
    neighbours, the end pixels mirrored."""
    w = np.asarray(wave, float)
    edges = np.empty(w.size + 1)
    edges[1:-1] = 0.5 * (w[1:] + w[:-1])
    edges[0] = w[0] - (edges[1] - w[0])
    edges[-1] = w[-1] + (w[-1] - edges[-2])
    return np.diff(edges)


def _flux_factor(unit) -> float:
    """Factor converting ``unit`` to erg/s/cm²/Å (raises SpectrumError if impossible)."""
    if unit is None or (isinstance(unit, str) and not unit.strip()):
        raise SpectrumError("flux has no unit; give one (e.g. erg/s/cm2/AA) or pass flux_unit=")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)
            un = u.Unit(unit) if not isinstance(unit, u.UnitBase) else unit
    except (ValueError, TypeError) as exc:
        text = str(unit).replace("Ang", "AA").replace("^", "")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", u.UnitsWarning)
                un = u.Unit(text)
        except (ValueError, TypeError):
            raise SpectrumError(f"unknown flux unit {unit!r}") from exc
    try:
        return float((1.0 * un).to(FLAM).value)
    except u.UnitConversionError as exc:
        raise SpectrumError(f"flux unit {un} is not a flux density per unit wavelength "
                            f"(convertible to erg/s/cm2/AA)") from exc


def _wave_factor(unit) -> float:
    if unit is None or (isinstance(unit, str) and not unit.strip()):
        raise SpectrumError("wavelength has no unit; give one (Angstrom, nm, um)")
    try:
        un = u.Unit(unit) if not isinstance(unit, u.UnitBase) else unit
        return float((1.0 * un).to(u.AA).value)
    except (ValueError, TypeError, u.UnitConversionError) as exc:
        raise SpectrumError(f"unknown wavelength unit {unit!r} (need a length: Angstrom, nm, um)") from exc


def make_spectrum(wave, flux, sigma=None, *, medium: str, wave_unit="Angstrom",
                  flux_unit=FLAM, mask=None, lsf_fwhm_aa=None, lsf_sigma_kms=None,
                  name: str = "", meta: dict | None = None) -> AnalysisSpectrum:
    """Validate arrays and build an :class:`AnalysisSpectrum`.

    ``medium`` ('air' or 'vacuum') must be stated.  ``sigma=None`` estimates the errors from
    the pixel-to-pixel scatter (flag ``ERRORS_ESTIMATED``).  ``mask``: True = bad.
    ``lsf_fwhm_aa`` (scalar or per pixel) or ``lsf_sigma_kms`` give the resolution.
    """
    if medium not in ("air", "vacuum"):
        raise SpectrumError(f"{name or 'spectrum'}: wavelength medium must be 'air' or 'vacuum', not {medium!r}")
    label = name or "spectrum"
    wave = np.asarray(wave, dtype=float).ravel() * _wave_factor(wave_unit)
    flux = np.asarray(flux, dtype=float).ravel()
    if wave.size and not np.all(np.isfinite(wave)):
        raise SpectrumError(f"{label}: wavelengths contain NaN/inf")
    validate_spectrum(wave, flux, name=label)        # empty, lengths, all-NaN flux, monotonic
    if wave.size < 10:
        raise SpectrumError(f"{label}: only {wave.size} pixels")
    d = np.diff(wave)
    ffac = _flux_factor(flux_unit)
    flags = []
    if sigma is None:
        sigma = _estimate_sigma(flux)
        flags.append("ERRORS_ESTIMATED")
    sigma = np.asarray(sigma, dtype=float).ravel()
    if sigma.shape != flux.shape:
        raise SpectrumError(f"{label}: uncertainty ({sigma.size}) and flux ({flux.size}) differ in length")
    fin = np.isfinite(sigma)
    bad_mask = np.zeros(flux.shape, bool) if mask is None else np.asarray(mask, bool).ravel()
    if bad_mask.shape != flux.shape:
        raise SpectrumError(f"{label}: mask ({bad_mask.size}) and flux ({flux.size}) differ in length")
    used = fin & ~bad_mask & np.isfinite(flux)
    if np.any(sigma[used] < 0):
        raise SpectrumError(f"{label}: {int(np.sum(sigma[used] < 0))} uncertainties are negative")
    if np.any(sigma[used] == 0):
        raise SpectrumError(f"{label}: {int(np.sum(sigma[used] == 0))} unmasked pixels have zero uncertainty "
                            f"(infinite weight); mask them or give real errors")
    if not np.any(used):
        raise SpectrumError(f"{label}: no pixel has both a finite flux and a finite uncertainty")
    good = np.isfinite(flux) & fin & (sigma > 0) & ~bad_mask
    if good.sum() < 10:
        raise SpectrumError(f"{label}: fewer than 10 usable pixels (finite flux, positive error, unmasked)")
    if d[0] < 0:
        sl = slice(None, None, -1)
        wave, flux, sigma, good = wave[sl], flux[sl], sigma[sl], good[sl]
        if lsf_fwhm_aa is not None and np.ndim(lsf_fwhm_aa):
            lsf_fwhm_aa = np.asarray(lsf_fwhm_aa)[sl]
        if lsf_sigma_kms is not None and np.ndim(lsf_sigma_kms):
            lsf_sigma_kms = np.asarray(lsf_sigma_kms)[sl]
    wave_vac = calib.air_to_vacuum(wave) if medium == "air" else wave
    if lsf_sigma_kms is not None:
        lsf = np.broadcast_to(np.asarray(lsf_sigma_kms, float), wave.shape).copy()
    elif lsf_fwhm_aa is not None and np.all(np.isfinite(lsf_fwhm_aa)):
        lsf = np.broadcast_to(np.asarray(lsf_fwhm_aa, float), wave.shape) / 2.3548 / wave * C_KMS
    else:
        lsf = np.full(wave.shape, np.nan)
        flags.append("LSF_UNKNOWN")
    flux = np.where(good, flux * ffac, 0.0)
    sigma = np.where(good, sigma * ffac, np.inf)
    return AnalysisSpectrum(wave_vac, flux, sigma, good, medium, lsf, name, tuple(flags), dict(meta or {}))


def _estimate_sigma(flux):
    """Per-pixel noise from the scatter of second differences (robust, local in 51 px)."""
    from scipy.ndimage import median_filter
    f = np.asarray(flux, float)
    d2 = np.zeros_like(f)
    d2[1:-1] = f[1:-1] - 0.5 * (f[:-2] + f[2:])
    d2[~np.isfinite(d2)] = 0.0
    mad = median_filter(np.abs(d2), size=51, mode="nearest")
    return 1.4826 * mad / np.sqrt(1.5)


# ============================================================================ readers
def load_spectrum(source, *, medium: str | None = None, flux_unit=None, lsf_fwhm_aa=None,
                  name: str | None = None) -> AnalysisSpectrum:
    """An :class:`AnalysisSpectrum` from a path or a ``specutils.Spectrum``.

    Recognised files: specred 1D products (``WAVEMED``), SDSS/BOSS ``spec-*`` files
    (``COADD`` table, vacuum ``loglam``, ``ivar``, ``wdisp``), IRAF 1D images with a linear
    WCS (errors estimated from the scatter) and ECSV / FITS tables with ``wavelength``,
    ``flux`` and ``uncertainty``/``error``/``ivar`` columns carrying units.  ``medium``
    overrides (or supplies) the wavelength medium; ``flux_unit`` supplies a missing unit.
    """
    try:
        from specutils import Spectrum
    except ImportError:  # pragma: no cover - specutils is a dependency
        Spectrum = ()
    if isinstance(source, Spectrum):
        return _from_specutils(source, medium=medium, name=name or "spectrum", lsf_fwhm_aa=lsf_fwhm_aa)
    path = Path(source)
    label = name or path.name
    if not path.exists():
        raise SpectrumError(f"{path}: no such file")
    if path.suffix.lower() in (".ecsv", ".csv", ".txt", ".dat"):
        try:
            tab = Table.read(path, format="ascii.ecsv" if path.suffix.lower() == ".ecsv" else None)
        except Exception as exc:
            raise SpectrumError(f"{path}: cannot read as a table ({exc})") from exc
        return _from_table(tab, medium=medium, flux_unit=flux_unit, lsf_fwhm_aa=lsf_fwhm_aa, name=label)
    tab = _fast_table(path)
    if tab is not None:
        return _from_table(tab, medium=medium, flux_unit=flux_unit, lsf_fwhm_aa=lsf_fwhm_aa, name=label)
    try:
        hdul = fits.open(path, memmap=False)
    except Exception as exc:
        raise SpectrumError(f"{path}: cannot read as FITS ({exc})") from exc
    with hdul:
        try:
            return _from_hdul(hdul, path, medium, flux_unit, lsf_fwhm_aa, label)
        except fits.VerifyError:
            # a non-standard card (common in old archives): fix it silently and read again
            # (verifying every file up front costs a quarter of the reading time)
            try:
                hdul.verify("silentfix")
            except Exception as exc:
                raise SpectrumError(f"{path}: cannot read as FITS ({exc})") from exc
            return _from_hdul(hdul, path, medium, flux_unit, lsf_fwhm_aa, label)


def _fast_table(path):
    """The spectrum table of the common layout (a primary header and one binary table of
    scalar columns: specred products, ``simulate --spectra``) read with fitsio (CFITSIO), ~10x
    faster than astropy.io.fits, which parses every card and column definition in Python;
    the same Table (units from TUNITn, primary cards and TCTYPn in ``meta``) as the astropy
    reader gives.  None for any other layout, or any trouble: the astropy reader then decides
    (and words the errors)."""
    try:
        import fitsio
    except ImportError:  # pragma: no cover - a dependency; the astropy reader still works
        return None
    try:
        with fitsio.FITS(str(path)) as f:
            if len(f) != 2 or f[1].get_exttype() != "BINARY_TBL" or f[1].get_extname().upper() == "COADD":
                return None
            h1 = _header_dict(f[1])
            n = int(h1.get("TFIELDS", 0))
            if n == 0 or any(f"{k}{i}" in h1 for k in ("TDIM", "TSCAL", "TZERO") for i in range(1, n + 1)):
                return None
            data = f[1].read()
            h0 = _header_dict(f[0])
    except Exception:  # noqa: BLE001 - anything unusual goes to the astropy reader
        return None
    if data.dtype.names is None or any(data.dtype[c].shape for c in data.dtype.names):
        return None
    tab = Table(data.astype(data.dtype.newbyteorder("=")), copy=False)
    for i, c in enumerate(data.dtype.names, start=1):
        unit = str(h1.get(f"TUNIT{i}", "") or "").strip()
        if unit:
            tab[c].unit = _unit(unit)
    _header_meta(tab, h0, h1)
    return tab


def _header_meta(tab, primary, table_header):
    """``tab.meta`` from the primary header's cards and the table's TCTYPn (both readers)."""
    tab.meta.update({k: v for k, v in primary.items() if k not in ("COMMENT", "HISTORY", "")})
    tab.meta.update({k: v for k, v in table_header.items() if k.startswith("TCTYP")})


def _header_dict(hdu) -> dict:
    """{keyword: value} of a fitsio HDU's header, as astropy would give it: CFITSIO's values
    for standard cards; HIERARCH cards parsed by astropy (fitsio reads a HIERARCH string
    starting with 'T' as a logical)."""
    out = {}
    for r in hdu.read_header().records():
        name = r.get("name")
        if not name or name in out:
            continue
        card = r.get("card_string", "")
        if card.upper().startswith("HIERARCH"):
            out[name] = fits.Card.fromstring(card).value
        else:
            out[name] = r["value"]
    return out


@lru_cache(maxsize=256)
def _unit(text: str):
    """A unit string parsed once (parsing costs ~1 ms; every spectrum of a batch repeats it)."""
    return u.Unit(text, parse_strict="silent")


def _from_hdul(hdul, path, medium, flux_unit, lsf_fwhm_aa, label) -> AnalysisSpectrum:
    names = [h.name.upper() for h in hdul]
    if "COADD" in names:
        return _from_sdss(hdul, medium=medium, name=label)
    prim = hdul[0].header
    for h in hdul[1:]:
        if isinstance(h, fits.BinTableHDU):
            tab = Table(h.data)
            for c in tab.colnames:
                if h.columns[c].unit:
                    tab[c].unit = u.Unit(h.columns[c].unit, parse_strict="silent")
            _header_meta(tab, prim, h.header)
            return _from_table(tab, medium=medium, flux_unit=flux_unit, lsf_fwhm_aa=lsf_fwhm_aa, name=label)
    if hdul[0].data is not None and hdul[0].data.ndim >= 1:
        return _from_iraf(hdul[0], medium=medium, flux_unit=flux_unit, lsf_fwhm_aa=lsf_fwhm_aa, name=label)
    raise SpectrumError(f"{path}: no 1D spectrum found (no table HDU, no 1D image)")


def _medium_from_meta(meta, medium, name):
    if medium is not None:
        return medium
    med = meta.get("WAVEMED") or meta.get("medium") or meta.get("MEDIUM")
    if med is None:
        ct = meta.get("TCTYP1") or meta.get("CTYPE1")
        med = {"AWAV": "air", "WAVE": "vacuum"}.get(str(ct).strip().upper()[:4])
    if med is None:
        raise SpectrumError(f"{name}: wavelength medium not stated (WAVEMED / TCTYP1 'AWAV' or 'WAVE'); "
                            f"pass medium='air' or 'vacuum'")
    med = str(med).strip().lower()
    return {"air": "air", "vacuum": "vacuum", "vac": "vacuum"}.get(med) or _bad_medium(name, med)


def _bad_medium(name, med):
    raise SpectrumError(f"{name}: unknown wavelength medium {med!r}")


def _in_aa(wave, unit):
    try:
        return np.asarray(wave, float) * _wave_factor(unit)
    except SpectrumError:
        return None


def _lsf_from_header(meta, lsf_fwhm_aa, wave=None):
    """LSF FWHM (Å, scalar or per pixel): argument, ``LSFFWHM`` (Å), ``LSFPIX`` (pixels,
    times the local dispersion) or the instrument default in pixels; None if unknown."""
    if lsf_fwhm_aa is not None:
        return lsf_fwhm_aa
    if "LSFFWHM" in meta:
        return float(meta["LSFFWHM"])
    pix = meta.get("LSFPIX")
    if pix is None:
        inst = str(meta.get("INSTRUME", "")).strip().upper()
        pix = next((v for k, v in DEFAULT_LSF_PIX.items() if inst.startswith(k)), None)
    if pix is None or wave is None:
        return None
    return float(pix) * np.abs(np.gradient(np.asarray(wave, float)))


def _pick(tab, *names):
    low = {c.lower(): c for c in tab.colnames}
    for n in names:
        if n in low:
            return low[n]
    return None


def _from_table(tab: Table, *, medium, flux_unit, lsf_fwhm_aa, name) -> AnalysisSpectrum:
    wc = _pick(tab, "wavelength", "wave", "lambda", "wavelength_air", "wavelength_vac", "loglam")
    fc = _pick(tab, "flux", "f_lambda", "flam")
    if wc is None or fc is None:
        raise SpectrumError(f"{name}: table needs a wavelength and a flux column (has {tab.colnames})")
    meta = dict(tab.meta)
    if wc.lower() == "loglam":
        wave, wunit = 10 ** np.asarray(tab[wc], float), u.AA
        medium = medium or "vacuum"
    else:
        wave, wunit = np.asarray(tab[wc], float), tab[wc].unit
        if medium is None and wc.lower().endswith("_air"):
            medium = "air"
        elif medium is None and wc.lower().endswith("_vac"):
            medium = "vacuum"
    med = _medium_from_meta(meta, medium, name)
    funit = flux_unit if flux_unit is not None else (tab[fc].unit or meta.get("BUNIT"))
    sigma = None
    ec = _pick(tab, "uncertainty", "error", "err", "sigma", "flux_err", "flux_error")
    vc = _pick(tab, "ivar", "inverse_variance")
    mask = None
    if ec is not None:
        sigma = np.asarray(tab[ec], float)
        eu = tab[ec].unit
        if eu is not None and tab[fc].unit is not None and eu != tab[fc].unit:
            sigma = sigma * (1.0 * eu).to(tab[fc].unit).value
    elif vc is not None:
        iv = np.asarray(tab[vc], float)
        with np.errstate(divide="ignore"):
            sigma = np.where(iv > 0, 1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)), np.nan)
    mc = _pick(tab, "mask")
    if mc is not None:
        mask = np.asarray(tab[mc]).astype(bool)
    return make_spectrum(wave, np.asarray(tab[fc], float), sigma, medium=med, wave_unit=wunit or None,
                         flux_unit=funit, mask=mask, lsf_fwhm_aa=_lsf_from_header(meta, lsf_fwhm_aa, _in_aa(wave, wunit)),
                         name=name, meta=meta)


def _from_sdss(hdul, *, medium, name) -> AnalysisSpectrum:
    d = hdul["COADD"].data
    wave = 10 ** np.asarray(d["loglam"], float)
    flux = np.asarray(d["flux"], float)
    iv = np.asarray(d["ivar"], float)
    with np.errstate(divide="ignore"):
        sigma = np.where(iv > 0, 1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)), np.nan)
    unit = hdul[0].header.get("BUNIT", "1E-17 erg/cm^2/s/Ang")
    names = [c.lower() for c in d.columns.names]
    lsf = None
    if "wdisp" in names:
        # wdisp: LSF sigma in pixels of 1e-4 dex (SDSS data model)
        lsf = np.asarray(d["wdisp"], float) * 1e-4 * np.log(10.0) * C_KMS
        lsf = np.where(np.isfinite(lsf) & (lsf > 0), lsf, np.nan)
        if np.any(np.isfinite(lsf)):
            lsf = np.where(np.isfinite(lsf), lsf, np.nanmedian(lsf))
        else:
            lsf = None
    # and_mask bits (NOSKY, BRIGHTSKY, ...) are informational: pixels without data have ivar = 0
    mask = None
    meta = {k: v for k, v in hdul[0].header.items() if k not in ("COMMENT", "HISTORY", "")}
    meta["format"] = "sdss"
    for extname in ("SPECOBJ", "SPALL"):
        if extname in [h.name for h in hdul]:
            row = hdul[extname].data[0]
            for k in ("Z", "Z_ERR", "CLASS", "SUBCLASS"):
                if k in row.array.names:
                    meta[f"SDSS_{k}"] = row[k]
    return make_spectrum(wave, flux, sigma, medium=medium or "vacuum", flux_unit=unit, mask=mask,
                         lsf_sigma_kms=lsf, name=name, meta=meta)


def _from_iraf(hdu, *, medium, flux_unit, lsf_fwhm_aa, name) -> AnalysisSpectrum:
    h = hdu.header
    data = np.asarray(hdu.data, float)
    while data.ndim > 1:
        data = data[0]
    n = data.size
    crval = h.get("CRVAL1")
    cdelt = h.get("CD1_1", h.get("CDELT1"))
    crpix = h.get("CRPIX1", 1.0)
    if crval is None or cdelt is None:
        raise SpectrumError(f"{name}: 1D image without a linear wavelength WCS (CRVAL1, CDELT1/CD1_1)")
    wave = crval + (np.arange(n) + 1 - crpix) * cdelt
    if int(h.get("DC-FLAG", 0)) == 1:
        wave = 10 ** wave
    wunit = h.get("CUNIT1", "Angstrom") or "Angstrom"
    if str(wunit).strip().lower() in ("angstroms", "angstrom", "a"):
        wunit = "Angstrom"
    meta = {k: v for k, v in h.items() if k not in ("COMMENT", "HISTORY", "")}
    med = medium
    if med is None:
        ct = str(h.get("CTYPE1", "")).upper()
        med = "air" if ct.startswith("AWAV") else "vacuum" if ct.startswith("WAVE") else None
        if med is None and ("VACUUM" in str(h.get("VACUUM", "")).upper() or h.get("VACUUM") is True):
            med = "vacuum"
    if med is None:
        raise SpectrumError(f"{name}: wavelength medium not stated (CTYPE1 'AWAV'/'WAVE'); pass medium=")
    funit = flux_unit if flux_unit is not None else h.get("BUNIT")
    return make_spectrum(wave, data, None, medium=med, wave_unit=wunit, flux_unit=funit,
                         lsf_fwhm_aa=_lsf_from_header(meta, lsf_fwhm_aa, _in_aa(wave, wunit)), name=name, meta=meta)


def _from_specutils(spec, *, medium, name, lsf_fwhm_aa) -> AnalysisSpectrum:
    from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty
    meta = dict(getattr(spec, "meta", {}) or {})
    hdr = meta.get("header")
    if hdr is not None:
        meta.update({k: v for k, v in dict(hdr).items() if k not in ("COMMENT", "HISTORY", "")})
    med = _medium_from_meta(meta, medium, name)
    sax = spec.spectral_axis
    try:
        wave = sax.to_value(u.AA, equivalencies=u.spectral())
    except u.UnitConversionError as exc:
        raise SpectrumError(f"{name}: spectral axis unit {sax.unit} is not a wavelength") from exc
    fl = spec.flux
    if fl.unit == u.dimensionless_unscaled:
        raise SpectrumError(f"{name}: flux has no unit")
    try:
        flux = fl.to_value(FLAM, equivalencies=u.spectral_density(sax))
    except u.UnitConversionError as exc:
        raise SpectrumError(f"{name}: flux unit {fl.unit} cannot be converted to erg/s/cm2/AA") from exc
    factor = np.divide(flux, fl.value, out=np.ones_like(flux), where=fl.value != 0)
    sigma = None
    unc = spec.uncertainty
    if unc is not None:
        arr = np.asarray(unc.array, float)
        if isinstance(unc, StdDevUncertainty):
            sigma = arr
        elif isinstance(unc, VarianceUncertainty):
            sigma = np.sqrt(np.where(arr >= 0, arr, np.nan))
        elif isinstance(unc, InverseVariance):
            with np.errstate(divide="ignore"):
                sigma = np.where(arr > 0, 1 / np.sqrt(np.where(arr > 0, arr, 1)), np.nan)
        else:
            raise SpectrumError(f"{name}: unsupported uncertainty type {type(unc).__name__}")
        sigma = sigma * np.abs(factor)
    mask = None if spec.mask is None else np.asarray(spec.mask, bool)
    return make_spectrum(np.ravel(wave), np.ravel(flux), None if sigma is None else np.ravel(sigma),
                         medium=med, flux_unit=FLAM, mask=mask,
                         lsf_fwhm_aa=_lsf_from_header(meta, lsf_fwhm_aa, wave), name=name, meta=meta)
