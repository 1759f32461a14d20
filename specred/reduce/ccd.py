"""CCD/IR detector basics on arrays: bias level, trimming, gain, variance, bias and flat
masters, bad pixels, cosmic rays.

Instrument-agnostic: geometry (sections, gain, read noise) comes in as a
:class:`specred.instruments.base.DetectorGeometry`; nothing here reads a header.
Images are (ny, nx) with the dispersion along axis 0.  Frames are returned as
``astropy.nddata.CCDData`` in electrons with a ``VarianceUncertainty`` (e-^2) and a
boolean mask (True = bad), so variance is carried through every later step.
"""
from __future__ import annotations

import logging

import numpy as np
import astropy.units as u
from astropy.nddata import CCDData, VarianceUncertainty
from astropy.stats import sigma_clip
from scipy.ndimage import median_filter, uniform_filter1d

from ..errors import CalibrationError

log = logging.getLogger(__name__)

__all__ = ["bias_level", "process_frame", "master_bias", "master_flat", "detect_cosmics",
           "combine_mean_clipped"]


def bias_level(raw: np.ndarray, geometry) -> tuple[float, float]:
    """Bias level (ADU) and its scatter from the overscan (or prescan) region.

    A sigma-clipped median of the overscan rows (EFOSC2: 6 rows at the top), falling back
    to the prescan columns; (0, 0) when the detector has neither (SofI).
    """
    regions = [r for r in (geometry.overscan, geometry.prescan) if r is not None]
    if not regions:
        return 0.0, 0.0
    vals = np.concatenate([np.asarray(raw[r], dtype=float).ravel() for r in regions])
    # skip the first/last row or column of each region (transition pixels)
    clipped = sigma_clip(vals, sigma=4, maxiters=3, masked=True)
    return float(np.ma.median(clipped)), float(np.ma.std(clipped))


def process_frame(raw: np.ndarray, geometry, *, master_bias: CCDData | None = None,
                  bad_pixels: np.ndarray | None = None, trim: bool = True,
                  dark_rate: float = 0.0, exptime: float = 0.0) -> CCDData:
    """Raw ADU frame -> trimmed frame in electrons with variance.

    Steps: subtract the overscan level; subtract the master bias residual structure (if
    given, already overscan-corrected); trim to ``geometry.trim_section``; multiply by the
    gain (e-/ADU); variance = read_noise^2 + max(signal, 0) (Poisson) plus the master-bias
    variance; saturated pixels (>= geometry.saturation ADU in the raw frame) and
    ``bad_pixels`` are masked.
    """
    raw = np.asarray(raw, dtype=np.float32)
    level, _ = bias_level(raw, geometry)
    sat = raw >= geometry.saturation
    data = raw - np.float32(level)
    sect = geometry.trim_section if trim else (slice(None), slice(None))
    data = data[sect]
    sat = sat[sect]
    var_extra = 0.0
    if master_bias is not None:
        if master_bias.data.shape != data.shape:
            raise CalibrationError(f"master bias shape {master_bias.data.shape} differs from frame {data.shape}")
        data = data - master_bias.data.astype(np.float32)
        if master_bias.uncertainty is not None:
            var_extra = (master_bias.uncertainty.array * geometry.gain**2).astype(np.float32)
    g = np.float32(geometry.gain)
    data_e = data * g
    if dark_rate and exptime:
        data_e -= np.float32(dark_rate * exptime)
    variance = np.float32(geometry.read_noise**2) + np.clip(data_e, 0, None) + var_extra
    mask = sat.copy()
    if bad_pixels is not None:
        mask |= bad_pixels
    return CCDData(data_e, unit=u.electron, uncertainty=VarianceUncertainty(variance), mask=mask)


