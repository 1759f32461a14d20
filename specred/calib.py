"""Static reference data (``calib/*.ecsv``) and their loaders.

Everything the reduction and the simulator need at run time that is not in the raw
frames: arc-lamp and night-sky line lists, the La Silla extinction curve, the
spectrophotometric and telluric standard stars (positions and flux tables), telluric
absorption bands and a model transmission spectrum, nominal sensitivity functions, an A0V
(Vega) model and a rest-frame emission/absorption line catalogue.

Every file is an astropy ECSV table with units on its columns and the metadata keys
``description``, ``source`` (literature citation), ``derived`` (how this file was made
from the source) and ``medium`` (``'air'`` or ``'vacuum'``) where a wavelength column
exists.  The header of each file is the reference for its content; this module only
reads them.

Conventions
-----------
* Wavelengths are in Å.  Functions taking wavelengths accept plain numbers/arrays (Å)
  or :class:`astropy.units.Quantity` (any spectral unit).
* Air/vacuum conversions use the IAU standard formula as given by Morton (2000, ApJS 130,
  403, eq. 8), which is based on the refractive index of standard air of Ciddor (1996,
  Appl. Opt. 35, 1566); by convention no conversion is applied below 2000 Å.
* Loaders are cached (:func:`functools.lru_cache`) and return *copies*, so callers may
  modify what they get.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import astropy.units as u
import numpy as np
from astropy.table import Table

from ._resources import calib_path
from .errors import SpecredError

__all__ = [
    "StandardStar", "air_to_vacuum", "vacuum_to_air", "arc_lines", "extinction_table",
    "extinction", "standards", "standard_flux", "find_standard", "telluric_standards",
    "sky_lines", "sky_continuum", "telluric_bands", "telluric_transmission",
    "nominal_sensitivity", "a0v_model", "emission_lines", "AIRMASS_EXPONENT",
    "calib_files",
]

#: Exponents a of the airmass scaling used by :func:`telluric_transmission`:
#: T(X) = T_o2(1)^(X^a_o2) · T_h2o(1)^(w · X^a_h2o).  The tabulated transmission is an
#: average over 2 Å (optical) or 5 Å (near-IR) of many unresolved, partly saturated
#: lines, whose mean absorption grows more slowly than Beer–Lambert (curve of growth;
#: Wade & Horne 1988, ApJ 324, 411).  Raising the 0.04 Å ATLAS spectra to the power X
#: sample by sample and averaging over the same 2 Å bins, the binned transmission is best
#: reproduced with a = 0.6 for the O2 A and B bands and a = 0.75 for the H2O bands
#: (rms 0.2–1.3 % for X = 1.5–2; see ``telluric_transmission.ecsv`` meta).  At the
#: resolution of EFOSC2 (R ≈ 355) the O2 bands prefer 0.55
#: (:data:`specred.reduce.telluric.AIRMASS_EXPONENT`); the difference is < 2 % in T.
AIRMASS_EXPONENT: dict[str, float] = {"O2": 0.6, "H2O": 0.75}

_SPEED_OF_LIGHT_AA = 2.99792458e18        # Å s^-1


# ============================================================================ helpers
def _as_angstrom(wave) -> np.ndarray:
    """Float ndarray of wavelengths in Å (Quantity converted, numbers taken as Å)."""
    if isinstance(wave, u.Quantity):
        return np.asarray(wave.to_value(u.AA, equivalencies=u.spectral()), dtype=float)
    return np.asarray(wave, dtype=float)


def _like_input(wave, result_aa: np.ndarray):
    """Return ``result_aa`` (Å) in the unit of ``wave`` if that was a Quantity."""
    if isinstance(wave, u.Quantity):
        return (result_aa * u.AA).to(wave.unit, equivalencies=u.spectral())
    if np.ndim(result_aa) == 0:
        return float(result_aa)
    return result_aa


def _norm(name: str) -> str:
    """Normalised star name for matching: lower case, alphanumerics only, common file
    suffixes removed ('GD 71', 'gd71.dat', 'GD71_xs' -> 'gd71')."""
    s = str(name).strip().lower()
    s = re.sub(r"\.(dat|ascii|fits|ecsv|txt)$", "", s)
    s = re.sub(r"_xs$", "", s)
    return re.sub(r"[^a-z0-9]", "", s)


@lru_cache(maxsize=None)
def _read(filename: str) -> Table:
    """Read one ``calib/`` file once (cached; callers must copy before modifying)."""
    path = calib_path(filename)
    try:
        t = Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # noqa: BLE001 - re-raised as a user-facing error
        raise SpecredError(f"calibration file calib/{filename} is unreadable ({exc}); "
                           "reinstall specred") from exc
    # ECSV stores empty strings as masked values: give them back as ''
    for name in t.colnames:
        col = t[name]
        if getattr(col, "mask", None) is not None and col.dtype.kind in "US":
            t[name] = col.filled("")
    return t


def _copy(filename: str) -> Table:
    return _read(filename).copy(copy_data=True)


def calib_files() -> list[str]:
    """Names of the ECSV files in ``calib/`` (sorted)."""
    folder = calib_path("standards.ecsv").parent
    return sorted(p.name for p in folder.glob("*.ecsv"))


# ============================================================================ air / vacuum
def _n_air_from_vacuum(wave_vac: np.ndarray) -> np.ndarray:
    """Refractive index of standard air at vacuum wavelength (Å): Morton (2000) eq. 8."""
    s2 = (1.0e4 / wave_vac) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def vacuum_to_air(wave_vac):
    """Convert vacuum wavelengths to air (standard air, 15 °C, 101 325 Pa).

    Parameters
    ----------
    wave_vac : float, array_like or Quantity
        Vacuum wavelengths (Å if not a Quantity).

    Returns
    -------
    float, ndarray or Quantity
        Air wavelengths, same shape (and unit, for a Quantity).  λ_air = λ_vac / n with
        n from Morton (2000, ApJS 130, 403, eq. 8; IAU standard, Ciddor 1996 refractivity).
        Wavelengths below 2000 Å are returned unchanged (the usual convention).
    """
    w = _as_angstrom(wave_vac)
    out = np.where(w >= 2000.0, w / _n_air_from_vacuum(np.where(w >= 2000.0, w, 5000.0)), w)
    return _like_input(wave_vac, out)


def air_to_vacuum(wave_air):
    """Convert air wavelengths (standard air) to vacuum; inverse of :func:`vacuum_to_air`.

    Parameters
    ----------
    wave_air : float, array_like or Quantity
        Air wavelengths (Å if not a Quantity).

    Returns
    -------
    float, ndarray or Quantity
        Vacuum wavelengths.  Starts from the inverse formula of N. Piskunov (VALD, as
        quoted with Morton 2000) and refines it with two fixed-point iterations of
        :func:`vacuum_to_air`, so a round trip is exact to < 1e-8 Å.  Identity below
        2000 Å.
    """
    w = _as_angstrom(wave_air)
    ok = w >= 2000.0
    wa = np.where(ok, w, 5000.0)
    s2 = (1.0e4 / wa) ** 2
    n = (1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2)
         + 1.599740894897e-4 / (38.92568793293 - s2))
    v = wa * n
    for _ in range(2):
        v = v + (wa - v / _n_air_from_vacuum(v)) * _n_air_from_vacuum(v)
    return _like_input(wave_air, np.where(ok, v, w))


def _to_medium(wave_aa: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return wave_aa
    return vacuum_to_air(wave_aa) if dst == "air" else air_to_vacuum(wave_aa)


def _check_medium(medium: str) -> str:
    m = str(medium).strip().lower()
    if m in ("air", "awav"):
        return "air"
    if m in ("vacuum", "vac", "wave"):
        return "vacuum"
    raise SpecredError(f"medium must be 'air' or 'vacuum', not {medium!r}")


# ============================================================================ arc lines
_LAMPS = {"hear": "arc_lines_HeAr.ecsv", "xe": "arc_lines_Xe.ecsv", "xenon": "arc_lines_Xe.ecsv",
          "xear": "arc_lines_Xe.ecsv"}


def arc_lines(lamp: str) -> Table:
    """Arc-lamp line list.

    Parameters
    ----------
    lamp : str
        ``'HeAr'`` (EFOSC2 He + Ar lamps, air wavelengths, 3600–9300 Å) or ``'Xe'``
        (SofI xenon lamp, vacuum wavelengths, 9300–25000 Å).  Case, spaces, '-' and '_'
        are ignored; ``'He-Ar'``, ``'Xenon'`` are accepted.

    Returns
    -------
    astropy.table.Table
        Columns ``wavelength`` (Å), ``species``, ``intensity`` (relative line flux as
        recorded by the instrument, strongest line = 1e4), ``preferred`` (bool: good
        isolated line for identification), ``measured`` (intensity measured on a real arc),
        ``blended`` (unresolved neighbour at the instrument's resolution), ``note``;
        ``meta['medium']`` gives the medium.
    """
    key = re.sub(r"[\s_\-]", "", str(lamp).lower())
    if key not in _LAMPS:
        raise SpecredError(f"unknown arc lamp {lamp!r}; known lamps: 'HeAr' (EFOSC2), 'Xe' (SofI)")
    return _copy(_LAMPS[key])


# ============================================================================ extinction
def extinction_table() -> Table:
    """The La Silla extinction curve: ``wavelength`` (Å, air), ``extinction`` (mag/airmass).

    3050–11000 Å are the nodes of the ``lasilla2`` curve used by the PESSTO pipeline;
    11000–25000 Å an extension of the continuum (Rayleigh + aerosol) extinction — see the
    file's metadata: molecular bands are *not* included (they are in
    :func:`telluric_transmission`).
    """
    return _copy("extinction_lasilla.ecsv")


@lru_cache(maxsize=None)
def _extinction_arrays() -> tuple[np.ndarray, np.ndarray]:
    t = _read("extinction_lasilla.ecsv")
    return (np.asarray(t["wavelength"], dtype=float), np.asarray(t["extinction"], dtype=float))


def extinction(wavelength) -> np.ndarray:
    """Extinction k(λ) in mag per airmass at La Silla (linear interpolation).

    Parameters
    ----------
    wavelength : float, array_like or Quantity
        Air wavelengths (Å if not a Quantity).  Vacuum wavelengths may be passed too: the
        curve is smooth, the 0.03 % difference is irrelevant.

    Returns
    -------
    numpy.ndarray
        k(λ) (mag/airmass), same shape as the input.  Outside the tabulated range
        (3050–25000 Å) the nearest end value is returned (constant extrapolation).
    """
    w, k = _extinction_arrays()
    return np.interp(_as_angstrom(wavelength), w, k, left=k[0], right=k[-1])


# ============================================================================ standard stars
@dataclass(frozen=True)
class StandardStar:
    """A standard star recognised in the observations.

    ``kind`` is ``'flux'`` (spectrophotometric standard of ``standards.ecsv``) or
    ``'telluric'`` (A0V star of ``telluric_standards.ecsv``); ``flux_file`` is the name of
    its flux table in ``calib/`` (empty when there is none).
    """

    name: str
    ra: float
    dec: float
    vmag: float
    sptype: str
    kind: str
    flux_file: str


def standards() -> Table:
    """Index of spectrophotometric standards.

    Columns ``name`` (canonical, e.g. 'LTT 7987'), ``aliases`` (comma-separated spellings
    found in headers and file names), ``ra``, ``dec`` (deg, J2000), ``vmag``, ``sptype``,
    ``flux_file`` (file in ``calib/`` or '' for position-only entries), ``flux_wmin``,
    ``flux_wmax`` (Å, range of the flux table: the Hamuy et al. stars stop near 10000 Å and
    cannot calibrate SofI), ``note``.
    """
    return _copy("standards.ecsv")


def telluric_standards() -> Table:
    """A0V (Vega-type) telluric standards for SofI: ``name``, ``ra``, ``dec`` (deg, J2000),
    ``vmag``, ``sptype`` (Hipparcos A0V-type stars of the PESSTO SofI list)."""
    return _copy("telluric_standards.ecsv")


@lru_cache(maxsize=None)
def _name_index() -> dict[str, int]:
    """Normalised name/alias -> row of standards.ecsv."""
    t = _read("standards.ecsv")
    idx: dict[str, int] = {}
    for i, row in enumerate(t):
        for n in [row["name"], *str(row["aliases"]).split(",")]:
            k = _norm(n)
            if k:
                idx.setdefault(k, i)
    return idx


@lru_cache(maxsize=None)
def _telluric_name_index() -> dict[str, int]:
    t = _read("telluric_standards.ecsv")
    return {_norm(n): i for i, n in enumerate(t["name"])}


def _known_flux_names() -> list[str]:
    t = _read("standards.ecsv")
    return [str(n) for n, f in zip(t["name"], t["flux_file"]) if str(f).strip()]


def standard_flux(name: str) -> Table:
    """Flux table of a spectrophotometric standard.

    Parameters
    ----------
    name : str
        Canonical name or any alias (case, spaces and punctuation ignored: 'LTT7987',
        'ltt 7987', 'L7987', 'ltt7987.dat' all work).

    Returns
    -------
    astropy.table.Table
        ``wavelength`` (Å, air — ``meta['medium']``), ``flux`` (f_λ, erg s⁻¹ cm⁻² Å⁻¹),
        sorted, without repeated wavelengths.

    Raises
    ------
    SpecredError
        If the star is unknown or has no flux table; the message lists the stars that do.
    """
    i = _name_index().get(_norm(name))
    known = ", ".join(_known_flux_names())
    if i is None:
        raise SpecredError(f"unknown spectrophotometric standard {name!r}; "
                           f"stars with flux tables: {known}")
    row = _read("standards.ecsv")[i]
    ff = str(row["flux_file"]).strip()
    if not ff:
        raise SpecredError(f"standard star {row['name']} ({name!r}) has no flux table in calib/; "
                           f"stars with flux tables: {known}")
    return _copy(ff)


@lru_cache(maxsize=None)
def _coords(kind: str):
    from astropy.coordinates import SkyCoord

    t = _read("standards.ecsv" if kind == "flux" else "telluric_standards.ecsv")
    return SkyCoord(np.asarray(t["ra"], float) * u.deg, np.asarray(t["dec"], float) * u.deg)


def _star(kind: str, i: int) -> StandardStar:
    t = _read("standards.ecsv" if kind == "flux" else "telluric_standards.ecsv")
    r = t[i]
    vmag = float(r["vmag"]) if np.isfinite(float(np.ma.filled(r["vmag"], np.nan))) else float("nan")
    return StandardStar(name=str(r["name"]), ra=float(r["ra"]), dec=float(r["dec"]), vmag=vmag,
                        sptype=str(r["sptype"]), kind=kind,
                        flux_file=str(r["flux_file"]).strip() if kind == "flux" else "")


def find_standard(ra_deg: float | None, dec_deg: float | None, name: str | None = None,
                  radius_arcsec: float = 60.0) -> StandardStar | None:
    """Recognise a standard star by position, else by name.

    Parameters
    ----------
    ra_deg, dec_deg : float or None
        Pointing (deg, J2000), e.g. the RA/DEC header keywords.  None/NaN skip the
        position match.
    name : str, optional
        Target name (e.g. OBJECT); used only when no star lies within the radius.
    radius_arcsec : float
        Match radius.  60″ covers the proper motions of the standards since J2000 and the
        offsets between catalogue versions.

    Returns
    -------
    StandardStar or None
        The nearest spectrophotometric standard within the radius, else the nearest A0V
        telluric standard within the radius (``kind='telluric'``), else a name/alias
        match (spectrophotometric first), else None.
    """
    if ra_deg is not None and dec_deg is not None and np.isfinite(ra_deg) and np.isfinite(dec_deg):
        from astropy.coordinates import SkyCoord

        target = SkyCoord(float(ra_deg) * u.deg, float(dec_deg) * u.deg)
        for kind in ("flux", "telluric"):
            sep = target.separation(_coords(kind)).arcsec
            i = int(np.argmin(sep))
            if sep[i] <= radius_arcsec:
                return _star(kind, i)
    if name:
        k = _norm(name)
        if k in _name_index():
            return _star("flux", _name_index()[k])
        if k in _telluric_name_index():
            return _star("telluric", _telluric_name_index()[k])
    return None


# ============================================================================ sky
_SKY = {"optical": "sky_lines_optical.ecsv", "opt": "sky_lines_optical.ecsv",
        "nir": "sky_lines_nir.ecsv", "ir": "sky_lines_nir.ecsv", "nearir": "sky_lines_nir.ecsv"}


def sky_lines(region: str) -> Table:
    """Night-sky emission lines at zenith (dark time).

    Parameters
    ----------
    region : {'optical', 'nir'}
        'optical': 3600–9300 Å, air wavelengths; 'nir': 9300–16600 Å, vacuum.

    Returns
    -------
    astropy.table.Table
        ``wavelength`` (Å), ``species``, ``flux`` (line surface brightness, erg s⁻¹ cm⁻²
        arcsec⁻²); ``meta['medium']``.
    """
    key = re.sub(r"[\s_\-]", "", str(region).lower())
    if key not in _SKY:
        raise SpecredError(f"unknown sky-line region {region!r}; use 'optical' or 'nir'")
    return _copy(_SKY[key])


@lru_cache(maxsize=None)
def _continuum_nodes() -> tuple[np.ndarray, np.ndarray]:
    nodes = []
    for f in ("sky_lines_optical.ecsv", "sky_lines_nir.ecsv"):
        c = _read(f).meta["continuum_ab_mag_arcsec2"]
        nodes += list(zip(c["wavelength"], c["ab_mag"]))
    nodes = sorted(set((float(w), float(m)) for w, m in nodes))
    w = np.array([n[0] for n in nodes])
    m = np.array([n[1] for n in nodes])
    return w, m


def sky_continuum(wavelength) -> np.ndarray:
    """Dark-sky continuum surface brightness between the emission lines, at zenith.

    Parameters
    ----------
    wavelength : float, array_like or Quantity
        Wavelengths (Å; air — vacuum differs by 0.03 %, irrelevant for this smooth curve).

    Returns
    -------
    numpy.ndarray
        f_λ per arcsec² (erg s⁻¹ cm⁻² Å⁻¹ arcsec⁻²).  The AB magnitudes per arcsec² tabulated
        in the metadata of ``sky_lines_optical.ecsv`` (3000–10000 Å) and
        ``sky_lines_nir.ecsv`` (10000–25000 Å) are interpolated linearly in wavelength and
        converted with f_λ = 10^(−0.4 (m_AB + 48.60)) c / λ²; constant magnitude beyond
        the ends.
    """
    w = _as_angstrom(wavelength)
    nw, nm = _continuum_nodes()
    m = np.interp(w, nw, nm, left=nm[0], right=nm[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 ** (-0.4 * (m + 48.60)) * _SPEED_OF_LIGHT_AA / w**2


# ============================================================================ telluric
def telluric_bands() -> Table:
    """Telluric absorption bands: ``name``, ``molecule``, ``wave_min``, ``wave_max`` (Å, in
    ``meta['medium']`` = air), ``wave_min_vac``, ``wave_max_vac`` (vacuum), ``strong``."""
    return _copy("telluric_bands.ecsv")


@lru_cache(maxsize=None)
def _telluric_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = _read("telluric_transmission.ecsv")
    return (np.asarray(t["wavelength"], dtype=float), np.asarray(t["t_o2"], dtype=float),
            np.asarray(t["t_h2o"], dtype=float))


def telluric_transmission(wavelength, airmass: float = 1.0, h2o_scale: float = 1.0,
                          medium: str = "air") -> np.ndarray:
    """Model telluric transmission (molecular bands only; no continuum extinction).

    Parameters
    ----------
    wavelength : float, array_like or Quantity
        Wavelengths (Å if not a Quantity) in ``medium``.
    airmass : float
        Airmass X ≥ 0.
    h2o_scale : float
        Water-vapour column relative to the tabulated one (≈ 3 mm precipitable water at
        zenith in the near-IR model; the optical ATLAS H2O spectrum has its own column).
    medium : {'air', 'vacuum'}
        Medium of ``wavelength`` (the table is stored in vacuum and converted).

    Returns
    -------
    numpy.ndarray
        T = T_O2^(X^a_O2) · T_H2O^(h2o_scale · X^a_H2O), with a from
        :data:`AIRMASS_EXPONENT`, linearly interpolated; 1 outside 3500–25000 Å.  ``t_o2``
        also carries the other uniformly mixed absorbers (CO2, CH4) of the near-IR.
    """
    if airmass < 0 or h2o_scale < 0:
        raise SpecredError(f"airmass and h2o_scale must be >= 0 (got {airmass}, {h2o_scale})")
    w = _to_medium(_as_angstrom(wavelength), _check_medium(medium), "vacuum")
    tw, to2, th2o = _telluric_arrays()
    o2 = np.interp(w, tw, to2, left=1.0, right=1.0)
    h2o = np.interp(w, tw, th2o, left=1.0, right=1.0)
    p_o2 = float(airmass) ** AIRMASS_EXPONENT["O2"]
    p_h2o = float(h2o_scale) * float(airmass) ** AIRMASS_EXPONENT["H2O"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(o2, 0.0, 1.0) ** p_o2 * np.clip(h2o, 0.0, 1.0) ** p_h2o


# ============================================================================ sensitivity
_SENS = {"efosc2gr13": "sensitivity_efosc2_gr13.ecsv", "sofigb": "sensitivity_sofi_gb.ecsv"}


def nominal_sensitivity(setup: str) -> Table:
    """Nominal sensitivity function S(λ) = 2.5 log10[(ADU s⁻¹ Å⁻¹)/(erg s⁻¹ cm⁻² Å⁻¹)].

    Parameters
    ----------
    setup : {'EFOSC2_GR13', 'SOFI_GB'}
        Case, '-', '_', '#' and spaces ignored.

    Returns
    -------
    astropy.table.Table
        ``wavelength`` (Å; air for EFOSC2, vacuum for SofI — ``meta['medium']``),
        ``sensitivity`` (mag), above the atmosphere (IRAF ``sensfunc`` convention).
    """
    key = re.sub(r"[\s_\-#]", "", str(setup).lower())
    if key not in _SENS:
        raise SpecredError(f"no nominal sensitivity for setup {setup!r}; known: 'EFOSC2_GR13', 'SOFI_GB'")
    return _copy(_SENS[key])


# ============================================================================ models, lines
def a0v_model() -> Table:
    """Vega (A0V) model spectrum, 3030–25000 Å, **vacuum** wavelengths, f_λ of Vega
    (V = 0.03) in erg s⁻¹ cm⁻² Å⁻¹, 5 Å sampling (hydrogen line profiles preserved)."""
    return _copy("a0v_model.ecsv")


def emission_lines() -> Table:
    """Rest-frame line catalogue: ``name``, ``label``, ``wave_vac``, ``wave_air`` (Å; air =
    vacuum below 2000 Å by convention), ``kind`` ('emission'/'absorption'/'both'),
    ``broad`` (permitted lines broad in QSOs), ``group``, ``citation``."""
    return _copy("emission_lines.ecsv")
