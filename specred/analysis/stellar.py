"""Stellar-population continuum under the emission lines of a galaxy.

Weak emission lines on the continuum of an old or intermediate population sit in stellar
absorption (Balmer lines, Mg b, Fe, Na D); a local straight-line continuum then gives
Hβ and Hα fluxes that are too low by the absorption equivalent width, and lines of
early-type galaxies are lost among the metal features.  As the SDSS pipeline and pPXF do,
specred fits the continuum with a non-negative combination of single stellar population
(SSP) spectra, broadened to the instrumental resolution plus a stellar velocity dispersion,
times a smooth multiplicative polynomial (flux-calibration and reddening mismatch), with
the emission lines masked; the emission lines are then fitted on top of that model.

Templates: the MILES/E-MILES SSP models of Vazdekis et al. (2010, MNRAS 404, 1639; 2016,
MNRAS 463, 3409; Kroupa-universal IMF slope 1.30, BaSTI-free Padova 2000 isochrones, base
[α/Fe]), 2.51 Å FWHM in 3540–8950 Å (Falcón-Barroso et al. 2011, A&A 532, A95), air
wavelengths.  They are read from the installed ``ppxf`` 8.2.6 distribution, where
M. Cappellari ships them (``ppxf/miles_models``); specred does not redistribute them.

The fit (all linear algebra vectorised):

1. templates are resampled once onto a logarithmic rest-frame vacuum grid (30 km/s) and
   Gaussian-broadened to a ladder of extra widths; the width a pixel needs,
   ``sqrt(σ*² + σ_LSF² − σ_template²)``, is reached by interpolating between two rungs in
   σ² (which keeps the second moment exact);
2. the velocity offset and σ* are found on a grid with the current best mix of templates
   (one column times the polynomial: linear least squares), then the template weights by
   non-negative least squares with the polynomial fixed, alternating three times;
3. pixels more than 4σ off the model are clipped once (unmasked emission, cosmic rays).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.ndimage import gaussian_filter1d
from scipy.optimize import nnls

from .. import calib
from ..errors import SpectrumError
from . import lines as L
from .spectrum import C_KMS, FWHM_PER_SIGMA, AnalysisSpectrum

#: MILES resolution in 3540–8950 Å (Falcón-Barroso et al. 2011): 2.51 Å FWHM.
MILES_FWHM_AA = 2.51
#: rest-frame vacuum range used (the MILES part of E-MILES, with a margin for broadening)
MILES_RANGE_AA = (3560.0, 8900.0)
#: log-λ step of the template grid (km/s)
TEMPLATE_STEP_KMS = 30.0
#: the SSP basis: ages (Gyr) × [M/H] picked from the E-MILES grid
BASIS_AGES_GYR = (0.0631, 0.1259, 0.2512, 0.5012, 1.0, 1.9953, 3.9811, 7.9433, 12.5893)
BASIS_METALS = (-1.31, -0.71, 0.00, 0.22)
#: extra broadening ladder (km/s)
_LADDER = np.array([0.0, 20, 40, 60, 80, 100, 125, 150, 180, 210, 245, 285, 330, 380, 440, 510, 590, 680, 800])


@dataclass(frozen=True)
class StellarTemplates:
    """SSP spectra on a log-uniform rest-frame vacuum grid, each normalised to median 1,
    at every rung of the extra-broadening ladder (rung 0: as published)."""
    ln_wave: np.ndarray          # ln(rest vacuum Å), uniform step
    ladder: np.ndarray = field(repr=False)   # (n_rungs, n_templates, n_pix)
    age_gyr: np.ndarray
    metal: np.ndarray            # [M/H]
    fwhm_aa: float
    source: str

    @property
    def flux(self) -> np.ndarray:
        """The unbroadened templates, (n_templates, n_pix)."""
        return self.ladder[0]


def _ppxf_models_dir() -> Path:
    spec = importlib.util.find_spec("ppxf")
    if spec is None or spec.origin is None:
        raise SpectrumError("stellar continuum: the MILES templates come with the 'ppxf' package "
                            "(pip install 'ppxf==8.2.6'), which is not installed")
    d = Path(spec.origin).parent / "miles_models"
    if not d.is_dir():
        raise SpectrumError(f"stellar continuum: {d} not found; install 'ppxf==8.2.6' (later versions no "
                            "longer ship the MILES models)")
    return d


@lru_cache(maxsize=2)
def miles_templates(ages=BASIS_AGES_GYR, metals=BASIS_METALS) -> StellarTemplates:
    """The E-MILES SSP basis (cached), resampled to vacuum, log-λ, normalised, broadened."""
    d = _ppxf_models_dir()
    step = TEMPLATE_STEP_KMS / C_KMS
    ln_grid = np.arange(np.log(MILES_RANGE_AA[0] - 60.0), np.log(MILES_RANGE_AA[1] + 60.0), step)
    flux, age_out, met_out = [], [], []
    for m in metals:
        tag = f"Z{'p' if m >= 0 else 'm'}{abs(m):.2f}"
        for a in ages:
            p = d / f"Eun1.30{tag}T{a:07.4f}_iPp0.00_baseFe_linear_FWHM_variable.fits"
            if not p.exists():
                raise SpectrumError(f"stellar continuum: template {p.name} missing from {d}")
            with fits.open(p, memmap=False) as h:
                data = np.asarray(h[0].data, float)
                hdr = h[0].header
            w_air = hdr["CRVAL1"] + hdr["CDELT1"] * (np.arange(data.size) + 1 - hdr.get("CRPIX1", 1))
            sel = (w_air > MILES_RANGE_AA[0] - 150) & (w_air < MILES_RANGE_AA[1] + 150)
            w_vac = np.asarray(calib.air_to_vacuum(w_air[sel]))
            f = np.interp(ln_grid, np.log(w_vac), data[sel])
            flux.append(f / np.median(f))
            age_out.append(a)
            met_out.append(m)
    flux = np.array(flux)
    sig_pix = _LADDER / TEMPLATE_STEP_KMS
    ladder = np.array([flux if s == 0 else gaussian_filter1d(flux, s, axis=1, mode="nearest") for s in sig_pix])
    return StellarTemplates(ln_grid, ladder, np.array(age_out), np.array(met_out), MILES_FWHM_AA,
                            "E-MILES SSPs (Vazdekis et al. 2016), Kroupa IMF, via ppxf 8.2.6")


@dataclass(frozen=True)
class StellarContinuum:
    """A fitted stellar continuum, on the spectrum's pixels.

    ``model``: erg s⁻¹ cm⁻² Å⁻¹ at every pixel of the spectrum, NaN outside ``range_obs``.
    ``sigma_star_kms``: stellar velocity dispersion (instrumental resolution removed);
    ``dv_kms``: velocity of the stars relative to the input redshift; ``age_gyr``:
    light-weighted mean age; ``chi2``/``dof`` over the fitted (unmasked) pixels;
    ``chi2_smooth``: χ² of a smooth polynomial alone on the same pixels (a template fit that
    does not beat it clearly has found no stellar absorption features)."""
    model: np.ndarray
    range_obs: tuple
    sigma_star_kms: float
    dv_kms: float
    age_gyr: float
    metal: float
    chi2: float
    dof: int
    chi2_smooth: float
    n_pix: int
    weights: np.ndarray
    flags: str = ""

    @property
    def redchi(self) -> float:
        return self.chi2 / self.dof if self.dof > 0 else float("nan")

    @property
    def significant(self) -> bool:
        """True when the templates describe the continuum: they beat a smooth polynomial by
        Δχ² > max(25, 2 % of the pixels) *and* remove more than half of the χ² excess the
        polynomial leaves (χ²_smooth − dof).  A continuum without stellar features (a
        quasar, a young starburst) fails the first; one the templates cannot reproduce
        fails the second, and then a Balmer absorption Gaussian is the safer model."""
        gain = self.chi2_smooth - self.chi2
        return bool(gain > max(25.0, 0.02 * self.n_pix) and gain > 0.5 * (self.chi2_smooth - self.dof))


def _emission_mask(rest_wave, lsf_kms, mask_kms):
    """True on pixels free of the catalogue's emission lines (±mask_kms + 2.5 σ_LSF)."""
    centres = L.emission_rest_vac()
    keep = np.ones(rest_wave.size, bool)
    half = mask_kms + 2.5 * np.where(np.isfinite(lsf_kms), lsf_kms, 0.0)
    for c in centres[(centres > rest_wave[0] - 50) & (centres < rest_wave[-1] + 50)]:
        keep &= np.abs(rest_wave - c) / c * C_KMS > half
    return keep


