"""Compare a reduced simulated night with the simulator's truth.

Used by the tests and the benchmark to measure what the issues ask of a reduction:
wavelength zero point, flux-calibration accuracy, telluric residuals, S/N against the
optimal-extraction limit, cosmic rays removed and emission lines kept.

All comparisons are in the product's medium (EFOSC2: air Å) and on the product's pixels;
the truth spectrum (1 Å sampling, no instrumental broadening) is convolved with the
instrumental line-spread function and averaged over each pixel first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from astropy.table import Table
from scipy.ndimage import gaussian_filter1d

from .. import calib

__all__ = ["Truth", "expected_optimal_snr", "evaluate_spectrum", "cosmic_ray_recovery"]


class Truth:
    """The ``truth/`` folder of a simulated night."""

    def __init__(self, sim_out):
        self.root = Path(sim_out) / "truth"
        self.frames = Table.read(self.root / "frames.ecsv")
        self.targets = Table.read(self.root / "targets.ecsv")
        self.lines = Table.read(self.root / "lines.ecsv")
        self.optics = yaml.safe_load((self.root / "optics.yaml").read_text())

    def frame(self, name: str):
        sel = self.frames[self.frames["file"] == Path(name).name]
        if len(sel) != 1:
            raise KeyError(f"{name} is not a frame of this simulated night")
        return sel[0]

    def wavelength(self, instrument: str, frame: str, y_raw, x_raw) -> np.ndarray:
        """True wavelength (Å, instrument medium) at raw pixel positions of ``frame``."""
        o = self.optics[instrument]
        f = float(self.frame(frame)["flexure_px"])
        dx = np.asarray(x_raw, float) - o["x_centre"]
        u = np.asarray(y_raw, float) - (o["tilt"][0] * dx + o["tilt"][1] * dx**2) - f
        return np.polyval(o["dispersion_poly"], u)

    def spectrum(self, obj: str, instrument: str) -> Table:
        return Table.read(self.root / "spectra" / f"{obj}_{instrument}.ecsv")

    def expected(self, frame: str) -> dict:
        with np.load(self.root / "expected" / (Path(frame).name[:-5] + ".npz")) as z:
            return {k: z[k] for k in z.files}

    def cosmics(self, frame: str) -> dict | None:
        p = self.root / "cosmics" / (Path(frame).name[:-5] + ".npz")
        if not p.exists():
            return None
        with np.load(p) as z:
            return {k: z[k] for k in z.files}


def truth_on_pixels(truth_wave, truth_flux, wave, fwhm_px: float) -> np.ndarray:
    """Truth f_λ convolved with a Gaussian LSF of ``fwhm_px`` product pixels and averaged
    over each pixel of ``wave`` (increasing)."""
    disp = np.gradient(wave)
    step = float(np.median(np.diff(truth_wave)))
    sig_aa = fwhm_px * np.median(disp) / 2.3548
    sm = gaussian_filter1d(np.asarray(truth_flux, float), sig_aa / step, mode="nearest")
    edges = np.r_[wave[0] - disp[0] / 2, 0.5 * (wave[1:] + wave[:-1]), wave[-1] + disp[-1] / 2]
    cum = np.r_[0.0, np.cumsum(sm) * step]
    xw = np.r_[truth_wave[0] - step / 2, truth_wave + step / 2]
    c = np.interp(edges, xw, cum)
    return np.diff(c) / np.diff(edges)


def expected_optimal_snr(exp: dict, rows_raw: np.ndarray, half_width: float = 15.0) -> np.ndarray:
    """S/N per row that an optimal extraction reaches on the noiseless truth (Horne 1986):
    S/N² = Σ_x (F P_x)² / (F P_x + S + D + RN²), P the Gaussian profile integrated over
    each pixel, S and D the sky and dark per pixel, RN the read noise (all e-)."""
    from scipy.special import erf

    r = np.asarray(rows_raw, int)
    F = exp["object_e"][r]
    xc, sig = exp["x_centre"][r], exp["sigma_px"][r]
    x = np.arange(-int(half_width) - 1, int(half_width) + 2)[None, :] + np.round(xc)[:, None]
    a = (x - 0.5 - xc[:, None]) / (np.sqrt(2) * sig[:, None])
    b = (x + 0.5 - xc[:, None]) / (np.sqrt(2) * sig[:, None])
    P = 0.5 * (erf(b) - erf(a))
    bg = (exp["sky_e"][r] + exp["dark_e"][r] + float(exp["read_noise_e"]) ** 2)[:, None]
    return np.sqrt(np.sum((F[:, None] * P) ** 2 / (F[:, None] * P + bg), axis=1))


@dataclass
class SpectrumScore:
    zero_point_aa: float
    flux_mad: float
    flux_level: float
    aband_residual: float
    aband_noise: float
    aband_chi: float
    snr_ratio: float
    chi_scatter: float
    line_ratios: dict


def _outside_bands(wave, lo=4000.0, hi=9000.0):
    good = (wave > lo) & (wave < hi)
    from ..reduce.fluxcal import telluric_band_list

    for w0, w1, _ in telluric_band_list("air"):
        good &= ~((wave > w0 - 20) & (wave < w1 + 20))
    return good


def _binned_ratio_mad(flux, truth_flux, sel, bin_px: int, level: float) -> float:
    """Median |ratio/level − 1| of flux/truth summed in consecutive bins of ``bin_px``
    selected pixels: the calibration error, not the pixel noise."""
    idx = np.flatnonzero(sel)
    idx = idx[:len(idx) // bin_px * bin_px].reshape(-1, bin_px)
    rb = flux[idx].sum(axis=1) / truth_flux[idx].sum(axis=1)
    return float(np.median(np.abs(rb / level - 1.0)))


def evaluate_spectrum(truth: Truth, rs, instrument: str = "EFOSC2", lsf_fwhm_px: float | None = None,
                      c0: int = 0, bin_px: int = 20) -> SpectrumScore:
    """Score one reduced spectrum (:class:`specred.pipeline.ReducedSpectrum`) against truth.

    ``c0`` is the raw column of trimmed column 0 (the trace is in trimmed columns).
    """
    fs = rs.frames[0]
    name = Path(fs.info.path).name
    rows_raw = fs.rows  # EFOSC2 trimming keeps the raw rows
    lam_true = truth.wavelength(instrument, name, rows_raw, fs.x + c0)
    good = ~rs.mask
    zp = float(np.median((fs.wave - lam_true)[good])) if len(rs.frames) == 1 else float("nan")
    ts = truth.spectrum(rs.target, instrument)
    fwhm = lsf_fwhm_px or float(truth.optics[instrument]["lsf_fwhm_px"])
    # seeing through the slit broadens lines beyond the LSF little at R~400; use the LSF
    tp = truth_on_pixels(np.asarray(ts["wavelength"], float), np.asarray(ts["flux"], float), lam_true, fwhm)
    ratio = rs.flux / tp
    sel = good & _outside_bands(rs.wave) & np.isfinite(ratio) & (tp > 0)
    level = float(np.median(ratio[sel]))
    mad = _binned_ratio_mad(rs.flux, tp, sel, bin_px, level)
    # A band (O2 7594-7680 Å air, the saturated head and the P branch): flux / truth in
    # the band relative to flux / truth on the continuum either side (7450-7580, 7710-7840)
    aband = (rs.wave > 7594) & (rs.wave < 7680) & good
    sideb = (((rs.wave > 7450) & (rs.wave < 7580)) | ((rs.wave > 7710) & (rs.wave < 7840))) & good
    ab = float((np.sum(rs.flux[aband]) / np.sum(tp[aband]))
               / (np.sum(rs.flux[sideb]) / np.sum(tp[sideb])) - 1.0) if aband.sum() > 3 else float("nan")
    ab_chi = float(np.sqrt(np.mean(((rs.flux - level * tp)[aband] / rs.sigma[aband]) ** 2)))
    ab_noise = float(np.sqrt(np.sum(rs.sigma[aband] ** 2)) / np.sum(rs.flux[aband])) if aband.sum() > 3 \
        else float("nan")
    # S/N: reported vs the optimal limit, over 6000-6200 Å
    win = (rs.wave > 6000) & (rs.wave < 6200) & good
    exp = truth.expected(name)
    snr_exp = expected_optimal_snr(exp, rows_raw[win], half_width=15.0)
    snr_got = fs.counts[win] / np.sqrt(fs.var[win])
    snr_ratio = float(np.median(snr_got) / np.median(snr_exp))
    # honesty of the errors: scatter of (data - truth)/sigma on line-free continuum
    chi = (rs.flux - level * tp) / rs.sigma
    chi_scatter = float(1.4826 * np.median(np.abs(chi[sel] - np.median(chi[sel]))))
    # emission lines: flux lost or gained over a window of +-3 LSF FWHM around each line,
    # relative to the injected flux of the lines in that window (a clipped line loses
    # flux; a window is wide enough that the exact line shape does not matter)
    lr = {}
    lt = truth.lines[(truth.lines["object_id"] == rs.target) & ~truth.lines["broad"]]
    lam_all = np.asarray(calib.vacuum_to_air(np.asarray(lt["obs_vac"], float)), float)
    dl_all = np.gradient(rs.wave)
    for ln, lam in zip(lt, lam_all):
        if not rs.wave[0] + 60 < lam < rs.wave[-1] - 60:
            continue
        hw = 3.0 * fwhm * float(np.interp(lam, rs.wave, dl_all))
        inl = np.abs(rs.wave - lam) < hw
        if np.any(rs.mask[inl]):
            continue
        f_lines = float(np.sum(np.asarray(lt["flux"], float)[np.abs(lam_all - lam) < hw]))
        delta = float(np.sum((rs.flux[inl] - level * tp[inl]) * dl_all[inl]))
        err = float(np.sqrt(np.sum((rs.sigma[inl] * dl_all[inl]) ** 2)))
        if f_lines > 5 * err:
            lr[str(ln["line"])] = (1.0 + delta / level / f_lines, err / level / f_lines)
    return SpectrumScore(zp, mad, level, ab, ab_noise, ab_chi, snr_ratio, chi_scatter, lr)


def cosmic_ray_recovery(truth: Truth, fs, c0: int, r0: int = 0, nsigma: float = 5.0) -> tuple[float, int]:
    """Fraction of the injected cosmic-ray pixels that the reduction flagged.

    Only pixels whose deposit exceeds ``nsigma`` times the local noise can be found by
    any method; those are counted.  Returns (fraction, number counted).
    """
    cr = truth.cosmics(Path(fs.info.path).name)
    if cr is None or fs.rejected is None:
        return float("nan"), 0
    ny, nx = fs.rejected.shape
    y, x, e = cr["y"] - r0, cr["x"] - c0, cr["e"]
    inside = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
    y, x, e = y[inside], x[inside], e[inside]
    exp = truth.expected(Path(fs.info.path).name)
    noise = np.sqrt(np.median(exp["sky_e"]) + float(exp["read_noise_e"]) ** 2)
    strong = e > nsigma * noise
    if not strong.any():
        return float("nan"), 0
    return float(np.mean(fs.rejected[y[strong], x[strong]])), int(strong.sum())


@dataclass
class SofiScore:
    zero_point_aa: float
    flux_mad: float
    flux_level: float
    hydrogen_residual: dict
    oh_residual: float


def evaluate_sofi_spectrum(truth: Truth, rs, c0: int = 29, bin_px: int = 20,
                           min_transmission: float = 0.2) -> SofiScore:
    """Score a reduced SofI target against truth: wavelength zero point (vacuum Å), binned
    continuum ratio (outside masked pixels and where the telluric transmission is above
    0.8), absolute level, and the residual left by the A0V star's Paβ/Paγ lines (flux/truth
    within ±1 LSF FWHM of the line over the same beside it)."""
    fs = rs.frames[0]
    name = Path(fs.info.path).name
    lam_fs = truth.wavelength("SOFI", name, fs.rows, fs.x + c0)
    zp = float(np.median((fs.wave - lam_fs)[~fs.mask]))
    flip = fs.wave[0] > fs.wave[-1]
    lam_true = lam_fs[::-1] if flip else lam_fs
    ts = truth.spectrum(rs.target, "SOFI")
    fwhm = float(truth.optics["SOFI"]["lsf_fwhm_px"])
    tp = truth_on_pixels(np.asarray(ts["wavelength"], float), np.asarray(ts["flux"], float), lam_true, fwhm)
    good = ~rs.mask & np.isfinite(rs.flux) & (tp > 0)
    tmodel = calib.telluric_transmission(rs.wave, airmass=float(fs.info.airmass), medium="vacuum")
    tmodel = gaussian_filter1d(tmodel, fwhm)
    sel = good & (tmodel > 0.8) & (rs.wave > 9700) & (rs.wave < 16200)
    ratio = rs.flux / tp
    level = float(np.median(ratio[sel]))
    mad = _binned_ratio_mad(rs.flux, tp, sel, bin_px, level)
    hres = {}
    disp = float(np.median(np.abs(np.diff(rs.wave))))
    for label, lam in (("Pabeta", 12821.59), ("Pagamma", 10941.09)):
        core = good & (np.abs(rs.wave - lam) < fwhm * disp)
        side = good & (np.abs(rs.wave - lam) > 2 * fwhm * disp) & (np.abs(rs.wave - lam) < 6 * fwhm * disp)
        if core.sum() >= 2 and side.sum() >= 4:
            r = (np.sum(rs.flux[core]) / np.sum(tp[core])) / (np.sum(rs.flux[side]) / np.sum(tp[side])) - 1.0
            noise = np.sqrt(np.sum(rs.sigma[core] ** 2)) / np.sum(rs.flux[core])
            hres[label] = (float(r), float(noise))
    return SofiScore(zp, mad, level, hres, float(getattr(fs, "oh_residual", np.nan)))
