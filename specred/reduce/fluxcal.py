"""Spectrophotometric flux calibration of 1D spectra: sensitivity function and its use.

Instrument-agnostic algorithms on plain 1D numpy arrays (no headers, no files).

Conventions
-----------
* Wavelengths in Å (``astropy.units.Quantity`` accepted and converted); the medium
  (``'air'`` or ``'vacuum'``) is an explicit argument wherever it matters.  The La Silla
  extinction curve (:func:`specred.calib.extinction`) is tabulated in **air**; vacuum
  spectra (SofI) are converted with :func:`specred.calib.vacuum_to_air` before it is
  evaluated.
* Counts are per pixel, in ADU or electrons (the caller's choice: the sensitivity absorbs
  the gain, so the same unit must be used for the standard and the science spectrum).
* Flux densities f_λ are in erg s⁻¹ cm⁻² Å⁻¹.
* The sensitivity follows the IRAF ``sensfunc`` convention (Massey et al. 1988, ApJ 328,
  315; IRAF ``onedspec.sensfunc`` help page)::

      S(λ) = 2.5 log10[ (counts s⁻¹ Å⁻¹) / (erg s⁻¹ cm⁻² Å⁻¹) ]

  measured above the atmosphere, so that a spectrum is calibrated with (IRAF
  ``calibrate``)::

      F_λ = counts / (t_exp · |dλ/dpix| · 10^(0.4 S(λ))) · 10^(0.4 k(λ) X)

  with k(λ) the extinction in mag per airmass and X the airmass.  This is exactly what the
  PESSTO pipeline does for EFOSC2 (``../shared/ntt-reference/README.md``, sensitivity/).
* Variances are propagated everywhere; masks are boolean with True = bad.

The sensitivity function is fitted in magnitudes with a weighted least-squares cubic
spline (IRAF ``spline3``; knots every ``smoothing`` Å, placed at quantiles of the usable
points so that masked gaps never hold a knot) or a Legendre series, with iterative
sigma clipping, after masking telluric bands (:func:`specred.calib.telluric_bands`) and,
optionally, the hydrogen lines of hot standards.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import astropy.units as u
from astropy.table import Table
from scipy.interpolate import LSQUnivariateSpline

from .. import calib
from ..errors import CalibrationError, SpectrumError

log = logging.getLogger(__name__)

__all__ = ["Sensitivity", "sensitivity_function", "flux_calibrate", "extinction_correction", "slit_throughput",
           "pixel_width", "bin_flux_table", "hydrogen_lines", "telluric_band_list",
           "line_windows"]

#: Rydberg constant for hydrogen (finite nuclear mass), cm⁻¹; gives vacuum wavenumbers.
RYDBERG_H = 109677.583

_MEDIA = ("air", "vacuum")


# --------------------------------------------------------------------------- helpers
def _check_medium(medium: str, name: str = "medium") -> str:
    m = str(medium).lower()
    if m == "vac":
        m = "vacuum"
    if m not in _MEDIA:
        raise ValueError(f"{name} must be 'air' or 'vacuum', not {medium!r}")
    return m


def _as_angstrom(x) -> np.ndarray:
    """Float array in Å from an array or an ``astropy.units.Quantity`` (any length unit)."""
    if isinstance(x, u.Quantity):
        return np.asarray(x.to_value(u.AA, equivalencies=u.spectral()), dtype=float)
    return np.asarray(x, dtype=float)


def _col_aa(col) -> np.ndarray:
    """Table column of wavelengths in Å (converted if it has a unit)."""
    if getattr(col, "unit", None) is not None:
        return _as_angstrom(u.Quantity(col))
    return np.asarray(col, dtype=float)


def _as_flam(x) -> np.ndarray:
    """Float array in erg s⁻¹ cm⁻² Å⁻¹ from an array or a Quantity."""
    if isinstance(x, u.Quantity):
        return np.asarray(x.to_value(u.erg / u.s / u.cm**2 / u.AA), dtype=float)
    return np.asarray(x, dtype=float)


def _convert_wave(wave: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert wavelengths (Å) between media with :mod:`specred.calib` (Morton 2000)."""
    if src == dst:
        return np.asarray(wave, dtype=float)
    if src == "vacuum":
        return np.asarray(calib.vacuum_to_air(wave), dtype=float)
    return np.asarray(calib.air_to_vacuum(wave), dtype=float)


