"""Object detection and trace fitting on long-slit frames.

Instrument-agnostic algorithms on numpy arrays.  Frames are ``(ny, nx)`` arrays with the
dispersion along axis 0 (rows) and the slit along axis 1 (columns); every function takes
``data`` (e-), ``variance`` (e^2, same shape) and a boolean ``mask`` (True = bad).

* :func:`find_objects` collapses the frame along the dispersion (median of row blocks, so
  emission lines and cosmic rays do not dominate), removes a smooth sky baseline and
  returns the significant peaks of the spatial profile with their S/N.
* :func:`choose_object` picks the brightest candidate, or the one nearest an expected column.
* :func:`fit_trace` measures the object centre in bins of rows with a batched Gaussian +
  linear-baseline fit (Gauss-Newton on all bins at once), rejects faint and deviant bins,
  and fits a Legendre polynomial ``x(y)``; outside the rows where the object was measured
  the trace follows a global (at most quadratic) fit of the same bins, joined to the
  polynomial at the last measured row, so a faint blue end does not make a cubic run away.

References
----------
Horne, K. 1986, PASP 98, 609 (optimal extraction; the trace/profile geometry used here).
Marsh, T. R. 1989, PASP 101, 1032 (curved traces).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial import legendre as L
from scipy.ndimage import gaussian_filter1d, median_filter
from scipy.signal import find_peaks

from ..errors import SpecredError

log = logging.getLogger(__name__)

__all__ = ["Trace", "find_objects", "choose_object", "fit_trace"]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# variance of the median of n Gaussian samples ~ (pi/2) sigma^2 / n
_MEDIAN_VAR_FACTOR = np.pi / 2.0


@dataclass(frozen=True, eq=False)
class Trace:
    """The centre of a spectrum on the detector, ``x(y)``.

    Attributes
    ----------
    coeffs : ndarray
        Legendre coefficients of ``x`` as a function of ``y`` normalised to [-1, 1] over the
        frame rows (``yn = 2 y / (ny - 1) - 1``), see :mod:`numpy.polynomial.legendre`.
    ny : int
        Number of rows of the frame.
    fwhm : float
        Median spatial FWHM (pixels) of the Gaussian fits to the binned profiles.
    snr : float
        Integrated S/N of the object over the bins used (quadrature sum of the bin S/N).
    y_fit : tuple of float, optional
        First and last row (bin centres) where the object was measured.  Outside this range
        :meth:`x` follows ``ext_coeffs`` (joined continuously to the fit), or continues the
        polynomial linearly when ``ext_coeffs`` is None.  ``y_fit`` None: the polynomial
        everywhere.
    rms : float
        RMS (pixels) of the accepted bin centres about the fit.
    n_bins : int
        Number of row bins used in the fit.
    sign : int
        +1 for a positive beam, -1 for a negative beam of a nod-subtracted frame.
    ext_coeffs : ndarray, optional
        Legendre coefficients (same normalisation) of a low-order (at most quadratic) fit to
        the same bins, used to extrapolate beyond ``y_fit``: the global curvature is far
        better determined than the end-point curvature of the higher-order fit.
    """

    coeffs: np.ndarray
    ny: int
    fwhm: float
    snr: float
    y_fit: tuple[float, float] | None = None
    rms: float = float("nan")
    n_bins: int = 0
    sign: int = 1
    ext_coeffs: np.ndarray | None = None
    bins: dict = field(default_factory=dict, compare=False, repr=False)

    def _norm(self, y: np.ndarray) -> np.ndarray:
        return 2.0 * y / max(self.ny - 1, 1) - 1.0

    def x(self, y=None) -> np.ndarray:
        """Centre column at rows ``y`` (all rows ``0 .. ny-1`` when None)."""
        y = np.arange(self.ny, dtype=float) if y is None else np.asarray(y, dtype=float)
        x = L.legval(self._norm(y), self.coeffs)
        if self.y_fit is not None:
            dcoef = L.legder(self.coeffs)
            scale = 2.0 / max(self.ny - 1, 1)
            for yb, side in ((self.y_fit[0], y < self.y_fit[0]), (self.y_fit[1], y > self.y_fit[1])):
                if np.any(side):
                    ybn = self._norm(np.float64(yb))
                    x0 = L.legval(ybn, self.coeffs)
                    if self.ext_coeffs is not None:
                        ext = x0 + L.legval(self._norm(y), self.ext_coeffs) - L.legval(ybn, self.ext_coeffs)
                    else:
                        ext = x0 + L.legval(ybn, dcoef) * scale * (y - yb)
                    x = np.where(side, ext, x)
        return x

    def shifted(self, dx: float) -> "Trace":
        """The same trace moved by ``dx`` columns (e.g. the other beam of a nod pair)."""
        c = np.array(self.coeffs, dtype=float).copy()
        c[0] += dx
        e = None
        if self.ext_coeffs is not None:
            e = np.array(self.ext_coeffs, dtype=float).copy()
            e[0] += dx
        return Trace(c, self.ny, self.fwhm, self.snr, self.y_fit, self.rms, self.n_bins, self.sign, e)


# ----------------------------------------------------------------------------------------
# helpers


def _prepare(data, variance, mask):
    data = np.asarray(data, dtype=float)
    variance = np.asarray(variance, dtype=float)
    if data.ndim != 2 or variance.shape != data.shape:
        raise ValueError(f"data and variance must be 2D arrays of the same shape, got {data.shape} "
                         f"and {variance.shape}")
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if bad.shape != data.shape:
        raise ValueError(f"mask shape {bad.shape} differs from data shape {data.shape}")
    bad = bad | ~np.isfinite(data) | ~np.isfinite(variance) | (variance <= 0)
    return data, variance, bad


def _slices(shape, row_range, col_range):
    ny, nx = shape
    r0, r1 = (0, ny) if row_range is None else (max(0, int(row_range[0])), min(ny, int(row_range[1])))
    c0, c1 = (0, nx) if col_range is None else (max(0, int(col_range[0])), min(nx, int(col_range[1])))
    if r1 - r0 < 1 or c1 - c0 < 1:
        raise SpecredError(f"empty region: rows {row_range}, columns {col_range} of a {shape} frame")
    return r0, r1, c0, c1


def _block_median(d: np.ndarray, v: np.ndarray, bad: np.ndarray, block: int):
    """Median over blocks of ``block`` rows -> (nblock, nx) profile, variance, good count."""
    n = d.shape[0] // block
    if n < 1:
        block, n = d.shape[0], 1
    ny = n * block
    dd = np.where(bad[:ny], np.nan, d[:ny]).reshape(n, block, -1)
    vv = np.where(bad[:ny], np.nan, v[:ny]).reshape(n, block, -1)
    ngood = np.sum(~bad[:ny].reshape(n, block, -1), axis=1)
    if not bad[:ny].any():
        med = np.median(dd, axis=1)
    else:
        # NaN-aware median by sorting (NaN sort last); faster than np.nanmedian here
        srt = np.sort(dd, axis=1)
        lo = np.clip((ngood - 1) // 2, 0, block - 1)[:, None, :]
        hi = np.clip(ngood // 2, 0, block - 1)[:, None, :]
        med = 0.5 * (np.take_along_axis(srt, lo, axis=1) + np.take_along_axis(srt, hi, axis=1))[:, 0, :]
    with np.errstate(all="ignore"):
        var = _MEDIAN_VAR_FACTOR * np.sum(np.where(np.isnan(vv), 0.0, vv), axis=1) / np.maximum(ngood, 1) ** 2
    var = np.where(ngood > 0, var, np.inf)
    med = np.where(ngood > 0, med, 0.0)
    return med, var, ngood, block


def _baseline(p: np.ndarray, sig: np.ndarray, width: int) -> np.ndarray:
    """Smooth sky baseline of a spatial profile: running median with peaks (both signs)
    masked and interpolated over, two passes."""
    n = p.size
    width = int(min(width, max(3, (n // 2) * 2 - 1)))
    x = np.arange(n)
    base = median_filter(p, size=width, mode="nearest")
    for _ in range(2):
        r = (p - base) / sig
        mad = 1.4826 * np.median(np.abs(r - np.median(r)))
        peak = np.abs(r) > 3.0 * max(mad, 1.0)
        # dilate the peak mask by a few pixels so the wings are excluded too
        peak = np.convolve(peak.astype(float), np.ones(7), mode="same") > 0
        if peak.all() or not peak.any():
            break
        pi = np.interp(x, x[~peak], p[~peak])
        base = median_filter(pi, size=width, mode="nearest")
    return gaussian_filter1d(base, 2.0, mode="nearest")


def _gauss_fit_1d(x: np.ndarray, y: np.ndarray, w: np.ndarray, x0: float, s0: float,
                  niter: int = 20) -> tuple[float, float, float]:
    """Least-squares Gaussian + linear baseline fit of one profile; returns (mu, sigma, amp)."""
    res = _batched_gauss_fit(x[None], y[None], w[None], np.array([x0]), np.array([s0]),
                             niter=niter, max_step=1.0, xlim=(x.min(), x.max()))
    return float(res["mu"][0]), float(res["sigma"][0]), float(res["amp"][0])


def _batched_gauss_fit(x, y, w, mu0, s0, *, niter=15, max_step=1.0, xlim=None,
                       smin=0.4, smax=None):
    """Batched weighted fit of ``A exp(-(x-mu)^2 / 2 s^2) + b0 + b1 (x - xm)`` to rows of
    ``(nb, W)`` arrays with Gauss-Newton (Levenberg damped) iterations on all rows at once.

    Parameters
    ----------
    x, y, w : ndarray, shape (nb, W)
        Positions, values and weights (1/variance, 0 = ignore).
    mu0, s0 : ndarray, shape (nb,)
        Initial centre and sigma.

    Returns
    -------
    dict with ``amp, mu, sigma, b0, b1`` (nb,), ``cov`` (nb, 5, 5) scaled by the reduced
    chi^2 when that exceeds 1, ``chi2r`` and ``ok`` (converged inside limits).
    """
    nb, W = x.shape
    smax = smax if smax is not None else 0.25 * (x.max(axis=1) - x.min(axis=1)).mean()
    xm = np.sum(w * x, axis=1) / np.maximum(np.sum(w, axis=1), 1e-300)
    mu = mu0.astype(float).copy()
    s = np.clip(s0.astype(float).copy(), smin, smax)

    def linear(mu, s):
        g = np.exp(-0.5 * ((x - mu[:, None]) / s[:, None]) ** 2)
        X = np.stack([g, np.ones_like(g), x - xm[:, None]], axis=-1)
        A = np.einsum("bwi,bw,bwj->bij", X, w, X) + 1e-12 * np.eye(3)
        b = np.einsum("bwi,bw,bw->bi", X, w, y)
        return np.linalg.solve(A, b[..., None])[..., 0]

    lin = linear(mu, s)
    amp, b0, b1 = lin[:, 0], lin[:, 1], lin[:, 2]
    lam = np.full(nb, 1e-3)

    def resid_jac(amp, mu, s, b0, b1):
        dx = x - mu[:, None]
        g = np.exp(-0.5 * (dx / s[:, None]) ** 2)
        model = amp[:, None] * g + b0[:, None] + b1[:, None] * (x - xm[:, None])
        J = np.stack([g, amp[:, None] * g * dx / s[:, None] ** 2,
                      amp[:, None] * g * dx ** 2 / s[:, None] ** 3,
                      np.ones_like(g), x - xm[:, None]], axis=-1)
        return y - model, J

    def chi2(amp, mu, s, b0, b1):
        r, _ = resid_jac(amp, mu, s, b0, b1)
        return np.sum(w * r * r, axis=1)

    c_old = chi2(amp, mu, s, b0, b1)
    for _ in range(niter):
        r, J = resid_jac(amp, mu, s, b0, b1)
        JTJ = np.einsum("bwi,bw,bwj->bij", J, w, J)
        g = np.einsum("bwi,bw,bw->bi", J, w, r)
        diag = np.einsum("bii->bi", JTJ)
        A = JTJ + lam[:, None, None] * np.einsum("bi,ij->bij", diag + 1e-12, np.eye(5))
        try:
            step = np.linalg.solve(A, g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(g)
        step[:, 1] = np.clip(step[:, 1], -max_step, max_step)
        step[:, 2] = np.clip(step[:, 2], -0.5 * s, 0.5 * s)
        n_amp, n_mu, n_s = amp + step[:, 0], mu + step[:, 1], np.clip(s + step[:, 2], smin, smax)
        n_b0, n_b1 = b0 + step[:, 3], b1 + step[:, 4]
        c_new = chi2(n_amp, n_mu, n_s, n_b0, n_b1)
        better = np.isfinite(c_new) & (c_new <= c_old)
        amp = np.where(better, n_amp, amp)
        mu = np.where(better, n_mu, mu)
        s = np.where(better, n_s, s)
        b0 = np.where(better, n_b0, b0)
        b1 = np.where(better, n_b1, b1)
        c_old = np.where(better, c_new, c_old)
        lam = np.where(better, lam * 0.3, lam * 10.0)
        lam = np.clip(lam, 1e-6, 1e6)
    r, J = resid_jac(amp, mu, s, b0, b1)
    JTJ = np.einsum("bwi,bw,bwj->bij", J, w, J) + 1e-12 * np.eye(5)
    with np.errstate(all="ignore"):
        try:
            cov = np.linalg.inv(JTJ)
        except np.linalg.LinAlgError:
            cov = np.linalg.pinv(JTJ)
    dof = np.maximum(np.sum(w > 0, axis=1) - 5, 1)
    chi2r = np.sum(w * r * r, axis=1) / dof
    cov = cov * np.maximum(chi2r, 1.0)[:, None, None]
    ok = np.isfinite(mu) & np.isfinite(amp) & (s > smin * 1.01) & (s < smax * 0.99)
    if xlim is not None:
        ok &= (mu > xlim[0]) & (mu < xlim[1])
    return {"amp": amp, "mu": mu, "sigma": s, "b0": b0, "b1": b1, "cov": cov, "chi2r": chi2r, "ok": ok}


# ----------------------------------------------------------------------------------------
# public API


def find_objects(data, variance, mask, *, row_range=None, col_range=None, min_snr: float = 5.0,
                 max_objects: int = 5, sign: int = 1, block: int = 32,
                 baseline_width: int = 61) -> list[tuple[float, float]]:
    """Find objects along the slit.

    The frame (restricted to ``row_range`` x ``col_range``) is collapsed along the
    dispersion as the sum of the medians of blocks of ``block`` rows (robust to emission
    lines, sky-line residuals and cosmic rays); a smooth sky baseline (running median with
    peaks masked, width ``baseline_width``) is subtracted; peaks of ``sign * profile`` are
    located, their centres refined by a Gaussian fit, and their S/N measured in a +-1 FWHM
    aperture of the collapsed profile.  The noise is the propagated variance, scaled up by
    the robust scatter of the baseline-subtracted profile when that is larger (flat-field or
    sky residual structure must not make false detections).

    Parameters
    ----------
    data, variance : ndarray, shape (ny, nx)
        Frame (e-) and its variance (e^2); dispersion along axis 0.
    mask : ndarray of bool or None
        True = bad pixel.
    row_range, col_range : (int, int), optional
        Half-open ranges of rows / columns to use (default: all).
    min_snr : float
        Minimum integrated S/N of a detection.
    max_objects : int
        Maximum number of candidates returned.
    sign : {+1, -1}
        +1 finds positive objects; -1 finds the negative beam(s) of a nod-subtracted frame.
    block : int
        Rows per median block.
    baseline_width : int
        Width (columns) of the running median for the sky baseline; must be several times
        the object FWHM.

    Returns
    -------
    list of (x, snr)
        Centre column (in full-frame coordinates) and S/N, sorted by S/N, highest first.
    """
    data, variance, bad = _prepare(data, variance, mask)
    sign = 1 if sign >= 0 else -1
    r0, r1, c0, c1 = _slices(data.shape, row_range, col_range)
    d = sign * data[r0:r1, c0:c1]
    v = variance[r0:r1, c0:c1]
    b = bad[r0:r1, c0:c1]
    med, var, ngood, blk = _block_median(d, v, b, block)
    nblk = med.shape[0]
    okcol = np.all(np.isfinite(var), axis=0) & (np.sum(ngood, axis=0) > 0)
    prof = np.sum(med, axis=0) * blk
    pvar = np.sum(np.where(np.isfinite(var), var, 0.0), axis=0) * blk**2
    if okcol.sum() < 10:
        return []
    xs = np.arange(prof.size, dtype=float)
    prof = np.interp(xs, xs[okcol], prof[okcol])
    pvar = np.interp(xs, xs[okcol], pvar[okcol])
    sig = np.sqrt(np.maximum(pvar, 1e-30))
    base = _baseline(prof, sig, baseline_width)
    res = prof - base
    z = res / sig
    scale = 1.4826 * np.median(np.abs(z - np.median(z)))
    scale = max(scale, 1.0)
    sig = sig * scale
    smooth = gaussian_filter1d(res, 1.5, mode="nearest")
    ssig = sig / np.sqrt(2 * np.sqrt(np.pi) * 1.5)  # noise of the smoothed profile
    peaks, _ = find_peaks(smooth / ssig, height=min(min_snr, 3.0), distance=3)
    out: list[tuple[float, float]] = []
    edge = 3
    for p in peaks:
        if p < edge or p > prof.size - 1 - edge:
            continue
        lo, hi = max(0, p - 10), min(prof.size, p + 11)
        xx, yy, ww = xs[lo:hi], res[lo:hi], 1.0 / sig[lo:hi] ** 2
        try:
            mu, s, amp = _gauss_fit_1d(xx, yy, ww, float(p), 2.0)
        except (np.linalg.LinAlgError, ValueError):
            mu, s, amp = float(p), 2.0, float(res[p])
        if not (abs(mu - p) < 3.0 and amp > 0):
            # fall back to a parabola through the three highest pixels
            y0, y1, y2 = res[p - 1], res[p], res[p + 1]
            den = y0 - 2 * y1 + y2
            mu = float(p + (0.5 * (y0 - y2) / den if den < 0 else 0.0))
            s = 2.0
        half = max(FWHM_PER_SIGMA * s, 2.0)
        sel = np.abs(xs - mu) <= half
        snr = float(np.sum(res[sel]) / np.sqrt(np.sum(sig[sel] ** 2)))
        if snr >= min_snr:
            out.append((float(mu + c0), snr))
    out.sort(key=lambda t: -t[1])
    # merge duplicates closer than 2 px (a noisy peak split in two)
    merged: list[tuple[float, float]] = []
    for c in out:
        if all(abs(c[0] - m[0]) > 2.0 for m in merged):
            merged.append(c)
    log.debug("find_objects: %d candidate(s) in %d row blocks: %s", len(merged), nblk, merged[:max_objects])
    return merged[:max_objects]


def choose_object(candidates, expected_x: float | None = None,
                  max_distance: float | None = None) -> tuple[float, float] | None:
    """Pick the target among :func:`find_objects` candidates.

    Parameters
    ----------
    candidates : list of (x, snr)
    expected_x : float, optional
        Expected column of the target; when given, the nearest candidate is chosen.
    max_distance : float, optional
        With ``expected_x``: candidates farther than this are not accepted.

    Returns
    -------
    (x, snr) or None
        The brightest candidate (no ``expected_x``), the nearest one, or None when there is
        no (acceptable) candidate.
    """
    cands = list(candidates)
    if not cands:
        return None
    if expected_x is None:
        return max(cands, key=lambda c: c[1])
    dist = [abs(c[0] - float(expected_x)) for c in cands]
    i = int(np.argmin(dist))
    if max_distance is not None and dist[i] > max_distance:
        return None
    return cands[i]


def fit_trace(data, variance, mask, x_guess: float, *, order: int = 3, bin_rows: int = 25,
              window: int = 15, row_range=None, sign: int = 1, min_snr: float = 3.0,
              nsigma: float = 3.0, min_bins: int = 5, npass: int = 3) -> Trace:
    """Fit the trace ``x(y)`` of an object.

    The rows are grouped in bins of ``bin_rows``; each bin is collapsed with a median (so
    emission lines and cosmic rays do not pull the centre), and a Gaussian plus linear sky
    baseline is fitted to the ``2 window + 1`` columns around the predicted centre, for all
    bins at once.  Bins with S/N below ``min_snr``, failed fits or outlying width are
    rejected, then a Legendre polynomial of ``order`` is fitted to the centres (weighted by
    their errors) with iterative ``nsigma`` clipping on robustly scaled residuals.  The
    measurement is repeated ``npass`` times with windows centred on the previous fit, which
    follows curved traces that drift by more than ``window`` over the frame.

    Outside the rows where the object was measured (e.g. a faint blue end) the trace is
    continued with a global, at most quadratic, fit of the same bins (see :class:`Trace`);
    the polynomial order is also reduced when the bins cover less than 60 % of the frame.

    Parameters
    ----------
    data, variance, mask : ndarray, shape (ny, nx)
        Frame (e-), variance (e^2) and bad-pixel mask (True = bad).
    x_guess : float
        Starting column (e.g. from :func:`find_objects`).
    order : int
        Legendre order of ``x(y)``.
    bin_rows : int
        Rows per bin.
    window : int
        Half width (columns) of the fitting window.
    row_range : (int, int), optional
        Rows to use (half-open); the trace is still defined over the whole frame.
    sign : {+1, -1}
        -1 traces a negative beam of a nod-subtracted frame.
    min_snr : float
        Minimum S/N of a bin.
    nsigma : float
        Clipping threshold of the polynomial fit.
    min_bins : int
        Minimum number of usable bins.
    npass : int
        Measurement passes.

    Returns
    -------
    Trace

    Raises
    ------
    SpecredError
        ``'no usable trace: ...'`` when fewer than ``min_bins`` bins have S/N > ``min_snr``.
    """
    data, variance, bad = _prepare(data, variance, mask)
    sign = 1 if sign >= 0 else -1
    ny, nx = data.shape
    r0, r1, _, _ = _slices(data.shape, row_range, None)
    nb = (r1 - r0) // bin_rows
    if nb < min_bins:
        bin_rows = max(1, (r1 - r0) // max(min_bins * 2, 1))
        nb = (r1 - r0) // bin_rows
    med, pvar, ngood, blk = _block_median(sign * data[r0:r1], variance[r0:r1], bad[r0:r1], bin_rows)
    nb = med.shape[0]
    yb = r0 + (np.arange(nb) + 0.5) * blk - 0.5
    ynorm = 2.0 * yb / max(ny - 1, 1) - 1.0
    offs = np.arange(-window, window + 1)

    # global profile around the guess: starting width
    xg = float(x_guess)
    s_start = 1.5
    tot = np.sum(np.where(np.isfinite(pvar), med, 0.0), axis=0)
    totv = np.sum(np.where(np.isfinite(pvar), pvar, 0.0), axis=0)
    ci = np.clip(int(round(xg)) + offs, 0, nx - 1)
    if np.all(totv[ci] > 0):
        try:
            mu_g, s_g, a_g = _gauss_fit_1d(ci.astype(float), tot[ci], 1.0 / totv[ci], xg, 2.0)
            if a_g > 0 and abs(mu_g - xg) < window and 0.5 < s_g < window / 2:
                s_start = s_g
                xg = mu_g
        except (np.linalg.LinAlgError, ValueError):
            pass

    xpred = np.full(nb, xg)
    coeffs = np.array([xg] + [0.0] * order)
    use = np.zeros(nb, bool)
    res = None
    deg = order
    for ipass in range(npass):
        cols = np.rint(xpred).astype(int)[:, None] + offs[None, :]
        inside = (cols >= 0) & (cols < nx)
        cc = np.clip(cols, 0, nx - 1)
        y = np.take_along_axis(med, cc, axis=1)
        v = np.take_along_axis(pvar, cc, axis=1)
        w = np.where(inside & np.isfinite(v) & (v > 0), 1.0 / np.where(v > 0, v, 1.0), 0.0)
        y = np.where(w > 0, y, 0.0)
        x = cols.astype(float)
        res = _batched_gauss_fit(x, y, w, xpred.copy(), np.full(nb, s_start), niter=20,
                                 max_step=1.0, smax=window / 2.0)
        amp, mu, s, cov = res["amp"], res["mu"], res["sigma"], res["cov"]
        flux = amp * s * np.sqrt(2 * np.pi)
        gradf = np.stack([s * np.sqrt(2 * np.pi), np.zeros(nb), amp * np.sqrt(2 * np.pi),
                          np.zeros(nb), np.zeros(nb)], axis=-1)
        with np.errstate(all="ignore"):
            fvar = np.einsum("bi,bij,bj->b", gradf, cov, gradf)
            snr = flux / np.sqrt(np.maximum(fvar, 1e-300))
            emu = np.sqrt(np.maximum(cov[:, 1, 1], 1e-12))
        good = (res["ok"] & (amp > 0) & np.isfinite(snr) & (snr > min_snr)
                & (np.abs(mu - xpred) < window - 2) & np.isfinite(emu))
        if good.sum() >= 3:
            sm = np.median(s[good])
            good &= (s > 0.5 * sm) & (s < 2.0 * sm)
        if good.sum() < min_bins:
            if ipass == 0:
                raise SpecredError(
                    f"no usable trace: only {int(good.sum())} of {nb} row bins have an object with "
                    f"S/N > {min_snr:g} within {window} px of column {x_guess:.1f} "
                    f"(need {min_bins}); check the object position or lower the thresholds")
            break
        # polynomial fit with iterative clipping
        span = (yb[good].max() - yb[good].min()) / max(ny - 1, 1)
        deg = int(min(order, good.sum() - 2, max(1, int(np.ceil(order * span / 0.6)))))
        use = good.copy()
        for _ in range(10):
            V = L.legvander(ynorm[use], deg)
            wt = 1.0 / emu[use]
            coeffs, *_ = np.linalg.lstsq(V * wt[:, None], mu[use] * wt, rcond=None)
            r = (mu - L.legval(ynorm, coeffs)) / emu
            rs = 1.4826 * np.median(np.abs(r[use]))
            new = good & (np.abs(r) < nsigma * max(rs, 1.0))
            if new.sum() < max(deg + 2, min_bins):
                break
            if np.array_equal(new, use):
                break
            use = new
        xpred = L.legval(ynorm, coeffs)

    if use.sum() < min_bins:
        raise SpecredError(f"no usable trace: only {int(use.sum())} row bins remain after clipping "
                           f"(need {min_bins}) near column {x_guess:.1f}")
    resid = mu[use] - L.legval(ynorm[use], coeffs)
    fwhm = float(FWHM_PER_SIGMA * np.median(s[use]))
    snr_tot = float(np.sqrt(np.sum(snr[use] ** 2)))
    full = np.zeros(order + 1)
    full[: coeffs.size] = coeffs
    # low-order fit of the same bins for the extrapolation beyond the measured rows
    edeg = min(2, deg)
    V = L.legvander(ynorm[use], edeg)
    wt = 1.0 / emu[use]
    ext, *_ = np.linalg.lstsq(V * wt[:, None], mu[use] * wt, rcond=None)
    tr = Trace(coeffs=full, ny=ny, fwhm=fwhm, snr=snr_tot,
               y_fit=(float(yb[use].min()), float(yb[use].max())),
               rms=float(np.sqrt(np.mean(resid**2))), n_bins=int(use.sum()), sign=sign, ext_coeffs=ext,
               bins={"y": yb, "x": mu, "xerr": emu, "snr": snr, "fwhm": FWHM_PER_SIGMA * s, "used": use})
    log.info("trace: x(%d)=%.2f, FWHM %.2f px, S/N %.0f, %d/%d bins, rms %.3f px, order %d",
             ny // 2, float(tr.x(np.array([ny // 2]))[0]), fwhm, snr_tot, tr.n_bins, nb, tr.rms, deg)
    return tr
