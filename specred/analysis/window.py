"""Fits between two wavelengths, as IRAF ``splot`` makes them: Gaussians on a linear continuum
(keys ``k`` and ``d``) and equivalent widths by direct integration (key ``e``).

These are what :mod:`specred.interactive` calls when the user marks a window; scripts call
them the same way, so a fit made by keystrokes can be repeated in a batch.  Unlike
:func:`~specred.analysis.fit_lines`, nothing here needs a redshift or a catalogue line: the
Gaussians have free centres and widths.  The model is the one of
:mod:`specred.analysis.fitting` — each Gaussian sampled at the pixel centre with the
variance of the pixel box added (σ² + Δλ²/12), its observed σ the quadrature sum of the
intrinsic and instrumental widths — so for an isolated catalogue line both give the same
flux within the errors.

Solved by variable projection (continuum and fluxes linear, centres and widths by bounded
least squares, :func:`scipy.optimize.least_squares`); the covariance of all parameters comes
from the analytic Jacobian at the optimum, scaled by max(1, reduced χ²) as in
:func:`~specred.analysis.fit_lines`.  Wavelengths are observed **vacuum** Å (those of
:class:`~specred.analysis.AnalysisSpectrum`); fluxes erg s⁻¹ cm⁻²; equivalent widths are
positive for emission (the project's convention; IRAF's ``splot`` reports the opposite sign),
observed-frame unless a redshift is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from ..errors import SpectrumError
from .spectrum import C_KMS, FWHM_PER_SIGMA, AnalysisSpectrum, pixel_widths

SQRT2PI = np.sqrt(2.0 * np.pi)


@dataclass(frozen=True)
class WindowLine:
    """One Gaussian of a window fit.  ``centre`` observed vacuum Å; ``flux`` erg s⁻¹ cm⁻²
    (negative for absorption); ``fwhm_kms`` intrinsic (instrument removed, 0 when the line
    is not resolved); ``ew`` Å, observed frame (rest frame when the fit had a redshift),
    positive for emission."""

    centre: float
    centre_err: float
    flux: float
    flux_err: float
    snr: float
    fwhm_aa: float              # observed FWHM (instrument included), Å
    fwhm_aa_err: float
    fwhm_kms: float
    fwhm_kms_err: float
    ew: float
    ew_err: float
    continuum: float            # continuum at the centre, erg s⁻¹ cm⁻² Å⁻¹

    def to_row(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class WindowFit:
    """Gaussians + linear continuum fitted between ``w1`` and ``w2`` (observed vacuum Å)."""

    spectrum: str
    w1: float
    w2: float
    z: float                    # redshift of the rest-frame EWs (NaN: observed frame)
    lines: tuple
    cont_a: float               # continuum a + b (λ - centre of the window)
    cont_b: float
    chi2: float
    dof: int
    n_pix: int
    kind: str = "gauss"
    flags: str = ""
    model_wave: np.ndarray = field(default=None, repr=False, compare=False)
    model_flux: np.ndarray = field(default=None, repr=False, compare=False)

    @property
    def redchi(self) -> float:
        return self.chi2 / self.dof if self.dof > 0 else float("nan")

    def continuum_at(self, wave):
        return self.cont_a + self.cont_b * (np.asarray(wave, float) - 0.5 * (self.w1 + self.w2))


def _pixels(spec: AnalysisSpectrum, w1: float, w2: float, need: int):
    if not (np.isfinite(w1) and np.isfinite(w2)):
        raise SpectrumError("window limits must be finite wavelengths")
    w1, w2 = sorted((float(w1), float(w2)))
    w = spec.wave
    sel = (w >= w1) & (w <= w2) & spec.good
    idx = np.nonzero(sel)[0]
    if idx.size < need:
        raise SpectrumError(f"{spec.name or 'spectrum'}: only {idx.size} usable pixels between {w1:.1f} and "
                            f"{w2:.1f} Å (need {need})")
    return w1, w2, idx, pixel_widths(w)[idx]


def fit_window(spec: AnalysisSpectrum, w1: float, w2: float, centres=None, *, z: float | None = None,
               max_fwhm_kms: float = 20000.0) -> WindowFit:
    """Fit Gaussians and a linear continuum to the pixels between ``w1`` and ``w2``.

    ``centres``: starting centres (observed vacuum Å), one Gaussian each (a deblend); None
    fits one Gaussian starting at the largest deviation from a straight line through the
    window's ends (emission or absorption).  ``z``: report rest-frame EWs.
    ``max_fwhm_kms``: upper bound of each observed FWHM.  Raises
    :class:`~specred.errors.SpectrumError` for a window with too few usable pixels.
    """
    if centres is None:
        centres = []
    centres = [float(c) for c in np.atleast_1d(centres)]
    n = max(len(centres), 1)
    w1, w2, idx, dlam = _pixels(spec, w1, w2, need=3 * n + 4)
    x = spec.wave[idx]
    y = spec.flux[idx]
    wt = 1.0 / spec.sigma[idx]
    xm = 0.5 * (w1 + w2)
    pix2 = dlam ** 2 / 12.0
    lsf_aa = spec.lsf_sigma_at(x) * x / C_KMS
    lsf_aa = np.where(np.isfinite(lsf_aa), lsf_aa, 0.0)
    step = float(np.median(dlam))
    # starting values
    k = max(2, idx.size // 10)
    base = np.interp(x, [np.median(x[:k]), np.median(x[-k:])], [np.median(y[:k]), np.median(y[-k:])])
    if not centres:
        centres = [float(x[np.argmax(np.abs(y - base) * wt)])]
    s0 = max(float(np.median(lsf_aa)), 1.2 * step)
    theta0 = np.concatenate([centres, np.full(n, s0)])
    smin = 0.3 * step
    smax = max(max_fwhm_kms / FWHM_PER_SIGMA / C_KMS * xm, 2 * s0)
    lo = np.concatenate([np.full(n, w1), np.full(n, smin)])
    hi = np.concatenate([np.full(n, w2), np.full(n, smax)])
    theta0 = np.clip(theta0, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))

    def design(theta):
        c, s = theta[:n], theta[n:]
        st = np.sqrt(s[None, :] ** 2 + pix2[:, None])
        u = (x[:, None] - c[None, :]) / st
        g = np.exp(-0.5 * u ** 2) / (SQRT2PI * st)
        A = np.column_stack([np.ones_like(x), x - xm, g])
        return A, g, u, st

    def solve(theta):
        A, g, u, st = design(theta)
        beta, *_ = np.linalg.lstsq(A * wt[:, None], y * wt, rcond=None)
        return beta, A, g, u, st

    def resid(theta):
        beta, A, *_ = solve(theta)
        return (A @ beta - y) * wt

    sol = least_squares(resid, theta0, bounds=(lo, hi), x_scale=np.concatenate([np.full(n, step), np.full(n, s0)]),
                        method="trf", xtol=1e-10, ftol=1e-10, max_nfev=400)
    theta = sol.x
    beta, A, g, u, st = solve(theta)
    r = (A @ beta - y) * wt
    chi2 = float(r @ r)
    dof = int(idx.size - (2 + 3 * n))
    flags = [] if sol.success else ["NOT_CONVERGED"]
    # full Jacobian of the model: continuum (2), fluxes (n), centres (n), sigmas (n)
    F = beta[2:]
    s = theta[n:]
    J = np.column_stack([A, F * g * u / st, F * g * (u ** 2 - 1.0) / st * (s / st)]) * wt[:, None]
    try:
        cov = np.linalg.inv(J.T @ J) * max(1.0, chi2 / dof if dof > 0 else 1.0)
    except np.linalg.LinAlgError:
        cov = np.full((J.shape[1],) * 2, np.nan)
        flags.append("SINGULAR")
    err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    lines = []
    zf = 1.0 + (float(z) if z is not None and np.isfinite(z) else 0.0)
    for i in range(n):
        c = float(theta[i])
        cont = float(beta[0] + beta[1] * (c - xm))
        jf, jc, js = 2 + i, 2 + n + i, 2 + 2 * n + i
        # EW = F / (a + b (c - xm)); gradient in (a, b, F, c)
        grad = np.zeros(J.shape[1])
        if cont != 0:
            grad[0] = -F[i] / cont ** 2
            grad[1] = -F[i] * (c - xm) / cont ** 2
            grad[jf] = 1.0 / cont
            grad[jc] = -F[i] * beta[1] / cont ** 2
        ew = F[i] / cont / zf if cont > 0 else float("nan")
        ew_err = float(np.sqrt(max(grad @ cov @ grad, 0.0))) / zf if cont > 0 else float("nan")
        lsf_c = float(np.interp(c, x, lsf_aa))
        s_int = np.sqrt(max(s[i] ** 2 - lsf_c ** 2, 0.0))
        fw_kms = FWHM_PER_SIGMA * s_int / c * C_KMS
        fw_kms_err = FWHM_PER_SIGMA * (s[i] / s_int * err[js] if s_int > 0 else float("nan")) / c * C_KMS
        lines.append(WindowLine(centre=c, centre_err=float(err[jc]), flux=float(F[i]), flux_err=float(err[jf]),
                                snr=float(F[i] / err[jf]) if err[jf] > 0 else float("nan"),
                                fwhm_aa=float(FWHM_PER_SIGMA * s[i]), fwhm_aa_err=float(FWHM_PER_SIGMA * err[js]),
                                fwhm_kms=float(fw_kms), fwhm_kms_err=float(fw_kms_err), ew=float(ew),
                                ew_err=ew_err, continuum=cont))
    mw = np.linspace(w1, w2, 400)
    mst = np.sqrt(s[None, :] ** 2 + float(np.median(pix2)))
    mg = np.exp(-0.5 * ((mw[:, None] - theta[None, :n]) / mst) ** 2) / (SQRT2PI * mst)
    mf = beta[0] + beta[1] * (mw - xm) + mg @ F
    return WindowFit(spectrum=spec.name, w1=w1, w2=w2, z=float(z) if z is not None else float("nan"),
                     lines=tuple(lines), cont_a=float(beta[0]), cont_b=float(beta[1]), chi2=chi2, dof=dof,
                     n_pix=int(idx.size), kind="gauss" if n == 1 else "deblend", flags=",".join(flags),
                     model_wave=mw, model_flux=mf)


def integrate_window(spec: AnalysisSpectrum, w1: float, w2: float, y1: float | None = None,
                     y2: float | None = None, *, z: float | None = None) -> WindowFit:
    """Flux, centroid and equivalent width by direct integration between ``w1`` and ``w2``
    (splot ``e``): the continuum is the straight line through (w1, y1) and (w2, y2) — the
    cursor positions — or, where a y is None, through the median flux of the 3 pixels
    nearest each limit.  Errors from the pixel variances (a cursor continuum is taken as
    exact; a median one adds its error).  Returns a :class:`WindowFit` of kind 'integral'
    with one :class:`WindowLine` (FWHM NaN)."""
    w1, w2, idx, dlam = _pixels(spec, w1, w2, need=3)
    x, y, sg = spec.wave[idx], spec.flux[idx], spec.sigma[idx]
    ends = []
    cvar = []
    for wl, yv in ((w1, y1), (w2, y2)):
        if yv is not None and np.isfinite(yv):
            ends.append(float(yv))
            cvar.append(0.0)
        else:
            near = idx[np.argsort(np.abs(x - wl))[:3]]
            ends.append(float(np.median(spec.flux[near])))
            cvar.append(float(np.pi / 2 * np.mean(spec.sigma[near] ** 2) / near.size))
    t = (x - w1) / (w2 - w1)
    cont = ends[0] * (1 - t) + ends[1] * t
    d = y - cont
    flux = float(np.sum(d * dlam))
    # continuum error: the two end values enter with weights (1 - t) and t
    cerr2 = cvar[0] * float(np.sum((1 - t) * dlam)) ** 2 + cvar[1] * float(np.sum(t * dlam)) ** 2
    flux_err = float(np.sqrt(np.sum((sg * dlam) ** 2) + cerr2))
    zf = 1.0 + (float(z) if z is not None and np.isfinite(z) else 0.0)
    ok = cont > 0
    ew = float(np.sum(np.where(ok, d / np.where(ok, cont, 1.0), 0.0) * dlam)) / zf
    ew_err = float(np.sqrt(np.sum(np.where(ok, sg / np.where(ok, cont, 1.0), 0.0) ** 2 * dlam ** 2))) / zf
    wsum = np.sum(d * dlam)
    centre = float(np.sum(x * d * dlam) / wsum) if wsum != 0 else float("nan")
    cerr = (float(np.sqrt(np.sum(((x - centre) * sg * dlam) ** 2)) / abs(wsum)) if wsum != 0 else float("nan"))
    cmid = float(np.interp(centre, x, cont)) if np.isfinite(centre) else float("nan")
    line = WindowLine(centre=centre, centre_err=cerr, flux=flux, flux_err=flux_err,
                      snr=flux / flux_err if flux_err > 0 else float("nan"), fwhm_aa=float("nan"),
                      fwhm_aa_err=float("nan"), fwhm_kms=float("nan"), fwhm_kms_err=float("nan"), ew=ew,
                      ew_err=ew_err, continuum=cmid)
    slope = (ends[1] - ends[0]) / (w2 - w1)
    return WindowFit(spectrum=spec.name, w1=w1, w2=w2, z=float(z) if z is not None else float("nan"),
                     lines=(line,), cont_a=float(ends[0] + slope * (0.5 * (w2 - w1))), cont_b=float(slope),
                     chi2=float("nan"), dof=0, n_pix=int(idx.size), kind="integral",
                     model_wave=np.array([w1, w2]), model_flux=np.array(ends))


__all__ = ["WindowLine", "WindowFit", "fit_window", "integrate_window"]