def _check_spectrum(wave, *arrays, names=("counts", "variance")) -> np.ndarray:
    wave = _as_angstrom(wave)
    if wave.ndim != 1 or wave.size < 8:
        raise SpectrumError(f"need a 1D wavelength array with at least 8 pixels, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise SpectrumError("wavelength array contains NaN/inf")
    d = np.diff(wave)
    if not (np.all(d > 0) or np.all(d < 0)):
        raise SpectrumError("wavelengths must be strictly monotonic (increasing or decreasing)")
    for a, n in zip(arrays, names):
        if a is not None and np.shape(a) != wave.shape:
            raise SpectrumError(f"{n} has shape {np.shape(a)}, wavelength has {wave.shape}")
    return wave


def pixel_width(wave) -> np.ndarray:
    """|dλ/dpix| (Å per pixel) of a monotonic wavelength array (centred differences)."""
    wave = _as_angstrom(wave)
    return np.abs(np.gradient(wave))


def _pixel_edges(wave: np.ndarray) -> np.ndarray:
    """Pixel boundaries (n+1) of a monotonic wavelength array: midpoints, ends mirrored."""
    mid = 0.5 * (wave[1:] + wave[:-1])
    return np.concatenate([[wave[0] - (mid[0] - wave[0])], mid, [wave[-1] + (wave[-1] - mid[-1])]])


def slit_throughput(wave, fwhm_arcsec: float, slit_arcsec: float, ref_wave: float,
                    seeing_exponent: float = -0.2):
    """Fraction of a point source's light passing a slit, for a Gaussian seeing disc.

    T(λ) = erf(w / (2 √2 σ(λ))), σ = FWHM / 2.3548, with the FWHM measured along the slit
    at ``ref_wave`` and scaled as λ^-0.2 (Kolmogorov turbulence; e.g. Roddier 1981, Prog.
    Optics 19, 281).  The star is assumed centred in the slit.  Dividing both the standard
    and the science spectrum by their own T removes differential slit losses between
    them (valid for point sources; an extended source is over-corrected).

    Parameters
    ----------
    wave : array_like
        Wavelengths (Å).
    fwhm_arcsec : float
        Spatial FWHM (arcsec) of the spectrum along the slit, at ``ref_wave``.
    slit_arcsec : float
        Slit width (arcsec).
    ref_wave : float
        Wavelength (Å) at which ``fwhm_arcsec`` was measured.
    """
    from scipy.special import erf

    if not (fwhm_arcsec > 0 and slit_arcsec > 0):
        raise CalibrationError(f"slit throughput needs FWHM > 0 and slit > 0 (got {fwhm_arcsec}, {slit_arcsec})")
    fwhm = fwhm_arcsec * (_as_angstrom(wave) / float(ref_wave)) ** seeing_exponent
    sigma = fwhm / 2.3548
    return erf(slit_arcsec / (2.0 * np.sqrt(2.0) * sigma))


def extinction_correction(wave, airmass: float, medium: str = "air") -> np.ndarray:
    """Multiplicative correction 10^(0.4 k(λ) X) for the atmospheric extinction.

    Parameters
    ----------
    wave : array_like
        Wavelengths (Å) in ``medium``.
    airmass : float
        Airmass X of the observation.
    medium : {'air', 'vacuum'}
        Medium of ``wave``; the La Silla curve (:func:`specred.calib.extinction`) is in air,
        so vacuum wavelengths are converted first.

    Returns
    -------
    numpy.ndarray
        10^(0.4 k X) (≥ 1 for X > 0).
    """
    medium = _check_medium(medium)
    w_air = _convert_wave(_as_angstrom(wave), medium, "air")
    k = np.asarray(calib.extinction(w_air), dtype=float) * np.ones_like(w_air)
    bad = ~np.isfinite(k)
    if bad.all():
        raise CalibrationError("the extinction curve is undefined over the whole spectrum")
    if bad.any():
        # outside the tabulated curve: hold the nearest tabulated value (flat)
        log.warning("extinction undefined at %d pixels (%.0f-%.0f Å air); using the nearest value",
                    int(bad.sum()), float(w_air[bad].min()), float(w_air[bad].max()))
        o = np.argsort(w_air)
        good = ~bad[o]
        k = np.interp(w_air, w_air[o][good], k[o][good])
    return 10.0 ** (0.4 * k * float(airmass))


def _dedup_table(tw: np.ndarray, tf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort a tabulated spectrum and average the fluxes of repeated wavelengths.

    Several standard-star tables repeat wavelength values with different fluxes
    (``ntt-reference/README.md``, standards/): interpolating them as they are would be
    ill-defined.
    """
    ok = np.isfinite(tw) & np.isfinite(tf)
    tw, tf = tw[ok], tf[ok]
    uw, inv = np.unique(tw, return_inverse=True)
    if uw.size == tw.size:
        order = np.argsort(tw)
        return tw[order], tf[order]
    n = np.bincount(inv)
    return uw, np.bincount(inv, weights=tf) / n


def _cumulative_integral(tw: np.ndarray, tf: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact integral of the piecewise-linear interpolant of (tw, tf) from tw[0] to x
    (x clipped to the table range)."""
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (tf[1:] + tf[:-1]) * np.diff(tw))])
    x = np.clip(x, tw[0], tw[-1])
    j = np.clip(np.searchsorted(tw, x, side="right") - 1, 0, tw.size - 2)
    fx = np.interp(x, tw, tf)
    return cum[j] + 0.5 * (tf[j] + fx) * (x - tw[j])