def combine_mean_clipped(stack: np.ndarray, sigma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Sigma-clipped mean of a (n, ny, nx) stack (clip around the median, MAD scale).

    Returns (mean, variance of the mean).  Vectorised: one median/MAD pass.
    """
    med = np.median(stack, axis=0)
    mad = 1.4826 * np.median(np.abs(stack - med), axis=0)
    scale = np.maximum(mad, 1e-6)
    good = np.abs(stack - med) <= sigma * scale
    n = good.sum(axis=0)
    n_safe = np.maximum(n, 1)
    mean = np.where(good, stack, 0.0).sum(axis=0) / n_safe
    resid = np.where(good, stack - mean, 0.0)
    var = (resid**2).sum(axis=0) / np.maximum(n - 1, 1) / n_safe
    mean = np.where(n > 0, mean, med)
    return mean.astype(np.float32), var.astype(np.float32)


def master_bias(raws: list[np.ndarray], geometry, method: str = "ccdproc") -> CCDData:
    """Master bias in ADU (overscan-subtracted, trimmed): sigma-clipped mean of the frames.

    ``method='ccdproc'`` uses :func:`ccdproc.combine` (sigma clipping 3σ around the median);
    ``'numpy'`` a vectorised equivalent (same algorithm, less memory). The variance is the
    variance of the mean (ADU^2).
    """
    if len(raws) < 3:
        raise CalibrationError(f"need at least 3 bias frames for a master bias, got {len(raws)}")
    frames = []
    for r in raws:
        level, _ = bias_level(r, geometry)
        frames.append((np.asarray(r, np.float32) - np.float32(level))[geometry.trim_section])
    if method == "ccdproc":
        import ccdproc

        ccds = [CCDData(f, unit=u.adu) for f in frames]
        comb = ccdproc.combine(ccds, method="average", sigma_clip=True, sigma_clip_low_thresh=3,
                               sigma_clip_high_thresh=3, sigma_clip_func=np.ma.median,
                               sigma_clip_dev_func=np.ma.std, dtype=np.float32)
        stack = np.stack(frames)
        var = np.var(stack, axis=0, ddof=1) / len(frames)
        return CCDData(comb.data.astype(np.float32), unit=u.adu,
                       uncertainty=VarianceUncertainty(var.astype(np.float32)))
    mean, var = combine_mean_clipped(np.stack(frames))
    return CCDData(mean, unit=u.adu, uncertainty=VarianceUncertainty(var))


def master_flat(flats: list[CCDData], *, spectral_smooth: int = 31, slit_range: tuple[int, int] | None = None,
                min_level: float = 0.05) -> tuple[CCDData, np.ndarray]:
    """Normalised spectroscopic flat keeping pixel response and slit illumination.

    The flats (e-, bias-subtracted; for SofI lamp-on minus lamp-off) are combined
    (sigma-clipped mean), then divided by the lamp spectrum: the average response along the
    slit at each row (dispersion), smoothed along the dispersion.  What remains is the
    pixel-to-pixel response times the slit illumination profile (normalised to 1 over the
    illuminated slit).  Pixels where the lamp is too faint (< ``min_level`` of the median)
    are set to 1 and flagged.

    Returns (flat, low_mask).
    """
    if not flats:
        raise CalibrationError("no flat frames to combine")
    stack = np.stack([f.data for f in flats]).astype(np.float32)
    mean, var = combine_mean_clipped(stack) if len(flats) >= 3 else (stack.mean(axis=0), stack.var(axis=0) / len(flats))
    ny, nx = mean.shape
    c0, c1 = slit_range if slit_range else (0, nx)
    # lamp spectrum: robust mean over the central part of the slit, per row
    core = mean[:, c0 + (c1 - c0) // 5: c1 - (c1 - c0) // 5]
    lamp = np.median(core, axis=1)
    lamp = uniform_filter1d(median_filter(lamp, 5, mode="nearest"), spectral_smooth, mode="nearest") \
        if spectral_smooth > 1 else lamp
    lamp = np.where(lamp > 0, lamp, np.nan)
    norm = mean / lamp[:, None]
    ref = np.nanmedian(norm[:, c0:c1])
    norm = norm / ref
    low = ~np.isfinite(norm) | (mean < min_level * np.nanmedian(core))
    norm = np.where(low, 1.0, norm).astype(np.float32)
    nvar = np.where(low, 0.0, var / (lamp[:, None] * ref) ** 2).astype(np.float32)
    nvar = np.nan_to_num(nvar, nan=0.0)
    return CCDData(norm, unit=u.dimensionless_unscaled, uncertainty=VarianceUncertainty(nvar), mask=low), low


def apply_flat(ccd: CCDData, flat: CCDData) -> CCDData:
    """Divide by a normalised flat, propagating both variances."""
    f = flat.data
    data = ccd.data / f
    var = ccd.uncertainty.array / f**2 + (ccd.data**2) * flat.uncertainty.array / f**4
    mask = (ccd.mask if ccd.mask is not None else False) | (flat.mask if flat.mask is not None else False)
    return CCDData(data.astype(np.float32), unit=ccd.unit, uncertainty=VarianceUncertainty(var.astype(np.float32)),
                   mask=np.asarray(mask, bool))


def detect_cosmics(ccd: CCDData, *, read_noise: float, sigclip: float = 5.0, objlim: float = 5.0,
                   sigfrac: float = 0.3, niter: int = 2, satlevel: float = np.inf) -> np.ndarray:
    """L.A.Cosmic (van Dokkum 2001) via astroscrappy; returns the cosmic-ray mask.

    Data must be in electrons (gain = 1).  ``objlim`` protects sharp real features such as
    emission lines (the fine-structure contrast test); frames are cleaned only where masked.
    """
    import astroscrappy

    inmask = ccd.mask if ccd.mask is not None else None
    crmask, _ = astroscrappy.detect_cosmics(
        np.asarray(ccd.data, np.float32), inmask=inmask, sigclip=sigclip, sigfrac=sigfrac, objlim=objlim,
        gain=1.0, readnoise=read_noise, satlevel=satlevel, niter=niter, cleantype="medmask",
        sepmed=True, fsmode="median")
    return crmask
