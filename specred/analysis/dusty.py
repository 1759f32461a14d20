"""Near-IR continuum of a Galactic dusty source: a reddened photosphere plus hot dust.

In J and H at R ~ 600–1000 the photosphere of a K/M star shows few lines a spectrum of
S/N 10–30 can detect, and a young stellar object's Paschen / He I 10830 emission is often
at the 2σ level (the paper's YSO J155603.92, Solarz et al. 2020, Fig. 13).  What such a
spectrum does show is its continuum: an embedded or disk-bearing star is a photosphere
behind several magnitudes of extinction plus the ~1000–1500 K emission of its inner dust
disk (the near-IR excess of T Tauri stars: Meyer, Calvet & Hillenbrand 1997, AJ 114, 288),
so F_λ *rises* steeply through J and H.  No unreddened photosphere does that — a black body of T ≥ 3000 K has d ln F_λ / d ln λ ≤ −1 at 1.3 µm (Rayleigh–Jeans
tends to −4) — and neither do the rest-frame optical/near-IR continua of galaxies and of
unreddened QSOs that a near-IR spectrum covers.

:func:`fit_dusty_continuum` fits

    F(λ) = a · B_λ(T*) · 10^(−0.4 k(λ) E(B−V)) + b · B_λ(T_d),   a, b ≥ 0

(black bodies; k(λ) the CCM89 Galactic curve of :mod:`specred.dust`, R_V = 3.1) on a grid
T* = 3000–7000 K (250 K), E(B−V) = 0–8 (0.05), T_d = 600–1600 K (100 K), with the two
amplitudes solved linearly for every grid point at once (vectorised normal equations, the
non-negativity enforced by falling back to the better one-component fit).  Pixels within
±25 Å of the z = 0 hydrogen Paschen and He I 10830 lines are left out of the continuum and
measured afterwards on the residual (matched Gaussian of the instrumental width).  As a
yardstick of "as good as a smooth curve can do" the same pixels are fitted by a cubic
spline in ln λ with knots every 7 % in wavelength (it follows any continuum, not lines).
Real spectra carry flux-calibration and telluric residuals a black body cannot follow, so
the model is accepted when its reduced χ² is within ``CHI2_RATIO_MAX`` (1.25) of the
spline's — and when the spectrum *is* smooth: at most ``MAX_OUTLIER_FRACTION`` (1 %) of the
pixels may lie more than 5σ off the spline (lines put many pixels there; Gaussian noise
puts 6e-7 per pixel).  The spectrum is called a Galactic dusty source when, in addition,
the model rises as F_λ ∝ λ^β with β >= ``MIN_SLOPE`` (2) and rises most steeply at the blue
end (β over the bluest quarter >= β over the reddest): extinction steepens a spectrum
towards the blue, whereas an unobscured AGN whose hot dust (~1300 K) makes its near-IR rise
shows its blue accretion-disk continuum at the short-wavelength end — a spectrum that
flattens or falls there (the ~1 µm inflection of QSO SEDs; Glikman, Helfand & White 2006,
ApJ 640, 579).  The shapes are close where the dust outshines the disk over all of J and H
(z ≲ 0.2): this is a heuristic, and an AGN whose lines the redshift search missed can pass.
Measured on simulated SofI spectra with the programme's hot-dust near-IR excess (classified
through :func:`~specred.analysis.classify_spectrum`): 240 galaxies (z 0.02–0.2) and QSOs
(z 0.1–3): 10 QSOs became 'star' without the blue-end test, 1 with it; QSOs at z = 0.15: 8 of
8 pass the other tests, 2 of 8 all of them; 300 spectra of the SofI simulation mix: 0 false,
14 of the 14 YSOs at S/N >= 5.

Black bodies are a deliberate simplification: the H⁻ opacity minimum puts the peak of a
cool photosphere near 1.6 µm, a feature the reddening and dust terms partly absorb; the
fitted T*, E(B−V) and T_d are therefore descriptive (they are degenerate with each other
over 0.95–1.65 µm) and the decision rests on the model's slope β, not on them.  Checked on
real spectra resampled to SofI at S/N 10 and 30: Vega, the Sun and seven spectrophotometric
standards are all rejected (β −2.3 to −3); the real solar spectrum behind E(B−V) = 3 plus
a 1000 K dust excess is accepted with χ²_r equal to the spline's; behind E(B−V) = 3 without
dust it is not (β = 1.7: a reddened background star needs E(B−V) ≳ 3.5 to pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.interpolate import make_lsq_spline

from ..dust import ccm89_k
from . import lines as L
from .spectrum import AnalysisSpectrum

__all__ = ["DustyFit", "fit_dusty_continuum", "NIR_MIN_WAVE_AA"]

#: the test applies to spectra entirely redward of this (vacuum Å): the near-IR, where a
#: star's absorption lines are too weak to show and its continuum is the evidence
NIR_MIN_WAVE_AA = 9000.0
#: grid of the model
T_STAR_K = np.arange(3000.0, 7000.1, 250.0)
EBV_GRID = np.arange(0.0, 8.0001, 0.05)
T_DUST_K = np.arange(600.0, 1600.1, 100.0)
#: z = 0 lines of a young star measured on the residual (and kept out of the continuum)
YSO_LINES = ("Pa10", "Pa9", "Paepsilon", "Padelta", "HeI_10830", "Pagamma", "Pabeta", "Paalpha", "Brgamma")
LINE_MASK_AA = 25.0
#: minimum model slope d ln F_λ / d ln λ for a "rising" dusty continuum
MIN_SLOPE = 2.0
#: the smooth yardstick: cubic spline with knots every 7 % in λ (~900–1100 Å in J/H: it follows
#: any continuum, not lines of a few hundred Å)
SPLINE_KNOT_DLNL = 0.07
#: model accepted when chi2_r(model) <= chi2_ratio_max * chi2_r(spline)
CHI2_RATIO_MAX = 1.25
#: ... and at most this fraction of pixels more than 5σ off the spline (lines, Fe II)
MAX_OUTLIER_FRACTION = 0.01

_HC_K_CM = 1.438777       # hc/k in cm K


def _planck(wave_aa, t_k):
    """B_λ up to a constant (the amplitudes are free)."""
    lam = np.asarray(wave_aa, float) * 1e-8
    x = np.clip(_HC_K_CM / (lam * t_k), 1e-6, 700.0)
    return 1.0 / (lam ** 5 * np.expm1(x))


@dataclass(frozen=True)
class DustyFit:
    """Best reddened-photosphere + hot-dust model of a near-IR continuum.

    ``t_star`` (K), ``ebv`` (mag, with the Δχ² = 4 range ``ebv_range``), ``t_dust`` (K),
    ``dust_fraction`` (share of the model flux at the median wavelength from the dust),
    ``slope`` (d ln F_λ / d ln λ of the model over the fitted range; ``slope_blue`` and
    ``slope_red`` over its bluest and reddest quarter), ``chi2_r`` and
    ``chi2_r_smooth`` (the spline), ``n_pix``, ``lines`` (name -> S/N of a z = 0
    Gaussian of the instrumental width on the residual), ``accepted`` (model adequate, the
    spectrum smooth, slope >= ``MIN_SLOPE`` and steepest at the blue end) and ``reason``."""

    t_star: float
    ebv: float
    ebv_range: tuple
    t_dust: float
    dust_fraction: float
    slope: float
    slope_blue: float
    slope_red: float
    chi2_r: float
    chi2_r_smooth: float
    n_pix: int
    lines: dict = field(default_factory=dict)
    accepted: bool = False
    reason: str = ""

    def describe(self) -> str:
        det = [f"{L.label(n)} {s:.1f}σ" for n, s in self.lines.items() if s >= 2.0]
        return (f"near-IR continuum rising as F_λ ∝ λ^{self.slope:.1f}: a reddened photosphere "
                f"(T* ≈ {self.t_star:.0f} K, E(B−V) ≈ {self.ebv:.2f}) plus {self.t_dust:.0f} K dust "
                f"(χ²_r {self.chi2_r:.2f}, smooth-curve {self.chi2_r_smooth:.2f})"
                + (f"; z = 0 {', '.join(det)}" if det else "; no z = 0 line above 2σ"))


def fit_dusty_continuum(spec: AnalysisSpectrum, *, min_slope: float = MIN_SLOPE,
                        chi2_ratio_max: float = CHI2_RATIO_MAX) -> DustyFit | None:
    """Fit the reddened-photosphere + hot-dust model to a near-IR spectrum.

    Returns None when the spectrum is not entirely redward of ``NIR_MIN_WAVE_AA`` or has
    fewer than 50 usable pixels.  All grid points are evaluated at once (about 30,000
    models × the pixels, a few tens of ms)."""
    w_all = np.asarray(spec.wave, float)
    good = np.asarray(spec.good, bool) & np.isfinite(spec.flux) & (np.asarray(spec.sigma) > 0)
    if not good.any() or w_all[good].min() < NIR_MIN_WAVE_AA:
        return None
    line_w = {n: float(L.rest_vac([n])[0]) for n in YSO_LINES}
    keep = good.copy()
    for lw in line_w.values():
        keep &= np.abs(w_all - lw) > LINE_MASK_AA
    if keep.sum() < 50:
        return None
    w = w_all[keep]
    scale = float(np.median(np.abs(spec.flux[keep]))) or 1.0
    f = spec.flux[keep] / scale
    iv = (scale / spec.sigma[keep]) ** 2

    # basis: photosphere[T*, E(B-V), pix] and dust[T_d, pix], each normalised to unit weighted norm
    red = 10.0 ** (-0.4 * ccm89_k(w)[None, :] * EBV_GRID[:, None])            # (nE, n)
    star = _planck(w[None, :], T_STAR_K[:, None])                               # (nT, n)
    P = star[:, None, :] * red[None, :, :]                                      # (nT, nE, n)
    P /= np.sqrt(np.einsum("ten,n->te", P * P, iv))[..., None]
    D = _planck(w[None, :], T_DUST_K[:, None])
    D /= np.sqrt(D * D @ iv)[:, None]
    Py = np.einsum("ten,n->te", P, f * iv)
    Dy = D @ (f * iv)
    yy = float(f * f @ iv)
    PD = np.einsum("ten,dn->ted", P * iv, D)                                    # (nT, nE, nD)
    det = np.clip(1.0 - PD ** 2, 1e-12, None)
    a = (Py[..., None] - PD * Dy) / det
    b = (Dy - PD * Py[..., None]) / det
    chi2 = yy - (a * Py[..., None] + b * Dy)
    chi_p = yy - np.clip(Py, 0.0, None) ** 2                                     # photosphere alone
    chi_d = yy - np.clip(Dy, 0.0, None) ** 2                                     # dust alone
    single = np.minimum(chi_p[..., None], chi_d[None, None, :])
    chi2 = np.where((a < 0) | (b < 0), single, chi2)
    it, ie, idd = np.unravel_index(int(np.argmin(chi2)), chi2.shape)
    if a[it, ie, idd] >= 0 and b[it, ie, idd] >= 0:
        ca, cb = a[it, ie, idd], b[it, ie, idd]
    elif chi_p[it, ie] <= chi_d[idd]:
        ca, cb = max(Py[it, ie], 0.0), 0.0
    else:
        ca, cb = 0.0, max(Dy[idd], 0.0)
    m_star, m_dust = ca * P[it, ie], cb * D[idd]
    model = m_star + m_dust
    prof = chi2.min(axis=(0, 2))
    erange = EBV_GRID[prof <= prof.min() + 4.0]
    slope, slope_blue, slope_red = _slopes(w, model)
    mid = len(w) // 2
    dust_fraction = float(m_dust[mid] / model[mid]) if model[mid] > 0 else float("nan")
    # the yardstick: a weighted least-squares cubic spline in ln λ, knots every 7 % in λ
    x = np.log(w)
    n_int = max(2, int(np.ceil((x[-1] - x[0]) / SPLINE_KNOT_DLNL)))
    inner = np.linspace(x[0], x[-1], n_int + 1)[1:-1]
    knots = np.r_[[x[0]] * 4, inner, [x[-1]] * 4]
    smooth = make_lsq_spline(x, f, knots, k=3, w=np.sqrt(iv))(x)
    z_s = (f - smooth) * np.sqrt(iv)
    chi_s = float(np.sum(z_s ** 2))
    outliers = float(np.mean(np.abs(z_s) > 5.0))
    n = int(keep.sum())
    chi2_r, chi2_r_s = float(chi2[it, ie, idd]) / max(n - 5, 1), chi_s / max(n - 4, 1)

    # z = 0 lines on the residual of the model interpolated over the masked windows
    model_all = np.interp(w_all, w, model) * scale
    resid = spec.flux - model_all
    lsf = spec.lsf_sigma_at(np.array(list(line_w.values())))
    line_snr = {}
    for (name, lw), sig_kms in zip(line_w.items(), lsf):
        sig = lw * (sig_kms if np.isfinite(sig_kms) else 150.0) / 299792.458
        sel = good & (np.abs(w_all - lw) < 4 * sig)
        if sel.sum() < 3:
            continue
        g = np.exp(-0.5 * ((w_all[sel] - lw) / sig) ** 2)
        ivl = 1.0 / spec.sigma[sel] ** 2
        line_snr[name] = float(np.sum(resid[sel] * g * ivl) / np.sqrt(np.sum(g * g * ivl)))
    adequate = chi2_r <= chi2_ratio_max * chi2_r_s
    smooth = outliers <= MAX_OUTLIER_FRACTION
    red_enough = np.isfinite(slope) and slope >= min_slope
    no_blue = np.isfinite(slope_blue) and slope_blue >= slope_red
    accepted = bool(adequate and smooth and red_enough and no_blue)
    if accepted:
        why = "accepted"
    elif not red_enough:
        why = f"continuum slope {slope:.1f} < {min_slope:.1f}: not a dust-reddened source"
    elif not no_blue:
        why = (f"slope {slope_blue:.1f} at the blue end < {slope_red:.1f} at the red end: a blue continuum "
               f"under hot dust (an AGN), not extinction")
    elif not smooth:
        why = f"{100 * outliers:.0f} % of the pixels > 5σ off a smooth curve: lines, not a bare continuum"
    else:
        why = f"model χ²_r {chi2_r:.2f} > {chi2_ratio_max} × smooth-curve {chi2_r_s:.2f}"
    return DustyFit(float(T_STAR_K[it]), float(EBV_GRID[ie]), (float(erange.min()), float(erange.max())),
                    float(T_DUST_K[idd]), dust_fraction, slope, slope_blue, slope_red, chi2_r, chi2_r_s, n,
                    line_snr, accepted, why)


def _slopes(w, model):
    """d ln F / d ln λ of the model over all pixels and over the bluest and reddest quarter."""
    out = []
    q = len(w) // 4
    for sel in (slice(None), slice(0, q), slice(len(w) - q, None)):
        ww, mm = w[sel], model[sel]
        pos = mm > 1e-6 * np.abs(model).max()
        out.append(float(np.polyfit(np.log(ww[pos]), np.log(mm[pos]), 1)[0]) if pos.sum() > 10 else float("nan"))
    return tuple(out)