def bin_flux_table(table_wave, table_flux, wave) -> np.ndarray:
    """Mean of a tabulated spectrum over each pixel of ``wave`` (flux-conserving).

    The table is deduplicated (repeated wavelengths averaged), linearly interpolated and
    integrated exactly over each pixel's boundaries (midpoints between pixel centres), so
    that tables finer than the pixels are averaged and coarser ones interpolated.  Pixels
    outside the table get NaN.

    Parameters
    ----------
    table_wave, table_flux : array_like
        Tabulated wavelengths (Å, same medium as ``wave``) and flux densities.
    wave : array_like
        Pixel centres (Å), monotonic.

    Returns
    -------
    numpy.ndarray
        Pixel-averaged flux density, same length as ``wave``.
    """
    tw, tf = _dedup_table(_as_angstrom(table_wave), _as_flam(table_flux))
    if tw.size < 2:
        raise CalibrationError("standard-star flux table has fewer than 2 usable rows")
    wave = _as_angstrom(wave)
    edges = _pixel_edges(wave)
    lo, hi = np.minimum(edges[:-1], edges[1:]), np.maximum(edges[:-1], edges[1:])
    integ = _cumulative_integral(tw, tf, hi) - _cumulative_integral(tw, tf, lo)
    out = integ / (hi - lo)
    out[(lo < tw[0]) | (hi > tw[-1])] = np.nan
    return out


def hydrogen_lines(wmin: float, wmax: float, medium: str = "air",
                   upper: dict[int, int] | None = None) -> np.ndarray:
    """Wavelengths (Å) of hydrogen lines (Balmer, Paschen, Brackett) inside [wmin, wmax].

    Computed from the Rydberg formula 1/λ_vac = R_H (1/n₁² − 1/n₂²) with R_H =
    109677.583 cm⁻¹ (Hα 6564.7, Paβ 12821.6 Å vacuum; within 0.1 Å of the measured
    values, ample for masking), then converted to ``medium``.

    Parameters
    ----------
    wmin, wmax : float
        Wavelength range (Å, in ``medium``).
    medium : {'air', 'vacuum'}
    upper : dict, optional
        Highest upper level n₂ per lower level n₁.  Default ``{2: 10, 3: 8, 4: 20}``:
        Balmer Hα … H10 (3798 Å; the higher members are left to the sigma clipping —
        masking them would blank out the whole blue end below 3860 Å), Paschen Paβ …
        Paε (the higher members are weak and would blank out 8400–9200 Å), Brackett up
        to Br20.
    """
    medium = _check_medium(medium)
    upper = {2: 10, 3: 8, 4: 20} if upper is None else upper
    lines = [1e8 / (RYDBERG_H * (1.0 / n1**2 - 1.0 / n2**2))
             for n1, nmax in upper.items() for n2 in range(n1 + 1, nmax + 1)]
    lv = np.sort(np.asarray(lines, dtype=float))
    if medium == "air":
        lv = _convert_wave(lv, "vacuum", "air")
    return lv[(lv >= wmin) & (lv <= wmax)]