def _legendre(x, deg):
    return np.polynomial.legendre.legvander(x, deg)


def fit_stellar_continuum(spec: AnalysisSpectrum, z: float, *, templates: StellarTemplates | None = None,
                          mdegree: int = 6, mask_kms: float = 600.0, dv_max_kms: float = 400.0,
                          sigma_star_grid=(0.0, 40, 70, 100, 130, 160, 200, 250, 300, 380),
                          min_pixels: int = 200) -> StellarContinuum:
    """Fit the stellar continuum of ``spec`` at redshift ``z`` (see the module docstring).

    Raises :class:`SpectrumError` when fewer than ``min_pixels`` usable pixels fall in the
    rest-frame range of the templates (3560–8900 Å)."""
    t = templates or miles_templates()
    z = float(z)
    lo_r, hi_r = MILES_RANGE_AA
    margin = (dv_max_kms + 4 * 400.0) / C_KMS
    rest = spec.wave / (1 + z)
    inrange = (rest > lo_r * (1 + margin)) & (rest < hi_r * (1 - margin))
    lsf = spec.lsf_sigma_kms
    flags = []
    if not np.all(np.isfinite(lsf[inrange])):
        flags.append("LSF_UNKNOWN")
        lsf = np.where(np.isfinite(lsf), lsf, 0.0)
    use = inrange & spec.good & _emission_mask(rest, lsf, mask_kms)
    if use.sum() < min_pixels:
        raise SpectrumError(f"{spec.name}: only {int(use.sum())} usable pixels in the templates' rest range "
                            f"{lo_r:.0f}-{hi_r:.0f} Å at z={z:.4f}; no stellar continuum fit")
    idx = np.where(use)[0]
    y = spec.flux[idx]
    w = 1.0 / spec.sigma[idx]
    x = np.linspace(-1, 1, spec.wave.size)[idx]       # polynomial variable over the whole spectrum
    P = _legendre(x, mdegree)
    ladder2 = _LADDER ** 2

    def columns(dv, sstar, src=None, pix=None):
        """Templates (all, or the broadened ladder ``src`` of one mix) at the fitted pixels
        (or at the pixels ``pix``)."""
        pix = idx if pix is None else pix
        lnr = np.log(rest[pix])
        sig_t = t.fwhm_aa / FWHM_PER_SIGMA / rest[pix] * C_KMS
        need2 = np.maximum(sstar ** 2 + lsf[pix] ** 2 - sig_t ** 2, 0.0)
        k = np.clip(np.searchsorted(ladder2, need2) - 1, 0, _LADDER.size - 2)
        f = (need2 - ladder2[k]) / (ladder2[k + 1] - ladder2[k])
        pos = (lnr - dv / C_KMS - t.ln_wave[0]) / (t.ln_wave[1] - t.ln_wave[0])
        i0 = np.clip(np.floor(pos).astype(int), 0, t.ln_wave.size - 2)
        g = pos - i0
        src = t.ladder if src is None else src
        a = src[k, :, i0] * (1 - g)[:, None] + src[k, :, i0 + 1] * g[:, None]       # (n_pix, n_t)
        b = src[k + 1, :, i0] * (1 - g)[:, None] + src[k + 1, :, i0 + 1] * g[:, None]
        return a * (1 - f)[:, None] + b * f[:, None]

    def poly_fit(col):
        """Best multiplicative polynomial for one template column; (chi2, coefficients)."""
        A = col[:, None] * P * w[:, None]
        c, *_ = np.linalg.lstsq(A, y * w, rcond=None)
        r = A @ c - y * w
        return float(r @ r), c

    def nnls_fit(cols, poly, sel):
        A = (cols * poly[:, None] * w[:, None])[sel]
        scale = np.sqrt((A ** 2).sum(0))
        scale = np.where(scale > 0, scale, 1.0)
        wt, rn = nnls(A / scale, (y * w)[sel], maxiter=50 * A.shape[1])
        return wt / scale, rn ** 2

    # smooth reference: a polynomial of as many terms as the template fit has free numbers
    Ps = _legendre(x, mdegree + 6) * w[:, None]
    cs, *_ = np.linalg.lstsq(Ps, y * w, rcond=None)
    rs = Ps @ cs - y * w
    chi2_smooth = float(rs @ rs)

    dv, sstar = 0.0, 150.0
    poly = np.ones(idx.size)
    keep = np.ones(idx.size, bool)
    wts = None
    dv_grid = np.arange(-dv_max_kms, dv_max_kms + 1e-9, 25.0)
    def alternate(cols, poly, keep, n_iter=20):
        """Template weights (NNLS) and multiplicative polynomial, alternately, to convergence."""
        last = np.inf
        for _ in range(n_iter):
            wts, _ = nnls_fit(cols, poly, keep)
            if not np.any(wts > 0):
                raise SpectrumError(f"{spec.name}: the stellar templates do not fit (all weights zero)")
            chi2, c = poly_fit((cols @ wts) * keep)
            amp_poly = P @ c
            med = np.median(amp_poly[keep])
            poly = amp_poly / med if med > 0 else np.ones(idx.size)
            if last - chi2 < 1e-4 * chi2:
                break
            last = chi2
        return wts, poly, amp_poly, c

    def refine(grid, chis):
        """Minimum of a χ² grid, refined by a parabola through its neighbours."""
        j = int(np.argmin(chis))
        if 0 < j < len(grid) - 1:
            (x0, x1, x2), (c0, c1, c2) = grid[j - 1:j + 2], chis[j - 1:j + 2]
            # parabola through three (possibly unevenly spaced) points
            d = (x0 - x1) * (x0 - x2) * (x1 - x2)
            a = (x2 * (c1 - c0) + x1 * (c0 - c2) + x0 * (c2 - c1)) / d
            b = (x2 ** 2 * (c0 - c1) + x1 ** 2 * (c2 - c0) + x0 ** 2 * (c1 - c2)) / d
            if a > 0:
                return float(np.clip(-b / (2 * a), x0, x2))
        return float(grid[j])

    dv, sstar = 0.0, 150.0
    poly = np.ones(idx.size)
    keep = np.ones(idx.size, bool)
    dv_grid = np.arange(-dv_max_kms, dv_max_kms + 1e-9, 25.0)
    sgrid = np.asarray(sigma_star_grid, float)
    for it in range(3):
        wts, poly, amp_poly, _ = alternate(columns(dv, sstar), poly, keep)
        mix = np.einsum("rtp,t->rp", t.ladder, wts / wts.sum())[:, None, :]
        # grid in velocity (at the current σ*), then in σ* (at the best velocity)
        dv = refine(dv_grid, [poly_fit(columns(v, sstar, mix)[:, 0] * keep)[0] for v in dv_grid])
        sstar = refine(sgrid, [poly_fit(columns(dv, s_, mix)[:, 0] * keep)[0] for s_ in sgrid])
        if it == 0:
            col = columns(dv, sstar, mix)[:, 0]
            _, c = poly_fit(col)
            resid = (y - col * (P @ c)) * w
            s = 1.4826 * np.median(np.abs(resid))
            keep = np.abs(resid) < 4.0 * max(s, 1.0)
    cols = columns(dv, sstar)
    wts, poly, amp_poly, c_final = alternate(cols, poly, keep)
    model_fit = cols @ wts * amp_poly
    r = ((y - model_fit) * w)[keep]
    chi2 = float(r @ r)
    n_free = int(np.sum(wts > 0)) + mdegree + 2
    rs_keep = rs[keep]
    chi2_smooth = float(rs_keep @ rs_keep)

    # the model at every pixel in range (not only the fitted ones)
    full = np.full(spec.wave.size, np.nan)
    allidx = np.where(inrange)[0]
    xa = np.linspace(-1, 1, spec.wave.size)[allidx]
    full[allidx] = columns(dv, sstar, pix=allidx) @ wts * (_legendre(xa, mdegree) @ c_final)
    lw = wts * np.median(cols, axis=0)
    lw = lw / lw.sum()
    return StellarContinuum(full, (float(spec.wave[allidx[0]]), float(spec.wave[allidx[-1]])), sstar, dv,
                            float(np.sum(lw * t.age_gyr)), float(np.sum(lw * t.metal)), chi2,
                            int(keep.sum() - n_free), chi2_smooth, int(keep.sum()), wts, ",".join(flags))
