"""Extraction of 1D spectra from long-slit frames: boxcar and optimal (Horne 1986).

Instrument-agnostic algorithms on numpy arrays; frames are ``(ny, nx)`` with the dispersion
along axis 0 and the slit along axis 1, with ``data`` (e-, normally sky-subtracted),
``variance`` (e^2) and a boolean ``mask`` (True = bad).  Everything is vectorised over the
rows: the aperture is cut out as a ``(ny, W)`` window that follows the trace.  A trace of a
negative beam (``trace.sign == -1``, nod-subtracted frames) is extracted from ``-data``, so
fluxes are positive.

Spatial profile
    The normalised profile ``P`` is modelled in trace coordinates, ``u = x - x_trace(y)``,
    as a tensor product of a cubic B-spline in ``u`` (knots every ~FWHM/4, so the
    pixel-integrated profile is followed whatever its shape) and a Legendre polynomial in
    ``y`` (slow seeing/width changes along the dispersion).  It is fitted by weighted linear
    least squares to the fractions ``D / F`` of all rows at once (``F`` the row flux,
    weights ``F^2 / V``, capped for exceptionally bright rows), with iterative
    rejection of deviant pixels, and normalised to unit sum over the aperture in every row.
    This is Horne's (1986) profile estimate, but in trace coordinates (as Marsh 1989 for
    curved traces) instead of detector columns, so a trace drifting across columns needs
    no high polynomial order.  Rows where the object is faint get little weight and
    inherit the smooth model.  Unlike Horne, the profile is *not* clipped at zero: in the
    wings it is zero plus noise, and clipping the negative half would bias the
    normalisation, hence every flux, high by a few tenths of a per cent.

Emission-line rows
    Rows much brighter than the local continuum (an emission line) may have a different
    spatial profile (extended line emission, a slightly different seeing).  When the smooth
    profile does not fit such a run of rows to the noise, the run gets a two-component
    profile: the continuum with the smooth profile plus the line excess with its own
    profile measured from the whole run (see :func:`_line_profiles`).  Pixels near the
    profile peak of these rows are never rejected.

Optimal extraction (Horne 1986, Table 1)
    ``f = sum(M P D / V) / sum(M P^2 / V)`` and ``var f = 1 / sum(M P^2 / V)`` where M
    excludes masked and rejected pixels.  (Horne quotes ``sum(M P) / sum(M P^2 / V)`` for
    the variance; the two agree when no pixel is masked, and ours is the exact variance of
    the estimator when some are.)  With ``read_noise`` given the variance is re-estimated
    from the model, ``V = read_noise^2 + max(f P + sky, 0) / gain``, scaled pixel by pixel
    by the ratio of the input variance to the same formula evaluated on the data — this
    keeps flat-field scaling and extra terms (sky-model variance) that the input carries,
    while removing the correlation between data and weights that biases the flux low.
    Cosmic rays: in every iteration at most one pixel per row, the worst, is rejected when
    ``(D - f P)^2 > nsigma^2 (V + (tol f P)^2)``; the profile tolerance term ``tol`` keeps
    bright pixels from being clipped for a percent-level profile mismatch.  The profile is
    then re-fitted without the rejected pixels from the optimal fluxes and the extraction
    repeated (rejection restarted), as in Horne's iteration.

References
----------
Horne, K. 1986, PASP 98, 609 — an optimal extraction algorithm for CCD spectroscopy.
Marsh, T. R. 1989, PASP 101, 1032 — extraction of highly distorted spectra.
Eilers, P. H. C. & Marx, B. D. 1996, Stat. Sci. 11, 89 — penalised B-splines.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre as L
from scipy.ndimage import binary_dilation, median_filter
from scipy.special import erf

from .skysub import uniform_cubic_basis
from .trace import Trace

log = logging.getLogger(__name__)

__all__ = ["Extracted", "boxcar_extract", "optimal_extract", "fit_profile"]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True, eq=False)
class Extracted:
    """A spectrum extracted from a 2D frame (one value per row).

    Attributes
    ----------
    flux : ndarray (ny,)
        Counts (e-) per row in the aperture; NaN where no estimate is possible.
    variance : ndarray (ny,)
        Variance of ``flux`` (e^2); NaN where ``flux`` is NaN.
    mask : ndarray of bool (ny,)
        True where there is no good data (no unmasked pixel, or less than ``min_coverage``
        of the profile on good pixels).
    x : ndarray (ny,)
        Trace centre per row.
    profile : ndarray (ny, nx) or None
        Normalised spatial profile used (optimal extraction, or the boxcar masked-pixel
        correction), zero outside the aperture.
    n_rejected : int
        Pixels rejected as outliers (cosmic rays) during optimal extraction.
    method : str
        ``'optimal'`` or ``'boxcar'``.
    rejected : ndarray of bool (ny, nx) or None
        The rejected pixels.
    half_width : float
        Aperture half width (pixels).
    """

    flux: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    x: np.ndarray
    profile: np.ndarray | None
    n_rejected: int
    method: str
    rejected: np.ndarray | None = None
    half_width: float = float("nan")


# ----------------------------------------------------------------------------------------
# aperture window


@dataclass
class _Window:
    rows: np.ndarray      # (ny, 1)
    cols: np.ndarray      # (ny, W) clipped column indices
    inside: np.ndarray    # (ny, W) column inside the frame
    u: np.ndarray         # (ny, W) column - trace centre
    frac: np.ndarray      # (ny, W) fraction of the pixel inside the aperture (boxcar)
    in_ap: np.ndarray     # (ny, W) pixel centre inside the aperture (optimal)
    xc: np.ndarray        # (ny,)
    lo: np.ndarray        # (ny,) first column of the window (unclipped)


def _window(trace: Trace, shape, half_width: float) -> _Window:
    ny, nx = shape
    if trace.ny != ny:
        raise ValueError(f"trace is defined on {trace.ny} rows, the frame has {ny}")
    hw = float(half_width)
    if not hw > 0:
        raise ValueError(f"half_width must be positive, got {half_width}")
    xc = trace.x(np.arange(ny, dtype=float))
    W = int(np.ceil(2 * hw)) + 3
    lo = np.floor(xc - hw - 0.5).astype(int)
    cols = lo[:, None] + np.arange(W)[None, :]
    inside = (cols >= 0) & (cols < nx)
    u = cols - xc[:, None]
    frac = np.clip(np.minimum(u + 0.5, hw) - np.maximum(u - 0.5, -hw), 0.0, 1.0) * inside
    in_ap = (np.abs(u) <= hw) & inside
    return _Window(np.arange(ny)[:, None], np.clip(cols, 0, nx - 1), inside, u, frac, in_ap, xc, lo)


def _cut(win: _Window, data, variance, mask):
    data = np.asarray(data, dtype=float)
    variance = np.asarray(variance, dtype=float)
    if variance.shape != data.shape:
        raise ValueError(f"variance shape {variance.shape} differs from data shape {data.shape}")
    D = data[win.rows, win.cols]
    V = variance[win.rows, win.cols]
    bad = ~win.inside | ~np.isfinite(D) | ~np.isfinite(V) | (V <= 0)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != data.shape:
            raise ValueError(f"mask shape {m.shape} differs from data shape {data.shape}")
        bad |= m[win.rows, win.cols]
    D = np.where(bad, 0.0, D)
    V = np.where(bad, 1.0, V)
    return D, V, bad


def _cut_plain(win: _Window, arr) -> np.ndarray:
    """Window cut of an auxiliary (ny, nx) array; non-finite values -> 0."""
    a = np.asarray(arr, dtype=float)[win.rows, win.cols]
    return np.where(np.isfinite(a) & win.inside, a, 0.0)


def _to_frame(shape, win: _Window, values: np.ndarray) -> np.ndarray:
    out = np.zeros(shape, dtype=values.dtype)
    sel = win.inside
    out[np.broadcast_to(win.rows, win.cols.shape)[sel], win.cols[sel]] = values[sel]
    return out


def _gauss_profile(win: _Window, fwhm: float) -> np.ndarray:
    """Pixel-integrated Gaussian of ``fwhm`` on the aperture, normalised per row."""
    s = max(float(fwhm), 0.5) / FWHM_PER_SIGMA
    P = 0.5 * (erf((win.u + 0.5) / (np.sqrt(2) * s)) - erf((win.u - 0.5) / (np.sqrt(2) * s)))
    P = P * win.in_ap
    return P / np.maximum(P.sum(axis=1, keepdims=True), 1e-300)


# ----------------------------------------------------------------------------------------
# spatial profile


def _smooth_row_flux(F, varF, width: int = 51, nsig: float = 3.0, grow: int = 3):
    """Row fluxes for the profile normalisation: a running median over ``width`` rows (its
    variance ~ (π/2) var / width), except rows more than ``nsig`` σ above it and ``grow``
    rows around them (emission lines and their wings), which keep their own flux and
    variance."""
    ny = F.size
    if ny < 5:
        return F, varF
    ok = np.isfinite(F) & np.isfinite(varF)
    if not ok.any():
        return F, varF
    idx = np.flatnonzero(ok)
    w = int(min(width, idx.size - (1 - idx.size % 2)))
    if w < 3:
        return F, varF
    med = np.full(ny, np.nan)
    med[idx] = median_filter(F[idx], size=w, mode="nearest")
    with np.errstate(all="ignore"):
        sig = np.sqrt(varF)
        own = ok & (F - med > nsig * sig)
    if grow > 0 and own.any():
        own = binary_dilation(own, iterations=grow) & ok
    Fs = np.where(own, F, med)
    Vs = np.where(own, varF, varF * (np.pi / 2) / w)
    return Fs, Vs


def _profile_model(win: _Window, D, V, good, F, varF, fwhm, *, order, nsigma=5.0, niter=3,
                   knot=None, min_rows=None, min_row_snr: float = 2.0, smooth_below_snr: float = 3.0):
    """Fit the spline x Legendre profile (see module docstring).  Returns the normalised
    ``(ny, W)`` profile, or None when the object is too faint to fit one."""
    ny, W = D.shape
    hw_ext = float(np.max(np.abs(win.u[win.in_ap]))) + 0.5 if win.in_ap.any() else 1.0
    # Below S/N `smooth_below_snr` per row, normalise the data by a running median of the
    # row fluxes, not by each row's own flux:
    # D/F with F the sum of the same noisy pixels correlates numerator and denominator, which
    # at S/N ~ 1 per row broadens the fitted profile towards a flat one -- and a profile
    # broader than the truth biases the optimal flux high (+26 % at S/N 0.6 per row, measured).
    # Rows well above the running median (emission lines, S/N high by construction) keep
    # their own flux.
    with np.errstate(all="ignore"):
        typical = np.nanmedian(median_filter(np.where(np.isfinite(F), F, 0.0), size=min(51, F.size))
                               / np.sqrt(np.where(varF > 0, varF, np.nan)))
    if np.isfinite(typical) and typical < smooth_below_snr:
        F, varF = _smooth_row_flux(F, varF)
    with np.errstate(all="ignore"):
        snr_row = F / np.sqrt(varF)
    # typical row below S/N `min_row_snr`: the fitted profile's own noise would add flux errors
    # (twice the propagated ones at S/N 0.6 per row, measured) that the variance does not
    # carry; the caller falls back to a Gaussian of the trace's FWHM
    if not np.isfinite(typical) or typical < min_row_snr:
        return None
    rows_ok = np.isfinite(snr_row) & (F > 0) & (snr_row > 1.0)
    min_rows = min_rows if min_rows is not None else max(3 * (order + 1), 10)
    if rows_ok.sum() < min_rows:
        return None
    order = int(min(order, max(0, rows_ok.sum() // 20)))
    # uniform cubic B-spline in u (knot spacing hk) x Legendre polynomial in y
    hk = float(np.clip(fwhm / 4.0, 0.35, 1.0)) if knot is None else float(knot)
    lo = -(hw_ext + hk)
    nint = max(4, int(np.ceil(2 * (hw_ext + hk) / hk)))
    nb = nint + 3
    nl = order + 1
    yn = 2.0 * np.arange(ny) / max(ny - 1, 1) - 1.0
    Ly = L.legvander(yn, order)                                       # (ny, nl)
    use = good & win.in_ap & rows_ok[:, None]
    N = int(use.sum())
    with np.errstate(all="ignore"):
        frac = np.where(use, D / F[:, None], 0.0)
    snr2 = np.where(rows_ok, snr_row**2, 0.0)
    # cap the weight of exceptionally bright rows (30x the 90th percentile S/N^2): bright
    # emission-line rows still define their own profile (so their fluxes are not limited
    # by the continuum's profile accuracy) without a single row dominating the whole fit
    cap = 30.0 * np.percentile(snr2[rows_ok], 90)
    scale = np.where(rows_ok, np.minimum(1.0, cap / np.maximum(snr2, cap * 1e-30)), 0.0)
    w = np.where(use, F[:, None] ** 2 / V * scale[:, None], 0.0)
    # dense per-row B-spline design (ny, W, nb): the normal matrix is
    # A = sum_r (B_r^T W_r B_r) (x) (L_r L_r^T), assembled with two small products
    k, bv = uniform_cubic_basis((np.clip(win.u, lo, -lo) - lo) / hk, nint)
    Bw = np.zeros((ny, W, nb))
    ri, wi = np.indices((ny, W))
    for a in range(4):
        Bw[ri, wi, k + a] = bv[a]
    LL = (Ly[:, :, None] * Ly[:, None, :]).reshape(ny, nl * nl)
    # second-difference penalty on the u coefficients, for every Legendre term
    D2 = np.diff(np.eye(nb), 2, axis=0)
    pen = np.kron(D2.T @ D2, np.eye(nl))
    keep = use.copy()
    coef = None
    for _ in range(niter + 1):
        wk = np.where(keep, w, 0.0)
        G = np.matmul(np.transpose(Bw * wk[:, :, None], (0, 2, 1)), Bw)          # (ny, nb, nb)
        A = (G.reshape(ny, nb * nb).T @ LL).reshape(nb, nb, nl, nl)
        A = A.transpose(0, 2, 1, 3).reshape(nb * nl, nb * nl)
        rb = np.einsum("rwb,rw->rb", Bw, wk * frac)                                # (ny, nb)
        b = (rb.T @ Ly).reshape(nb * nl)
        dg = np.diag(A)
        kappa = 1e-5 * float(np.median(dg[dg > 0])) if np.any(dg > 0) else 1e-12
        try:
            coef = np.linalg.solve(A + kappa * pen + 1e-12 * np.eye(A.shape[0]) * np.trace(A) / A.shape[0], b)
        except np.linalg.LinAlgError:
            return None
        crow = Ly @ coef.reshape(nb, nl).T                                          # (ny, nb)
        model = np.einsum("rwb,rb->rw", Bw, crow)
        r = (frac - model) * np.sqrt(w)
        rs = 1.4826 * np.median(np.abs(r[keep])) if keep.any() else 1.0
        new = use & (np.abs(r) <= nsigma * max(rs, 1.0))
        if np.array_equal(new, keep):
            break
        keep = new
    P = np.where(win.in_ap, model, 0.0)
    tot = P.sum(axis=1, keepdims=True)
    okrow = (tot[:, 0] > 0) & np.isfinite(tot[:, 0])
    P = np.where(okrow[:, None], P / np.where(tot > 0, tot, 1.0), 0.0)
    if not okrow.all():
        G = _gauss_profile(win, fwhm)
        P[~okrow] = G[~okrow]
    log.debug("profile: %d rows, %d pixels (%d rejected), %d u-knots every %.2f px, y order %d",
              int(rows_ok.sum()), N, int((use & ~keep).sum()), nint + 1, hk, order)
    return P


def fit_profile(data, variance, mask, trace: Trace, half_width: float, *, order: int = 3,
                nsigma: float = 5.0) -> np.ndarray:
    """Normalised spatial profile ``P(y, x)`` on the aperture (zero elsewhere).

    See the module docstring; falls back to a Gaussian of ``trace.fwhm`` when the object is
    too faint to fit a profile.

    Parameters
    ----------
    data, variance, mask : ndarray, shape (ny, nx)
        Sky-subtracted frame (e-), variance (e^2), bad pixels (True).
    trace : Trace
    half_width : float
        Aperture half width (pixels).
    order : int
        Legendre order of the variation along the dispersion.
    nsigma : float
        Outlier rejection threshold.

    Returns
    -------
    ndarray, shape (ny, nx)
    """
    data = np.asarray(data, dtype=float)
    win = _window(trace, data.shape, half_width)
    D, V, bad = _cut(win, data, variance, mask)
    good = ~bad & win.in_ap
    F = np.sum(np.where(good, D, 0.0), axis=1)
    varF = np.sum(np.where(good, V, 0.0), axis=1)
    P = _profile_model(win, D, V, good, F, varF, trace.fwhm, order=order, nsigma=nsigma)
    if P is None:
        P = _gauss_profile(win, trace.fwhm)
    return _to_frame(data.shape, win, P)


# ----------------------------------------------------------------------------------------
# extraction


def boxcar_extract(data, variance, mask, trace: Trace, half_width: float, *,
                   fix_masked: bool = True, profile=None, min_coverage: float = 0.5,
                   sky_variance=None) -> Extracted:
    """Sum the counts in an aperture of ``+- half_width`` around the trace.

    Pixels cut by the aperture edge count with the fraction of their width inside it
    (partial-pixel weights).  Masked pixels are left out and, with ``fix_masked``, the
    row sum is divided by the fraction of the spatial profile that the good pixels cover
    (i.e. the missing pixels are interpolated from the profile; the variance is scaled by
    the same factor squared).

    Parameters
    ----------
    data, variance, mask : ndarray, shape (ny, nx)
        Sky-subtracted frame (e-), variance (e^2), bad pixels (True).
    trace : Trace
    half_width : float
        Aperture half width (pixels).
    fix_masked : bool
        Correct rows with masked pixels with the profile (fitted from the data, see
        :func:`fit_profile`, unless ``profile`` is given).
    profile : ndarray (ny, nx), optional
        Spatial profile to use for the masked-pixel correction.
    min_coverage : float
        Rows where the good pixels cover less than this fraction of the profile (or of the
        aperture) are flagged in ``mask``.
    sky_variance : ndarray (ny, nx), optional
        Variance of the subtracted sky model (from :func:`specred.reduce.skysub.fit_sky`),
        NOT included in ``variance``.  Sky-model errors are common to all the pixels of a
        row, so they are added coherently: ``(sum_x w_x sigma_sky,x)^2``.  (Adding them to
        ``variance`` instead treats them as independent and underestimates their share by
        the number of pixels in the aperture.)

    Returns
    -------
    Extracted
    """
    data = np.asarray(data, dtype=float) * (-1.0 if trace.sign < 0 else 1.0)
    win = _window(trace, data.shape, half_width)
    D, V, bad = _cut(win, data, variance, mask)
    wgt = win.frac
    good = ~bad & (wgt > 0)
    flux = np.sum(np.where(good, wgt * D, 0.0), axis=1)
    var = np.sum(np.where(good, wgt * wgt * V, 0.0), axis=1)
    Pw = None
    cover = np.ones(data.shape[0])
    if np.any(bad & (wgt > 0)):
        if profile is not None:
            Pw = np.asarray(profile, dtype=float)[win.rows, win.cols] * win.inside
        elif fix_masked:
            F = flux
            P = _profile_model(win, D, V, good & win.in_ap, F, var, trace.fwhm, order=3)
            Pw = P if P is not None else _gauss_profile(win, trace.fwhm)
        if Pw is not None:
            tot = np.sum(wgt * Pw, axis=1)
            with np.errstate(all="ignore"):
                cover = np.sum(np.where(good, wgt * Pw, 0.0), axis=1) / tot
            cover = np.where(np.isfinite(cover), cover, 0.0)
        else:
            with np.errstate(all="ignore"):
                cover = np.sum(np.where(good, wgt, 0.0), axis=1) / np.sum(wgt, axis=1)
        if fix_masked:
            with np.errstate(all="ignore"):
                flux = flux / cover
                var = var / cover**2
    if sky_variance is not None:
        ssig = np.sqrt(np.clip(_cut_plain(win, sky_variance), 0.0, None))
        with np.errstate(all="ignore"):
            csum = np.sum(np.where(good, wgt * ssig, 0.0), axis=1) / (cover if fix_masked else 1.0)
        var = var + csum**2
    rowmask = (cover < min_coverage) | ~np.any(good, axis=1)
    flux = np.where(~np.any(good, axis=1) | (cover <= 0), np.nan, flux)
    var = np.where(np.isfinite(flux), var, np.nan)
    prof = _to_frame(data.shape, win, Pw) if Pw is not None else None
    log.debug("boxcar: half width %.2f px, %d rows flagged", half_width, int(rowmask.sum()))
    return Extracted(flux=flux, variance=var, mask=rowmask, x=win.xc, profile=prof, n_rejected=0,
                     method="boxcar", rejected=None, half_width=float(half_width))


def _horne(D, V_in, good, P, *, read_noise, gain, skyw, nsigma, niter, tol, F0=None, protect=None):
    """Horne's iteration on a (ny, W) window; returns f, var, rejected, V.  Pixels in
    ``protect`` are never rejected."""
    model_var = read_noise is not None
    if model_var:
        rn2 = float(read_noise) ** 2
        base = rn2 + np.maximum(D + skyw, 0.0) / gain
        ratio = np.clip(V_in / base, 0.5, 2.0)

        def vmodel(f):
            return ratio * (rn2 + np.maximum(f[:, None] * P + skyw, 0.0) / gain)
    rej = np.zeros(D.shape, bool)
    V = vmodel(F0) if (model_var and F0 is not None) else V_in
    f = None
    for it in range(niter + 1):
        M = good & ~rej
        with np.errstate(all="ignore"):
            den = np.sum(np.where(M, P * P / V, 0.0), axis=1)
            f = np.sum(np.where(M, P * D / V, 0.0), axis=1) / den
        f = np.where(np.isfinite(f), f, 0.0)
        if model_var:
            V = vmodel(f)
            with np.errstate(all="ignore"):
                den = np.sum(np.where(M, P * P / V, 0.0), axis=1)
                f = np.sum(np.where(M, P * D / V, 0.0), axis=1) / den
            f = np.where(np.isfinite(f), f, 0.0)
        if it == niter:
            break
        fP = f[:, None] * P
        z2 = np.where(M, (D - fP) ** 2 / (V + (tol * fP) ** 2), 0.0)
        if protect is not None:
            z2 = np.where(protect, 0.0, z2)
        worst = np.argmax(z2, axis=1)
        zmax = z2[np.arange(D.shape[0]), worst]
        hit = zmax > nsigma**2
        # keep at least two good pixels in a row
        hit &= M.sum(axis=1) > 2
        if not hit.any():
            break
        rej[np.flatnonzero(hit), worst[hit]] = True
    M = good & ~rej
    with np.errstate(all="ignore"):
        den = np.sum(np.where(M, P * P / V, 0.0), axis=1)
        var = 1.0 / den
    return f, var, rej, V


def _bright_rows(f, var, *, width: int = 31, nsig: float = 5.0, min_excess: float = 0.1,
                 min_snr: float = 30.0, grow: int = 2) -> np.ndarray:
    """Rows much brighter than the local continuum (emission lines), grown by ``grow``."""
    ny = f.size
    if ny < 5:
        return np.zeros(ny, bool)
    ff = np.where(np.isfinite(f), f, 0.0)
    cont = median_filter(ff, size=min(width, ny - (1 - ny % 2)), mode="nearest")
    with np.errstate(all="ignore"):
        sig = np.sqrt(var)
        exc = ff - cont
        b = (exc > nsig * sig) & (exc > min_excess * np.abs(cont)) & (ff / sig > min_snr)
    b = np.where(np.isfinite(b), b, False)
    if grow > 0 and b.any():
        b = binary_dilation(b, iterations=grow)
    return b


def _line_profiles(D, V, good, P, f, bright, win: _Window, *, width: int = 31,
                   nsigma: float = 5.0, tol: float = 0.05) -> np.ndarray:
    """Two-component profile for emission-line rows.

    In each run of bright rows, the row flux is split into the local continuum ``c``
    (running median of ``f``) with the smooth profile ``P``, and the line excess
    ``e = f - c`` with the line's own spatial profile ``Q``, measured from the whole run as
    the ``e``-weighted mean of the excess fractions ``(D - c P) / e`` on each detector
    column, leaving out masked pixels and pixels that deviate by more than ``nsigma``
    from a first, median-based estimate (cosmic rays).  Runs that the smooth profile
    already fits to the noise keep it (a line profile would only add noise there).  Returns the
    profile ``(c P + e Q) / f`` for every row (unchanged outside the bright rows),
    normalised over the aperture.
    """
    ny, W = D.shape
    ff = np.where(np.isfinite(f), f, 0.0)
    cont = np.clip(median_filter(ff, size=min(width, ny - (1 - ny % 2)), mode="nearest"), 0.0, None)
    lo = win.lo
    out = P.copy()
    idx = np.flatnonzero(bright)
    if idx.size == 0:
        return out
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    for g in runs:
        c = cont[g]
        e = ff[g] - c
        if not np.any(e > 0):
            continue
        # keep the smooth profile when it describes the run to the noise (the same
        # spatial profile for line and continuum: a line profile would only add noise)
        Mg = good[g]
        fP = ff[g][:, None] * P[g]
        r2 = np.where(Mg, (D[g] - fP) ** 2 / V[g], 0.0)
        r2 = np.minimum(r2, nsigma**2)          # a cosmic ray must not trigger it
        nd = int(Mg.sum())
        if nd == 0 or r2.sum() / nd < 1.0 + 2.5 * np.sqrt(2.0 / nd):
            continue
        shift = lo[g] - lo[g].min()
        Wg = W + int(shift.max())
        n = g.size
        cols = shift[:, None] + np.arange(W)[None, :]
        ep = np.clip(e, 0.0, None)
        M = good[g] & (ep[:, None] > 0)
        # e-weighted median over the run of the excess fractions, per detector column
        # (a median, so a cosmic ray in one row does not enter the line profile)
        vals = np.full((n, Wg), np.inf)
        wts = np.zeros((n, Wg))
        ri = np.broadcast_to(np.arange(n)[:, None], cols.shape)
        with np.errstate(all="ignore"):
            vals[ri[M], cols[M]] = ((D[g] - c[:, None] * P[g]) / np.where(ep > 0, ep, 1.0)[:, None])[M]
        wts[ri[M], cols[M]] = np.broadcast_to(ep[:, None], M.shape)[M]
        order_ = np.argsort(vals, axis=0)
        sv = np.take_along_axis(vals, order_, axis=0)
        cw = np.cumsum(np.take_along_axis(wts, order_, axis=0), axis=0)
        tot = cw[-1]
        k = np.argmax(cw >= 0.5 * tot[None, :], axis=0)
        Qf = sv[k, np.arange(Wg)]
        Qmed = np.where((tot > 0) & np.isfinite(sv[k, np.arange(Wg)]), Qf, 0.0)
        # then the e-weighted mean (ratio of sums, unbiased) without the pixels that
        # deviate from the median model (cosmic rays)
        mod = c[:, None] * P[g] + ep[:, None] * Qmed[cols]
        dev = np.abs(D[g] - mod) > nsigma * np.sqrt(V[g] + (tol * mod) ** 2)
        M2 = M & ~dev
        num = np.zeros(Wg)
        den = np.zeros(Wg)
        np.add.at(num, cols[M2], (D[g] - c[:, None] * P[g])[M2])
        np.add.at(den, cols[M2], np.broadcast_to(ep[:, None], M2.shape)[M2])
        # columns without any good pixel (bad column): the continuum profile shape
        pav = np.zeros(Wg)
        npv = np.zeros(Wg)
        np.add.at(pav, cols, P[g])
        np.add.at(npv, cols, 1.0)
        with np.errstate(all="ignore"):
            Qf = np.where(den > 0, num / den, pav / np.maximum(npv, 1.0))
        Q = Qf[cols] * win.in_ap[g]
        tq = Q.sum(axis=1, keepdims=True)
        with np.errstate(all="ignore"):
            Q = np.where(tq > 0, Q / tq, P[g])
        mix = c[:, None] * P[g] + np.clip(e, 0.0, None)[:, None] * Q
        tm = mix.sum(axis=1, keepdims=True)
        with np.errstate(all="ignore"):
            out[g] = np.where(tm > 0, mix / tm, P[g])
    return out


def optimal_extract(data, variance, mask, trace: Trace, *, half_width: float,
                    read_noise: float | None = None, gain: float = 1.0, sky=None,
                    profile_order: int = 3, nsigma: float = 5.0, niter: int = 5,
                    profile=None, profile_tolerance: float = 0.05,
                    min_coverage: float = 0.5, sky_variance=None) -> Extracted:
    """Optimal extraction (Horne 1986) with cosmic-ray rejection.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Sky-subtracted frame (e-).
    variance : ndarray, shape (ny, nx)
        Its variance (e^2), including the sky-model variance if known.
    mask : ndarray of bool or None
        True = bad pixel.
    trace : Trace
    half_width : float
        Aperture half width (pixels); pixels whose centre lies within it are used.
    read_noise : float, optional
        Read noise (same units as ``data``).  When given, the variance is re-estimated from
        the model (see the module docstring); otherwise ``variance`` is used as it is.
    gain : float
        Detected photons per data unit (1 for data in electrons).
    sky : float or ndarray (ny, nx), optional
        Sky model that was subtracted from ``data`` (its Poisson noise enters the model
        variance).
    profile_order : int
        Legendre order of the profile along the dispersion.
    nsigma : float
        Cosmic-ray rejection threshold.
    niter : int
        Rejection iterations (at most one pixel per row each).
    profile : ndarray (ny, nx), optional
        Use this spatial profile instead of fitting one.
    profile_tolerance : float
        Fractional profile uncertainty added to the rejection variance.
    min_coverage : float
        Rows whose good pixels cover less than this fraction of the profile are flagged.
    sky_variance : ndarray (ny, nx), optional
        Variance of the subtracted sky model, NOT included in ``variance``; added
        coherently over the row, ``(sum_x a_x sigma_sky,x)^2`` with ``a_x`` the extraction
        weights (see :func:`boxcar_extract`).

    Returns
    -------
    Extracted
    """
    data = np.asarray(data, dtype=float) * (-1.0 if trace.sign < 0 else 1.0)
    win = _window(trace, data.shape, half_width)
    D, V_in, bad = _cut(win, data, variance, mask)
    good = ~bad & win.in_ap
    if sky is None:
        skyw = 0.0
    elif np.ndim(sky) == 0:
        skyw = float(sky)
    else:
        skyw = np.asarray(sky, dtype=float)[win.rows, win.cols]
        skyw = np.where(np.isfinite(skyw), skyw, 0.0)
    kw = dict(read_noise=read_noise, gain=float(gain), skyw=skyw, nsigma=nsigma, niter=niter,
              tol=profile_tolerance)
    F = np.sum(np.where(good, D, 0.0), axis=1)
    varF = np.sum(np.where(good, V_in, 0.0), axis=1)
    if profile is not None:
        P = np.asarray(profile, dtype=float)[win.rows, win.cols] * win.in_ap
        P = P / np.maximum(P.sum(axis=1, keepdims=True), 1e-300)
        f, var, rej, V = _horne(D, V_in, good, P, F0=F, **kw)
    else:
        # Horne's loop: profile from a first estimate, extraction with rejection, then the
        # profile again from the optimal fluxes without the rejected pixels, and the final
        # extraction (rejection restarted with the better profile).
        P = _profile_model(win, D, V_in, good, F, varF, trace.fwhm, order=profile_order)
        if P is None:
            log.info("optimal extraction: object too faint for an empirical profile; Gaussian of "
                     "FWHM %.2f px used", trace.fwhm)
            P = _gauss_profile(win, trace.fwhm)
            f, var, rej, V = _horne(D, V_in, good, P, F0=F, **kw)
        else:
            f, var, rej, V = _horne(D, V_in, good, P, F0=F, **kw)
            P2 = _profile_model(win, D, V, good & ~rej, f, var, trace.fwhm, order=profile_order)
            if P2 is not None:
                P = P2
            f, var, rej, V = _horne(D, V_in, good, P, F0=f, **kw)
        # emission-line rows: a local empirical profile, and no rejection on the peak
        bright = _bright_rows(f, var)
        if bright.any():
            P = _line_profiles(D, V, good, P, f, bright, win, nsigma=nsigma, tol=profile_tolerance)
            protect = bright[:, None] & (P > 0.3 * P.max(axis=1, keepdims=True))
            f, var, rej, V = _horne(D, V_in, good, P, F0=f, protect=protect, **kw)
            log.debug("optimal extraction: %d emission-line rows with a two-component profile",
                      int(bright.sum()))
    M = good & ~rej
    if sky_variance is not None:
        ssig = np.sqrt(np.clip(_cut_plain(win, sky_variance), 0.0, None))
        with np.errstate(all="ignore"):
            csum = np.sum(np.where(M, P * ssig / V, 0.0), axis=1) * var
        var = var + csum**2
    cover = np.sum(np.where(M, P, 0.0), axis=1)
    nog = ~np.any(M, axis=1)
    rowmask = nog | (cover < min_coverage) | ~np.isfinite(var)
    flux = np.where(nog | ~np.isfinite(var), np.nan, f)
    var = np.where(np.isfinite(flux), var, np.nan)
    n_rej = int(rej.sum())
    log.info("optimal extraction: half width %.2f px, %d pixels rejected, %d rows flagged",
             half_width, n_rej, int(rowmask.sum()))
    return Extracted(flux=flux, variance=var, mask=rowmask, x=win.xc, profile=_to_frame(data.shape, win, P),
                     n_rejected=n_rej, method="optimal", rejected=_to_frame(data.shape, win, rej),
                     half_width=float(half_width))