def telluric_band_list(medium: str = "air", strong_only: bool = False) -> list[tuple[float, float, str]]:
    """The telluric absorption bands of :func:`specred.calib.telluric_bands` as a list of
    ``(wmin, wmax, molecule)`` in ``medium`` (Å).

    Parameters
    ----------
    medium : {'air', 'vacuum'}
        Uses the table's ``wave_min``/``wave_max`` (air) or ``wave_min_vac``/``wave_max_vac``.
    strong_only : bool
        Keep only the bands flagged ``strong`` in the table.
    """
    medium = _check_medium(medium)
    t = calib.telluric_bands()
    if strong_only and "strong" in t.colnames:
        t = t[np.asarray(t["strong"], dtype=bool)]
    t_medium = _check_medium(t.meta.get("medium", "air"))
    if medium == "vacuum" and "wave_min_vac" in t.colnames:
        lo, hi = _col_aa(t["wave_min_vac"]), _col_aa(t["wave_max_vac"])
    else:
        lo = _convert_wave(_col_aa(t["wave_min"]), t_medium, medium)
        hi = _convert_wave(_col_aa(t["wave_max"]), t_medium, medium)
    sp = [str(s) for s in t["molecule"]] if "molecule" in t.colnames else ["H2O"] * len(t)
    return [(float(a), float(b), s) for a, b, s in zip(lo, hi, sp)]


