"""Telluric absorption: transmission from a standard star, airmass scaling, alignment and
correction of 1D spectra.

Instrument-agnostic algorithms on plain 1D numpy arrays (no headers, no files).

Two regimes
-----------
* **Optical (EFOSC2, air wavelengths)** — the strong bands of
  :func:`specred.calib.telluric_bands` (O2 B 6860–6935, O2 A 7586–7700 Å; H2O 7150–7370,
  8100–8370 and 8920–9880 Å, air) are narrow compared with the spectrum.  The
  standard's continuum is fitted *outside* the bands with a smooth function and
  T = observed / continuum inside the bands, T ≡ 1 outside (the classic "B-star" or
  smooth-standard method; e.g. Wade & Horne 1988, ApJ 324, 411; Bessell 1999, PASP 111,
  1426).
* **Near-IR (SofI, vacuum wavelengths)** — absorption is everywhere, and the telluric
  standard is an A0V star whose hydrogen lines (Paβ 12822, Paγ 10941, Paδ 10052 Å
  vacuum, Brackett lines in range) must be removed first: the observed star is divided
  by an intrinsic A0V spectrum (:func:`a0v_intrinsic`, the Vega/A0V model of
  :func:`specred.calib.a0v_model` convolved to the resolution of the data), then by a
  smooth continuum (the instrument response), giving T over the whole range (Vacca,
  Cushing & Rayner 2003, PASP 115, 389; Maiolino, Rieke & Rieke 1996, AJ 111, 537).

Conventions: wavelengths in Å (``astropy.units.Quantity`` accepted) with the medium
stated; variances propagated (the transmission carries its own variance, from the
standard's noise); masks are boolean, True = bad.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.interpolate import make_interp_spline
from scipy.ndimage import gaussian_filter1d

from .. import calib
from ..errors import CalibrationError, SpectrumError
from .fluxcal import (_as_angstrom, _check_medium, _check_spectrum, _clipped_fit, _col_aa,
                      _convert_wave, _extend_linear, _pixel_edges, hydrogen_lines, line_windows,
                      telluric_band_list)

log = logging.getLogger(__name__)

__all__ = ["Transmission", "transmission_from_standard", "a0v_intrinsic", "scale_to_airmass",
           "cross_correlation_shift", "correct_telluric", "transmission_on_grid",
           "AIRMASS_EXPONENT"]

#: Exponent b of the airmass scaling T_sci = T_std^((X_sci/X_std)^b), per absorber — the
#: same values as :data:`specred.calib.AIRMASS_EXPONENT` (used by the model transmission),
#: so simulated and corrected spectra follow one law.  O2: 0.55 — the saturated A and B
#: bands grow like X^0.55 at low resolution (Wade & Horne 1988, ApJ 324, 411); we
#: reproduced it by raising the 0.04 Å ATLAS O2 spectrum to the power X sample by sample
#: (exact Beer–Lambert) and convolving to R ≈ 355: best b = 0.55–0.60 for the A band, 0.55
#: for the B band, with 0.3–0.6 % RMS errors for X 1.2 → 1.5 (b = 1 leaves 5 %).  H2O:
#: 0.75 — the optical water bands are less saturated (same experiment on ATLAS H2O: best
#: b 0.70–0.80, 0.1–0.2 % RMS).  The water column also varies on its own (precipitable
#: water vapour), which no airmass law captures: take the telluric standard close in
#: time and airmass.
AIRMASS_EXPONENT: dict[str, float] = dict(calib.AIRMASS_EXPONENT)

_BandLike = Sequence[tuple]


@dataclass(frozen=True, eq=False)
class Transmission:
    """Atmospheric transmission T(λ) measured at one airmass.

    Attributes
    ----------
    wave : numpy.ndarray
        Wavelengths (Å, increasing, in ``medium``).
    trans : numpy.ndarray
        Transmission (fraction; 1 = no absorption), clipped to (0.02, 1.05).
    variance : numpy.ndarray
        Variance of ``trans`` (from the standard's noise; 0 where T ≡ 1).
    medium : str
        ``'air'`` or ``'vacuum'``.
    airmass : float
        Airmass at which T was measured.
    bands : list of (wmin, wmax, species)
        Absorption bands (Å, ``medium``); species ``'O2'``/``'H2O'`` selects the airmass
        exponent in :func:`scale_to_airmass`.
    source : str
        ``'standard'`` (measured) or ``'model'``.
    meta : dict
        Provenance: method, continuum, smoothing; after :func:`scale_to_airmass` also the
        original airmass and the exponents used.
    """

    wave: np.ndarray
    trans: np.ndarray
    variance: np.ndarray
    medium: str
    airmass: float
    bands: list
    source: str
    meta: dict = field(default_factory=dict)

    def at(self, wave, medium: str | None = None, shift_px: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """T and its variance on another wavelength grid; see :func:`transmission_on_grid`."""
        return transmission_on_grid(self, wave, medium=medium, shift_px=shift_px)


# --------------------------------------------------------------------------- helpers
def _normalise_bands(bands, medium: str, wmin: float, wmax: float,
                     strong_only: bool = True) -> list[tuple[float, float, str]]:
    """Bands as (lo, hi, molecule) in ``medium`` overlapping [wmin, wmax]; None = calib's
    (only those flagged ``strong`` if ``strong_only``)."""
    if bands is None:
        blist = telluric_band_list(medium, strong_only=strong_only)
    else:
        blist = []
        for b in bands:
            lo, hi = float(min(b[0], b[1])), float(max(b[0], b[1]))
            blist.append((lo, hi, str(b[2]) if len(b) > 2 else "H2O"))
    return [b for b in blist if b[1] > wmin and b[0] < wmax]


def _species_exponent(species: str, b: dict[str, float]) -> float:
    """Exponent for a band's molecule: exact (case-insensitive) key, else the longest key
    contained in the name ('H2O' before 'O2'), else the H2O value."""
    s = str(species).upper().replace("₂", "2")
    keys = {k.upper(): v for k, v in b.items()}
    if s in keys:
        return keys[s]
    for k in sorted(keys, key=len, reverse=True):
        if k in s:
            return keys[k]
    return keys.get("H2O", 0.75)


def _fit_continuum(wave: np.ndarray, y: np.ndarray, var: np.ndarray, usable: np.ndarray, *,
                   method: str, smoothing: float, bands: list, nsigma=(2.5, 3.5)) -> np.ndarray:
    """Smooth continuum of ``y`` (>0) fitted in ln y on the ``usable`` pixels.

    ``'spline'``: one weighted least-squares cubic spline (knots every ``smoothing`` Å at
    quantiles of the usable pixels, so none falls inside a gap), continued linearly (in
    ln y) beyond the first/last usable pixel.  ``'local'``: a quadratic in ln y fitted to
    windows on both sides of each band (width max(100 Å, band width)), used inside that
    band only, with the global spline elsewhere.
    """
    ok = usable & (y > 0) & np.isfinite(y) & np.isfinite(var)
    if ok.sum() < 10:
        raise CalibrationError(f"only {int(ok.sum())} usable continuum pixels outside the telluric bands")
    ly = np.log(np.where(y > 0, y, 1.0))
    err = np.sqrt(np.clip(var, 0, None)) / np.where(y > 0, y, 1.0)
    x = wave[ok]
    model, used = _clipped_fit(x, ly[ok], err[ok], "spline3", None, smoothing, nsigma, 10, 0.002)
    xu = x[used]
    cont = _extend_linear(wave, model, float(xu[0]), float(xu[-1]), span=smoothing)
    if method == "local":
        for lo, hi, _ in bands:
            wid = max(100.0, hi - lo)
            win = ok & (((wave >= lo - wid) & (wave < lo)) | ((wave > hi) & (wave <= hi + wid)))
            inside = (wave >= lo) & (wave <= hi)
            if win.sum() < 6:
                continue
            deg = 2 if ((wave[win] < lo).any() and (wave[win] > hi).any()) else 1
            wts = 1.0 / np.sqrt(err[win] ** 2 + 0.002**2)
            c = np.polynomial.Polynomial.fit(wave[win], ly[win], deg, w=wts)
            cont[inside] = c(wave[inside])
    elif method != "spline":
        raise ValueError(f"continuum must be 'spline' or 'local', not {method!r}")
    return np.exp(cont)


def a0v_intrinsic(wave, resolution_fwhm_aa: float, medium: str, *, model=None,
                  model_fwhm_aa: float | None = None) -> np.ndarray:
    """Intrinsic A0V spectrum on the pixels of ``wave`` at the resolution of the data.

    The Vega/A0V model (:func:`specred.calib.a0v_model`, medium from its
    ``meta['medium']``) is converted to ``medium``, resampled to a fine uniform grid,
    convolved with a Gaussian of FWHM sqrt(``resolution_fwhm_aa``² − ``model_fwhm_aa``²)
    and averaged over each pixel — the same operations a spectrograph applies, so that
    the model's hydrogen lines match those of the observed telluric standard (Vacca,
    Cushing & Rayner 2003, PASP 115, 389, §3; their radial-velocity and line-depth
    adjustments are not applied: at R ≈ 550 a 30 km/s velocity moves Paβ by 0.06 px).

    Parameters
    ----------
    wave : array_like
        Pixel centres (Å, in ``medium``), monotonic.
    resolution_fwhm_aa : float
        Instrumental FWHM (Å) of the data (e.g. λ/R at the centre of the range).
    medium : {'air', 'vacuum'}
    model : astropy.table.Table, optional
        ``wavelength`` (Å) and ``flux`` columns; default :func:`specred.calib.a0v_model`.
    model_fwhm_aa : float, optional
        Resolution (FWHM, Å) already present in the model; default the model's
        ``meta['resolution_fwhm_angstrom']`` (21.1 Å for the calib Vega model), else 0.
        Pass 0 when the model *is* the star's true spectrum (synthetic tests).  If the
        data are sharper than the model, no convolution is done (warning).

    Returns
    -------
    numpy.ndarray
        Model flux (the model's units, f_λ) per pixel; NaN outside the model's range.
    """
    medium = _check_medium(medium)
    wave = _as_angstrom(wave)
    t = calib.a0v_model() if model is None else model
    m_medium = _check_medium(t.meta.get("medium", t.meta.get("wavelength_medium", "vacuum")))
    mw = _col_aa(t["wavelength"])
    mf = np.asarray(t["flux"], dtype=float)
    order = np.argsort(mw)
    mw, mf = _convert_wave(mw[order], m_medium, medium), mf[order]
    edges = _pixel_edges(np.sort(wave))
    if model_fwhm_aa is None:
        model_fwhm_aa = float(t.meta.get("resolution_fwhm_angstrom", 0.0))
    if resolution_fwhm_aa < model_fwhm_aa:
        log.warning("A0V model (FWHM %.1f Å) is coarser than the data (%.1f Å): its hydrogen lines "
                    "will be too broad", model_fwhm_aa, resolution_fwhm_aa)
    fwhm = float(np.sqrt(max(resolution_fwhm_aa**2 - model_fwhm_aa**2, 0.0)))
    step = min(max(fwhm, 1.0) / 10.0, float(np.median(np.abs(np.diff(wave)))) / 5.0)
    pad = 5.0 * fwhm + 2.0 * step
    lo, hi = max(edges[0] - pad, mw[0]), min(edges[-1] + pad, mw[-1])
    if hi <= lo:
        raise CalibrationError("A0V model does not cover the spectrum")
    fine = np.arange(lo, hi + step, step)
    ff = np.interp(fine, mw, mf)
    if fwhm > 0:
        ff = gaussian_filter1d(ff, fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / step, mode="nearest")
    # average over each pixel (exact for the piecewise-linear fine spectrum)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (ff[1:] + ff[:-1]) * step)])
    def integ(xv):
        return np.interp(xv, fine, cum)
    e = _pixel_edges(wave)
    a, b = np.minimum(e[:-1], e[1:]), np.maximum(e[:-1], e[1:])
    out = (integ(b) - integ(a)) / (b - a)
    out[(a < fine[0]) | (b > fine[-1])] = np.nan
    return out


# --------------------------------------------------------------------------- API
def transmission_from_standard(wave, counts, counts_var, *, medium: str, airmass: float,
                               bands: _BandLike | None = None, continuum: str = "spline",
                               intrinsic=None, mask=None, smoothing: float | None = None,
                               stellar_lines: str | Sequence[float] | None = "hydrogen",
                               band_pad_px: float = 4.0,
                               clip: tuple[float, float] = (0.02, 1.05)) -> Transmission:
    """Measure the telluric transmission from the spectrum of a standard star.

    Parameters
    ----------
    wave : array_like
        Wavelengths (Å, in ``medium``), monotonic (either way).
    counts, counts_var : array_like
        Extracted spectrum of the standard (any linear unit) and its variance.
    medium : {'air', 'vacuum'}
        Medium of ``wave``.
    airmass : float
        Airmass of the standard (stored; used by :func:`scale_to_airmass`).
    bands : sequence of (wmin, wmax[, molecule]), optional
        Telluric bands (Å, ``medium``).  Default, from :func:`specred.calib.telluric_bands`:
        optical method — the bands flagged ``strong`` (O2 B, H2O 7200, O2 A, H2O 8200,
        H2O 9300; the weak ones, < 10 % deep at R ~ 400, would mostly add the standard's
        noise); A0V method — all bands (they are only kept out of the continuum fit).
    continuum : {'spline', 'local'}
        How the continuum is interpolated across the bands (see :func:`_fit_continuum`).
    intrinsic : array_like, optional
        Intrinsic spectrum of the star on ``wave`` at the data's resolution (near-IR A0V
        method: :func:`a0v_intrinsic`).  None: optical smooth-standard method.
    mask : array_like of bool, optional
        True = bad pixel (excluded from the continuum; T = 1, variance 0 there in the
        optical method — it is not measured).
    smoothing : float, optional
        Continuum knot spacing in Å; default 300 Å (optical), 400 Å (with ``intrinsic``).
    stellar_lines : 'hydrogen', sequence of float or None
        Lines excluded from the continuum fit (:func:`specred.reduce.fluxcal.hydrogen_lines`);
        only in the optical method (the A0V method divides them out).
    band_pad_px : float
        Each band is widened by this many pixels on both sides: the tabulated limits are
        those of the absorption at high resolution, and the instrumental profile spreads
        it by about one FWHM (≈ 3 px for EFOSC2 Gr#13 with a 1″ slit; cutting the A band
        at 7590 Å leaves 2–18 % absorption outside it).  The padded bands are the ones
        stored in the result.
    clip : (float, float)
        Range T is clipped to.

    Returns
    -------
    Transmission
        Optical: T = observed / continuum inside the bands, exactly 1 outside.  Near-IR:
        T = (observed / intrinsic) / continuum over the whole range.  ``variance`` =
        counts_var / (continuum · intrinsic)² (the continuum's own error is neglected).
    """
    medium = _check_medium(medium)
    wave = _check_spectrum(wave, counts, counts_var)
    y = np.asarray(counts, dtype=float)
    v = np.asarray(counts_var, dtype=float)
    bad = np.zeros(wave.shape, bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    o = np.argsort(wave)
    wave, y, v, bad = wave[o], y[o], v[o], bad[o]
    dl = float(np.median(np.diff(wave)))
    pad = band_pad_px * dl
    listed = _normalise_bands(bands, medium, wave[0], wave[-1], strong_only=intrinsic is None)
    blist = [(lo - pad, hi + pad, sp) for lo, hi, sp in listed]
    in_band = line_windows(wave, [(lo, hi) for lo, hi, _ in blist])

    if intrinsic is None:
        smoothing = 300.0 if smoothing is None else smoothing
        usable = ~bad & ~in_band
        if stellar_lines is not None:
            hw = max(25.0, 5.0 * dl)
            lines = (hydrogen_lines(wave[0] - hw, wave[-1] + hw, medium)
                     if isinstance(stellar_lines, str) else _as_angstrom(stellar_lines))
            usable &= ~line_windows(wave, [(lam - hw, lam + hw) for lam in lines])
        cont = _fit_continuum(wave, y, v, usable, method=continuum, smoothing=smoothing, bands=blist)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(in_band, y / cont, 1.0)
            tv = np.where(in_band, v / cont**2, 0.0)
        meas = in_band & ~bad & np.isfinite(t)
        t = np.where(meas, t, 1.0)
        tv = np.where(meas, tv, 0.0)
        source_note = "smooth continuum across the bands"
    else:
        smoothing = 400.0 if smoothing is None else smoothing
        intr = np.asarray(intrinsic, dtype=float)
        if intr.shape != o.shape:
            raise SpectrumError(f"intrinsic has shape {intr.shape}, wavelength has {o.shape}")
        intr = intr[o]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = y / intr
            rv = v / intr**2
        okr = np.isfinite(r) & (intr > 0) & ~bad
        usable = okr & ~in_band
        # weak absorption outside the listed bands pulls the continuum down; clip low harder
        cont = _fit_continuum(wave, np.where(okr, r, np.nan), np.where(okr, rv, np.inf), usable,
                              method=continuum, smoothing=smoothing, bands=blist, nsigma=(2.0, 4.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = r / cont
            tv = rv / cont**2
        t = np.where(okr & np.isfinite(t), t, 1.0)
        tv = np.where(okr & np.isfinite(tv), tv, 0.0)
        source_note = "observed / intrinsic A0V / smooth continuum (Vacca et al. 2003)"
    t = np.clip(t, clip[0], clip[1])
    log.info("telluric transmission from standard (%s, X=%.3f): %d bands, min T %.3f; %s",
             medium, airmass, len(blist), float(np.min(t)), source_note)
    return Transmission(wave=wave, trans=t, variance=tv, medium=medium, airmass=float(airmass),
                        bands=blist, source="standard",
                        meta={"method": "a0v" if intrinsic is not None else "continuum",
                              "continuum": continuum, "smoothing_aa": float(smoothing)})


def scale_to_airmass(trans: Transmission, airmass: float, *,
                     exponent: dict[str, float] | float | None = None) -> Transmission:
    """Scale a transmission to another airmass: T' = T^p with p = (X / X_T)^b.

    Beer–Lambert gives p = X/X_T (b = 1) for optically thin absorption; saturated lines,
    unresolved at low resolution, deepen more slowly (curve of growth), like X^0.5–0.6.
    ``b`` depends on the absorber (:data:`AIRMASS_EXPONENT`: O2 0.55, H2O 0.75 — see there
    for the justification); pixels outside all bands (near-IR, where T is measured
    everywhere) use the H2O exponent.  Variance: var' = (p T^(p−1))² var.

    Parameters
    ----------
    trans : Transmission
    airmass : float
        Target airmass X.
    exponent : dict or float, optional
        b per species (keys matched in the band species, e.g. ``{'O2': 0.55, 'H2O': 0.75}``)
        or one b for all; default :data:`AIRMASS_EXPONENT`.

    Returns
    -------
    Transmission
        With ``airmass`` = X (the same object if X equals the measured airmass).
    """
    if not np.isfinite(airmass) or airmass <= 0:
        raise ValueError(f"airmass must be a positive number, got {airmass}")
    if np.isclose(airmass, trans.airmass, rtol=0, atol=1e-6):
        return trans
    if exponent is None:
        b = dict(AIRMASS_EXPONENT)
    elif np.isscalar(exponent):
        b = {"O2": float(exponent), "H2O": float(exponent)}
    else:
        b = dict(exponent)
    ratio = float(airmass) / float(trans.airmass)
    bexp = np.full(trans.wave.shape, _species_exponent("H2O", b))
    for lo, hi, sp in trans.bands:
        sel = (trans.wave >= lo) & (trans.wave <= hi)
        bexp[sel] = _species_exponent(sp, b)
    p = ratio**bexp
    t = np.clip(trans.trans, 1e-6, None)
    tn = t**p
    vn = (p * t ** (p - 1.0)) ** 2 * trans.variance
    meta = dict(trans.meta, scaled_from_airmass=trans.airmass, airmass_exponent=b)
    return replace(trans, trans=tn, variance=vn, airmass=float(airmass), meta=meta)


def transmission_on_grid(trans: Transmission, wave, *, medium: str | None = None,
                         shift_px: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate T (cubic spline) and its variance (linear) onto the pixels of ``wave``,
    shifted by ``shift_px`` pixels of that grid.

    The value at pixel i is T at the wavelength of (fractional) pixel i − ``shift_px``: a
    positive shift moves the absorption features to larger pixel indices.  Outside the
    transmission's range T = 1 and variance 0.
    """
    w = _as_angstrom(wave)
    med = trans.medium if medium is None else _check_medium(medium)
    w = _convert_wave(w, med, trans.medium)
    if shift_px:
        p = np.arange(w.size, dtype=float)
        ps = p - float(shift_px)
        # linear in pixel, extrapolated with the end dispersion
        w = np.interp(ps, p, w)
        lo, hi = ps < 0, ps > w.size - 1
        ww = _convert_wave(_as_angstrom(wave), med, trans.medium)
        if lo.any():
            w[lo] = ww[0] + (ps[lo]) * (ww[1] - ww[0])
        if hi.any():
            w[hi] = ww[-1] + (ps[hi] - (w.size - 1)) * (ww[-1] - ww[-2])
    spl = make_interp_spline(trans.wave, trans.trans, k=3)
    inside = (w >= trans.wave[0]) & (w <= trans.wave[-1])
    t = np.ones_like(w)
    t[inside] = spl(w[inside])
    v = np.where(inside, np.interp(w, trans.wave, trans.variance), 0.0)
    lo_clip = float(np.min(trans.trans))
    t = np.clip(t, min(lo_clip, 0.02), max(1.05, float(np.max(trans.trans))))
    return t, v


def cross_correlation_shift(wave, spectrum, trans: Transmission, *, bands: _BandLike | None = None,
                            max_shift_px: float = 3.0, medium: str | None = None,
                            oversample: int = 20, min_depth: float = 0.05,
                            smooth_px: float = 1.5) -> float:
    """Sub-pixel shift (pixels) aligning the telluric features of a spectrum with ``trans``.

    Cross-correlation of first derivatives inside the absorption bands (the approach of
    e.g. IRAF ``fxcor`` applied to d ln F/dpix and d ln T/dpix, which removes the smooth
    continuum and is insensitive to a depth mismatch, e.g. from the airmass).  In each
    band (± 3 px) a straight line through the window ends is removed from ln F and ln T,
    both are smoothed with the same Gaussian (σ = ``smooth_px``, against pixel noise) and
    differentiated; the derivative sequences (zero outside the bands) are oversampled ``oversample``
    times with the same cubic spline, the cross-correlation is computed at lags of
    1/``oversample`` px within ±``max_shift_px`` and its peak refined with a parabola.
    Because both sequences are interpolated identically, noise smoothing by the
    interpolation does not bias the answer towards whole or half pixels (which it does
    when one minimises the roughness of spectrum / T shifted by interpolation).

    Parameters
    ----------
    wave : array_like
        Wavelengths of ``spectrum`` (Å, in ``medium``; default: the transmission's).
    spectrum : array_like
        Spectrum (any linear unit, > 0 in the bands) containing the telluric features.
    trans : Transmission
        Reference transmission.
    bands : sequence of (wmin, wmax[, species]), optional
        Windows used (Å, medium of ``wave``); default ``trans.bands``.
    max_shift_px : float
        Search range (pixels).
    oversample : int
        Lag resolution is 1/``oversample`` px before the parabolic refinement.
    min_depth : float
        Bands where T stays above 1 − ``min_depth`` carry no signal and are skipped.
    smooth_px : float
        Gaussian σ (px) applied to both ln F and ln T (0 = none).

    Returns
    -------
    float
        Shift in pixels, with the sign convention of :func:`transmission_on_grid`
        (positive: the spectrum's features lie at larger pixel indices than ``trans``'s);
        pass it as ``shift_px`` to :func:`correct_telluric`.  0.0 (with a warning) when
        no usable band exists or the correlation maximum lies on the edge of the search
        range (no real peak).
    """
    w = _as_angstrom(wave)
    f = np.asarray(spectrum, dtype=float)
    if f.shape != w.shape:
        raise SpectrumError(f"spectrum has shape {f.shape}, wavelength has {w.shape}")
    med = trans.medium if medium is None else _check_medium(medium)
    if bands is None:
        blist = [(lo, hi) for lo, hi, _ in trans.bands]
        if med != trans.medium:
            blist = [tuple(_convert_wave(np.array([lo, hi]), trans.medium, med)) for lo, hi in blist]
    else:
        blist = [(min(b[0], b[1]), max(b[0], b[1])) for b in bands]
    t0, _ = transmission_on_grid(trans, w, medium=med)
    n = w.size
    good = np.isfinite(f) & (f > 0)
    g = np.log(np.where(good, f, 1.0))
    h = np.log(np.clip(t0, 1e-3, None))
    dg = np.zeros(n)
    dh = np.zeros(n)
    nb = 0
    for lo, hi in blist:
        sel = (w >= lo) & (w <= hi)
        if sel.sum() < 5 or np.min(t0[sel]) >= 1.0 - min_depth:
            continue
        idx = np.flatnonzero(sel)
        i0, i1 = max(idx[0] - 3, 0), min(idx[-1] + 4, n)
        if not good[i0:i1].all() or i1 - i0 < 8:
            continue
        x = np.arange(i1 - i0, dtype=float)
        ends = np.r_[0:2, i1 - i0 - 2:i1 - i0]
        gg, hh = g[i0:i1].copy(), h[i0:i1].copy()
        # remove the continuum (straight line through the window ends), then smooth
        gg -= np.polyval(np.polyfit(x[ends], gg[ends], 1), x)
        hh -= np.polyval(np.polyfit(x[ends], hh[ends], 1), x)
        if smooth_px > 0:
            gg = gaussian_filter1d(gg, smooth_px, mode="nearest")
            hh = gaussian_filter1d(hh, smooth_px, mode="nearest")
        dg[i0:i1] = np.gradient(gg)
        dh[i0:i1] = np.gradient(hh)
        nb += 1
    if nb == 0:
        log.warning("cross_correlation_shift: no telluric band with absorption in range; shift 0")
        return 0.0
    p = np.arange(n, dtype=float)
    pf = np.arange(0.0, n - 1 + 1e-9, 1.0 / oversample)
    dgf = make_interp_spline(p, dg, k=3)(pf)
    dhf = make_interp_spline(p, dh, k=3)(pf)
    maxlag = int(np.ceil(max_shift_px * oversample))
    lags = np.arange(-maxlag, maxlag + 1)
    m = pf.size
    ccf = np.array([np.dot(dgf[max(L, 0):m + min(L, 0)], dhf[max(-L, 0):m - max(L, 0)]) for L in lags])
    i = int(np.argmax(ccf))
    best = float(lags[i]) / oversample
    if 0 < i < lags.size - 1:
        y0, y1, y2 = ccf[i - 1], ccf[i], ccf[i + 1]
        den = y0 - 2 * y1 + y2
        if den < 0:
            best += 0.5 * (y0 - y2) / den / oversample
    else:
        # the maximum sits on the edge of the range: no real correlation peak was found
        # (weak bands, noise); an edge value would be an arbitrary shift, so none is applied
        log.warning("cross_correlation_shift: no correlation peak within ±%.1f px (maximum at the edge); shift 0",
                    max_shift_px)
        return 0.0
    log.info("telluric shift: %.3f px (%d bands)", best, nb)
    return best


def correct_telluric(wave, flux, var, mask, trans: Transmission, *, airmass: float,
                     shift_px: float = 0.0, min_transmission: float = 0.2,
                     medium: str | None = None, exponent: dict[str, float] | float | None = None,
                     flag_below: float = 0.99) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Divide a spectrum by the telluric transmission scaled to its airmass.

    T is scaled with :func:`scale_to_airmass`, put on the spectrum's pixels with
    :func:`transmission_on_grid` (shifted by ``shift_px``), and

        F' = F / T,   var' = var / T² + F² var_T / T⁴.

    Parameters
    ----------
    wave, flux, var : array_like
        Spectrum (Å in ``medium``; any linear flux unit) and its variance.
    mask : array_like of bool or None
        True = bad; carried over.
    trans : Transmission
    airmass : float
        Airmass of the spectrum.
    shift_px : float
        From :func:`cross_correlation_shift`.
    min_transmission : float
        Pixels with T below this are masked (e.g. 1.35–1.45 µm in the near-IR): the
        correction there only amplifies noise and model errors.
    medium : {'air', 'vacuum'}, optional
        Medium of ``wave``; default the transmission's.
    exponent : dict or float, optional
        Airmass exponent b (see :func:`scale_to_airmass`).
    flag_below : float
        Pixels with T < ``flag_below`` are reported in ``corrected``.

    Returns
    -------
    flux, var : numpy.ndarray
        Corrected spectrum and variance.
    mask : numpy.ndarray of bool
        Input mask | T < ``min_transmission`` | non-finite.
    corrected : numpy.ndarray of bool
        Pixels where a correction was applied (T < ``flag_below``), for product flags.
    """
    w = _check_spectrum(wave, flux, var, names=("flux", "variance"))
    f = np.asarray(flux, dtype=float)
    v = np.asarray(var, dtype=float)
    scaled = scale_to_airmass(trans, airmass, exponent=exponent)
    t, tv = transmission_on_grid(scaled, w, medium=medium, shift_px=shift_px)
    fc = f / t
    vc = v / t**2 + f**2 * tv / t**4
    m = np.zeros(w.shape, bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    low = t < min_transmission
    m |= low | ~np.isfinite(fc) | ~np.isfinite(vc)
    corrected = t < flag_below
    log.info("telluric correction: X %.3f (standard %.3f), shift %.2f px, %d pixels corrected, "
             "%d masked (T < %.2f)", airmass, trans.airmass, shift_px, int(corrected.sum()),
             int(low.sum()), min_transmission)
    return fc, vc, m, corrected