def line_windows(wave: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """Boolean array: True where ``wave`` falls in any (wmin, wmax) window."""
    out = np.zeros(wave.shape, dtype=bool)
    for lo, hi in windows:
        out |= (wave >= min(lo, hi)) & (wave <= max(lo, hi))
    return out


# --------------------------------------------------------------------------- fitting
def _fit_curve(x: np.ndarray, y: np.ndarray, w: np.ndarray, function: str,
               order: int | None, smoothing: float):
    """Weighted least-squares spline3 / Legendre fit; returns a callable on [x0, x1]."""
    x0, x1 = float(x[0]), float(x[-1])
    if function == "spline3":
        npieces = order if order else max(1, int(round((x1 - x0) / smoothing)))
        npieces = int(min(npieces, max(1, x.size // 8)))
        q = np.linspace(0.0, 1.0, npieces + 1)[1:-1]
        knots = np.unique(np.quantile(x, q))
        knots = knots[(knots > x0) & (knots < x1)]
        spl = LSQUnivariateSpline(x, y, knots, w=w, k=3, ext=3)
        return spl
    if function == "legendre":
        deg = int(order) if order else 9
        deg = min(deg, x.size - 1)
        return np.polynomial.Legendre.fit(x, y, deg, w=w, domain=[x0, x1])
    raise ValueError(f"function must be 'spline3' or 'legendre', not {function!r}")


def _robust_sigma(r: np.ndarray) -> float:
    med = np.median(r)
    return float(1.4826 * np.median(np.abs(r - med)))


def _clipped_fit(x, y, err, function, order, smoothing, nsigma, maxiters, floor):
    """Iterative sigma-clipped weighted fit.

    ``nsigma`` is a number or a (lower, upper) pair: points with residual below
    −lower·σ or above +upper·σ are rejected, σ² = (MAD scatter of the residuals)² + err².
    Returns (model callable, used mask).
    """
    lower, upper = (nsigma, nsigma) if np.isscalar(nsigma) else nsigma
    used = np.ones(x.size, dtype=bool)
    w_all = 1.0 / np.sqrt(err**2 + floor**2)
    model = None
    for it in range(maxiters + 1):
        if used.sum() < 10:
            raise CalibrationError(f"only {int(used.sum())} points left for the fit after clipping")
        model = _fit_curve(x[used], y[used], w_all[used], function, order, smoothing)
        r = y - model(x)
        sig = np.sqrt(_robust_sigma(r[used]) ** 2 + err**2)
        new = (r >= -lower * sig) & (r <= upper * sig)
        if it == maxiters or np.array_equal(new, used):
            break
        used = new
    return model, used


def _extend_linear(xg: np.ndarray, model, x0: float, x1: float, span: float) -> np.ndarray:
    """Evaluate ``model`` on [x0, x1] and continue it linearly outside (slope = chord of
    the fit over the ``span`` Å nearest each end of the fitted range)."""
    out = np.asarray(model(np.clip(xg, x0, x1)), dtype=float)
    span = min(span, 0.5 * (x1 - x0))
    lo, hi = xg < x0, xg > x1
    if lo.any():
        slope = (float(model(x0 + span)) - float(model(x0))) / span
        out[lo] = float(model(x0)) + slope * (xg[lo] - x0)
    if hi.any():
        slope = (float(model(x1)) - float(model(x1 - span))) / span
        out[hi] = float(model(x1)) + slope * (xg[hi] - x1)
    return out


# --------------------------------------------------------------------------- API
@dataclass(frozen=True, eq=False)
class Sensitivity:
    """A fitted sensitivity function S(λ) (IRAF ``sensfunc`` convention).

    S = 2.5 log10[(counts s⁻¹ Å⁻¹) / (erg s⁻¹ cm⁻² Å⁻¹)] above the atmosphere.

    Attributes
    ----------
    wave : numpy.ndarray
        Wavelengths (Å, increasing, in ``medium``) at which the fitted curve is stored
        (the standard star's pixels).
    sens_mag : numpy.ndarray
        Fitted S at ``wave`` (mag).  Inside ``fit_range`` this is the spline/Legendre fit;
        between ``fit_range`` and the ends of ``wave`` (e.g. a masked telluric band at the
        red end) the fit is continued linearly with its end slope.
    medium : str
        ``'air'`` or ``'vacuum'``.
    standard : str
        Name of the standard star.
    airmass : float
        Airmass of the standard.
    rms_mag : float
        RMS (mag) of measured − fitted S at the points used by the fit.
    points : astropy.table.Table
        ``wave``, ``s_measured``, ``s_error`` (statistical, from the counts variance),
        ``s_fit``, ``used`` (False: masked band/line, bad pixel or sigma-clipped).
    fit_range : tuple of float
        First and last wavelength of the points used by the fit.
    function : str
        ``'spline3'`` or ``'legendre'``.
    """

    wave: np.ndarray
    sens_mag: np.ndarray
    medium: str
    standard: str
    airmass: float
    rms_mag: float
    points: Table
    fit_range: tuple[float, float] = (np.nan, np.nan)
    function: str = "spline3"

    def __call__(self, wave, medium: str | None = None) -> np.ndarray:
        """S(λ) in mag at ``wave`` (Å, in ``medium``; default: the sensitivity's medium).

        Linear interpolation of the stored smooth curve; **flat extrapolation** (the end
        values) beyond the wavelength range of the standard, where the function is not
        constrained — :func:`flux_calibrate` masks those pixels.
        """
        w = _as_angstrom(wave)
        if medium is not None:
            w = _convert_wave(w, _check_medium(medium), self.medium)
        return np.interp(w, self.wave, self.sens_mag)

    @property
    def wave_range(self) -> tuple[float, float]:
        """Wavelength range (Å) over which S is defined (the standard's pixels)."""
        return float(self.wave[0]), float(self.wave[-1])

    def to_table(self) -> Table:
        """The curve as an ECSV-ready table (``wavelength`` Å, ``sensitivity`` mag) with
        the scalar attributes in ``meta``."""
        t = Table([self.wave * u.AA, self.sens_mag * u.mag], names=("wavelength", "sensitivity"))
        t.meta.update(medium=self.medium, standard=self.standard, airmass=float(self.airmass),
                      rms_mag=float(self.rms_mag), fit_range=[float(v) for v in self.fit_range],
                      function=self.function,
                      convention="S = 2.5 log10[(counts/s/A)/(erg/s/cm2/A)] (IRAF sensfunc)")
        return t

    @classmethod
    def from_table(cls, table: Table) -> "Sensitivity":
        """Inverse of :meth:`to_table` (``points`` is left empty)."""
        m = table.meta
        w = _col_aa(table["wavelength"])
        fr = m.get("fit_range", (w[0], w[-1]))
        return cls(w, np.asarray(table["sensitivity"], dtype=float), _check_medium(m.get("medium", "air")),
                   str(m.get("standard", "")), float(m.get("airmass", np.nan)),
                   float(m.get("rms_mag", np.nan)), Table(), (float(fr[0]), float(fr[1])),
                   str(m.get("function", "")))


def sensitivity_function(wave, counts, counts_var, exptime: float, airmass: float,
                         std_wave, std_flux, *, medium: str = "air", std_medium: str = "air",
                         mask=None, standard: str = "",
                         exclude_bands: Sequence[tuple[float, float]] | None = None,
                         band_pad_px: float = 4.0,
                         stellar_lines: str | Sequence[float] | None = "hydrogen",
                         line_halfwidth: float | None = None,
                         bin_width: float | None = None,
                         function: str = "spline3", smoothing: float = 400.0,
                         order: int | None = None, nsigma: float = 3.0, maxiters: int = 10,
                         error_floor: float = 0.01) -> Sensitivity:
    """Fit the sensitivity function S(λ) from an extracted standard-star spectrum.

    Steps (IRAF ``standard`` + ``sensfunc``, Massey et al. 1988):

    1. counts per pixel → counts s⁻¹ Å⁻¹ with the exposure time and the pixel width
       |dλ/dpix|, corrected to outside the atmosphere with 10^(0.4 k(λ) X);
    2. divided by the tabulated flux of the star averaged over each pixel
       (:func:`bin_flux_table`: repeated table wavelengths are averaged first);
    3. S_meas = 2.5 log10(ratio), with statistical error 1.0857 σ_counts / counts;
    4. telluric bands (``exclude_bands``; default :func:`specred.calib.telluric_bands`),
       hydrogen lines of the star (``stellar_lines``), masked and non-finite pixels are
       excluded; optionally the points are averaged in ``bin_width`` Å bins;
    5. a smooth curve is fitted in magnitudes with weights 1/(σ² + ``error_floor``²) and
       iterative ``nsigma`` clipping around a robust (MAD) scatter.

    Parameters
    ----------
    wave : array_like
        Wavelengths (Å, in ``medium``) of the standard's pixels, monotonic (either way).
    counts, counts_var : array_like
        Extracted counts per pixel (ADU or e⁻) and their variance.
    exptime : float
        Exposure time (s).
    airmass : float
        Airmass of the standard.
    std_wave, std_flux : array_like
        Tabulated spectrum of the standard (Å in ``std_medium``; erg s⁻¹ cm⁻² Å⁻¹), e.g.
        :func:`specred.calib.standard_flux`.  May contain repeated wavelengths.
    medium : {'air', 'vacuum'}
        Medium of ``wave`` (EFOSC2 air, SofI vacuum).
    std_medium : {'air', 'vacuum'}
        Medium of the flux table (spectrophotometric tables are given in air).
    mask : array_like of bool, optional
        True = bad pixel.
    standard : str
        Name stored in the result.
    exclude_bands : sequence of (wmin, wmax), optional
        Wavelength windows (Å, in ``medium``) to leave out.  None: the bands flagged
        ``strong`` in :func:`specred.calib.telluric_bands` (deeper than ~10 % at R ~ 400;
        the weak ones are left to the sigma clipping); ``[]``: none.
    band_pad_px : float
        Each excluded band is widened by this many pixels on both sides (the instrumental
        profile spreads the absorption by about one FWHM beyond the tabulated limits).
    stellar_lines : 'hydrogen', sequence of float or None
        Stellar absorption lines to mask: ``'hydrogen'`` = the Balmer, Paschen and
        Brackett lines of :func:`hydrogen_lines` in range — the
        broad lines of hot (DA/sdO/B) standards whose cores the table and the spectrum
        resolve differently; or explicit wavelengths (Å, ``medium``); None: no line mask.
    line_halfwidth : float, optional
        Half-width (Å) of each line window; default max(25 Å, 5 pixel widths).
    bin_width : float, optional
        If given, average the measured S in bins of this width (Å) before fitting (like
        IRAF bandpasses); default: fit every pixel.
    function : {'spline3', 'legendre'}
        Fitted function.
    smoothing : float
        For ``spline3``: knot spacing in Å (features narrower than ~this are not
        followed).  Ignored when ``order`` is given.
    order : int, optional
        Number of spline pieces (IRAF ``spline3`` order) or Legendre degree (default 9).
    nsigma, maxiters : float, int
        Sigma-clipping threshold and maximum iterations.
    error_floor : float
        Systematic error (mag) added in quadrature to the statistical one for the
        weights and the clipping, so that very high S/N pixels do not dominate.

    Returns
    -------
    Sensitivity

    Raises
    ------
    SpectrumError
        Inconsistent input arrays.
    CalibrationError
        Too few usable points (e.g. table and spectrum do not overlap).
    """
    medium = _check_medium(medium)
    std_medium = _check_medium(std_medium, "std_medium")
    wave = _check_spectrum(wave, counts, counts_var)
    counts = np.asarray(counts, dtype=float)
    counts_var = np.asarray(counts_var, dtype=float)
    bad = np.zeros(wave.shape, bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    if exptime <= 0:
        raise CalibrationError(f"exposure time of the standard must be > 0 s, got {exptime}")

    order_idx = np.argsort(wave)
    wave, counts, counts_var, bad = wave[order_idx], counts[order_idx], counts_var[order_idx], bad[order_idx]

    dlam = pixel_width(wave)
    ext = extinction_correction(wave, airmass, medium)
    rate = counts / (exptime * dlam) * ext

    tw = _convert_wave(_as_angstrom(std_wave), std_medium, medium)
    fstd = bin_flux_table(tw, std_flux, wave)

    with np.errstate(divide="ignore", invalid="ignore"):
        s_meas = 2.5 * np.log10(rate / fstd)
        s_err = 2.5 / np.log(10.0) * np.sqrt(np.clip(counts_var, 0, None)) / np.abs(counts)
    good = ~bad & np.isfinite(s_meas) & np.isfinite(s_err) & (counts > 0) & (fstd > 0)

    # --- exclusions
    if exclude_bands is None:
        exclude_bands = [(lo, hi) for lo, hi, _ in telluric_band_list(medium, strong_only=True)]
    pad = band_pad_px * float(np.median(dlam))
    excl = line_windows(wave, [(min(b[0], b[1]) - pad, max(b[0], b[1]) + pad) for b in exclude_bands])
    if stellar_lines is not None:
        hw = line_halfwidth if line_halfwidth is not None else max(25.0, 5.0 * float(np.median(dlam)))
        if isinstance(stellar_lines, str):
            if stellar_lines != "hydrogen":
                raise ValueError(f"stellar_lines must be 'hydrogen', a list of wavelengths or None, "
                                 f"not {stellar_lines!r}")
            lines = hydrogen_lines(wave[0] - hw, wave[-1] + hw, medium)
        else:
            lines = _as_angstrom(stellar_lines)
        excl |= line_windows(wave, [(lam - hw, lam + hw) for lam in lines])
    cand = good & ~excl
    if cand.sum() < 10:
        raise CalibrationError(f"standard {standard or '?'}: only {int(cand.sum())} usable pixels for the "
                               "sensitivity function (does the flux table cover the spectrum?)")

    # --- points (optionally binned)
    if bin_width:
        edges = np.arange(wave[0], wave[-1] + bin_width, bin_width)
        idx = np.digitize(wave, edges) - 1
        px, py, pe, pu = [], [], [], []
        for b in np.unique(idx):
            sel = idx == b
            ok = sel & cand
            if ok.sum() == 0:
                continue
            wts = 1.0 / (s_err[ok] ** 2 + 1e-12)
            px.append(float(np.mean(wave[ok])))
            py.append(float(np.sum(wts * s_meas[ok]) / wts.sum()))
            pe.append(float(1.0 / np.sqrt(wts.sum())))
            pu.append(True)
        px, py, pe = np.asarray(px), np.asarray(py), np.asarray(pe)
        cand_pts = np.asarray(pu, dtype=bool)
    else:
        px, py, pe = wave, s_meas, s_err
        cand_pts = cand

    x, y, e = px[cand_pts], py[cand_pts], pe[cand_pts]
    model, used_sub = _clipped_fit(x, y, e, function, order, smoothing, nsigma, maxiters, error_floor)
    xu = x[used_sub]
    x0, x1 = float(xu[0]), float(xu[-1])

    # the model is valid on [first, last used point]; continue linearly beyond
    sens = _extend_linear(wave, model, x0, x1, span=smoothing)
    resid = y[used_sub] - model(xu)
    rms = float(np.sqrt(np.mean(resid**2)))

    used_all = np.zeros(px.shape, dtype=bool)
    used_all[np.flatnonzero(cand_pts)[used_sub]] = True
    s_fit_pts = _extend_linear(px, model, x0, x1, span=smoothing)
    points = Table([px, py, pe, s_fit_pts, used_all],
                   names=("wave", "s_measured", "s_error", "s_fit", "used"))
    points["wave"].unit = u.AA
    for c in ("s_measured", "s_error", "s_fit"):
        points[c].unit = u.mag
    points.meta.update(medium=medium, standard=standard, airmass=float(airmass))
    log.info("sensitivity function %s: %d of %d points used, rms %.4f mag, fit range %.0f-%.0f Å (%s)",
             standard or "(unnamed)", int(used_all.sum()), px.size, rms, x0, x1, medium)
    return Sensitivity(wave=wave.copy(), sens_mag=sens, medium=medium, standard=str(standard),
                       airmass=float(airmass), rms_mag=rms, points=points, fit_range=(x0, x1),
                       function=function)


def flux_calibrate(wave, counts, counts_var, exptime: float, airmass: float, sens: Sensitivity, *,
                   medium: str = "air", mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert a spectrum in counts per pixel to f_λ (erg s⁻¹ cm⁻² Å⁻¹).

    F_λ = counts / (t_exp · |dλ/dpix| · 10^(0.4 S(λ))) · 10^(0.4 k(λ) X)
    (IRAF ``calibrate``; the PESSTO EFOSC2 recipe).

    The variance is scaled by the square of the same factor.  The uncertainty of the
    sensitivity function itself (``sens.rms_mag``) is a systematic common to all pixels
    and is *not* added to the per-pixel variance; report it separately.

    Parameters
    ----------
    wave : array_like
        Wavelengths (Å, in ``medium``), monotonic.
    counts, counts_var : array_like
        Counts per pixel (same unit as for the standard) and variance.
    exptime, airmass : float
        Exposure time (s) and airmass of this spectrum.
    sens : Sensitivity
        From :func:`sensitivity_function` (converted to ``medium`` if needed).
    medium : {'air', 'vacuum'}
        Medium of ``wave``.
    mask : array_like of bool, optional
        True = bad; carried over.

    Returns
    -------
    flux, flux_var : numpy.ndarray
        f_λ and its variance ((erg s⁻¹ cm⁻² Å⁻¹)²).
    mask : numpy.ndarray of bool
        Input mask | non-finite values | pixels outside the sensitivity's wavelength
        range (where S would be extrapolated).
    """
    medium = _check_medium(medium)
    wave = _check_spectrum(wave, counts, counts_var)
    counts = np.asarray(counts, dtype=float)
    counts_var = np.asarray(counts_var, dtype=float)
    if exptime <= 0:
        raise CalibrationError(f"exposure time must be > 0 s, got {exptime}")
    w_sens = _convert_wave(wave, medium, sens.medium)
    s = sens(w_sens)
    factor = extinction_correction(wave, airmass, medium) / (exptime * pixel_width(wave) * 10.0 ** (0.4 * s))
    flux = counts * factor
    flux_var = counts_var * factor**2
    lo, hi = sens.wave_range
    tol = 0.5 * float(np.median(np.diff(sens.wave)))
    outm = (w_sens < lo - tol) | (w_sens > hi + tol)
    out_mask = np.zeros(wave.shape, bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    out_mask |= ~np.isfinite(flux) | ~np.isfinite(flux_var) | outm
    if outm.any():
        log.debug("flux_calibrate: %d pixels outside the sensitivity range masked", int(outm.sum()))
    return flux, flux_var, out_mask
