"""Automatic arc-line identification and 2D wavelength solutions λ(y, x).

The dispersion runs along numpy axis 0 (rows, ``y``) and the slit along axis 1 (columns,
``x``) for both NTT instruments.  Arc lines are slightly tilted and curved along the slit
(EFOSC2 Gr#13: ≈ 2 px, SofI: ≈ 4 px across the slit), so the solution is a 2D polynomial
λ(y, x) rather than one λ(y) for all columns.

Algorithm (vectorised over lines and columns; no per-pixel Python loop)
----------------------------------------------------------------------
1. **1D arc spectrum** — median of ``n_center`` (10) columns at the middle of the slit;
   background = running 20th percentile; noise from the MAD of first differences; peaks
   with :func:`scipy.signal.find_peaks` above ``min_snr`` × noise in prominence.  Batched
   Gaussian fits (``_fit_gaussians``) give the line width — measured on the frame, it
   depends on the slit: EFOSC2 slit#1.0 ≈ 3.6 px (flat-topped), SofI long_slit_2 ≈ 6 px —
   and reject single-pixel spikes (SofI reset anomalies).  Saturated peaks are recognised
   from ``mask``, ``saturation`` or a flat top at the brightest level of the frame.
2. **Centres** — flux balance (``_balance_centre``): the position with equal flux in the
   half windows [y − h, y] and [y, y + h], h = max(3.5, 0.6 FWHM) px.  This is the centre
   IRAF ``center1d`` (with PESSTO's fwidth = 7 px) measures — checked to ≤ 0.03 px on the
   reference arcs — it needs no line-shape model (flat-topped slit images, asymmetric SofI
   profiles) and stays correct on saturated plateaus.
3. **Line list** — lines closer than 0.3 FWHM are merged (intensity-weighted mean
   wavelength: one unresolved peak, e.g. He I 7065.19 + Ar I 7067.22); a line with a
   neighbour of ≥ 2 % of its intensity within 1 FWHM, ≥ 10 % within 1.6 FWHM or ≥ 40 %
   within 2.2 FWHM, or whose note names an unlisted neighbour, is *blended*: it may claim
   its peak but never enters a fit.
4. **Identification without knowing where the frame starts** — the seed
   (:func:`load_seed`, ``calib/wavecal_seeds.yaml``) gives the shape of λ(raw row).  The
   raw row of each detected peak is modelled as r(y) = r_c + b (y − y_c) + q ((y − y_c)/h)²
   (zero point r_c anywhere on the detector, stretch b within ±3 %, a bend q of up to
   ≈ 25 px).  For every (b, q) on a grid, all peak–line pairs vote for
   r_c = r_line − b (y_peak − y_c) − q (…)² with weight √(peak amplitude × line
   intensity) — a Hough transform, equivalent to cross-correlating the detected peaks
   with the line list rendered through the seed — smoothed by the line width.  The best
   distinct maxima are refined by iterative matching (greedy by line intensity,
   amplitude-consistent, tolerance 3 → 1 px) and polynomial fits of increasing degree
   with σ-clipping; the candidate that identifies most lines wins, provided it identifies
   most of the brightest peaks and finds most of the bright list lines (night-sky OH
   lines matched to the Xe list by chance do not).  A known ``row_offset`` (trimmed
   frames: ``CCDSEC``/``LTV2``) only narrows the first search window.
5. **2D** — every identified line is traced across the slit in bins of ``bin_width``
   (16) columns, outwards from the centre following the tilt; per-line outliers are
   rejected against a quadratic y(x); a 2D Legendre polynomial λ(y, x) (degree
   ``order_y`` in y, ``order_x`` in x, cross terms up to y³) is fitted with σ-clipping
   and rejection of whole lines whose median residual is off.  Then every line is
   measured again in every column (running 3-column median) and the fit is repeated with
   a per-column shift δ(x) along the dispersion (the median over lines of the residual
   positions in that column, smooth part removed): narrow irregularities of the slit
   edges move all lines of a column alike (−0.26 px over columns 349–353 of the
   2012-08-26 EFOSC2 arcs) and a smooth polynomial cannot follow them.  ``rms_px`` and
   ``rms_aa`` are the RMS residuals of this final fit (pixels: divided by |∂λ/∂y|).
   Saturated lines (in Gr#13 He I 5875.6 is the only line between 5016 and 6678 Å) enter
   with half weight.

Units and media
---------------
Wavelengths are in Å in the **medium of the line list**: air for EFOSC2 (He-Ar list,
``calib/arc_lines_HeAr.ecsv``), vacuum for SofI (PESSTO's Xe list is a vacuum list, and
DESIGN.md keeps SofI products in vacuum).  :attr:`WaveSolution.medium` and the header
keyword ``WAVEMED`` (``'AIR'`` / ``'VACUUM'``) always state it.

Pixel coordinates are 0-based numpy indices of the image passed to :func:`solve_arc`
(pixel centres at integers).  The seeds are written in 0-based rows of the raw
(untrimmed) frame.

References
----------
The approach follows common practice in automatic arc calibration — pattern voting /
cross-correlation against a line list rendered through a nominal solution, then
iterative identification and fitting (e.g. PypeIt's ``wavecal`` modules; IRAF
``identify``/``reidentify``/``fitcoords``) — implemented independently here.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from astropy.io import fits
from astropy.table import Table
from numpy.polynomial import legendre as npleg
from numpy.polynomial import polynomial as nppoly
from scipy.ndimage import gaussian_filter1d, percentile_filter, uniform_filter1d
from scipy.signal import find_peaks

from .._resources import calib_path
from ..errors import CalibrationError, SpecredError

log = logging.getLogger(__name__)

__all__ = ["WavecalSeed", "WaveSolution", "load_seed", "seed_names", "seed_for_setup", "solve_arc",
           "wavecal_file"]

SEED_FILE = "wavecal_seeds.yaml"
"""File in ``calib/`` holding the nominal solutions (see its header for the sources)."""

_CROSS_Y = 3
_LINE_NSIG = 4.0
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


# ============================================================================ seeds
@dataclass(frozen=True)
class WavecalSeed:
    """Nominal dispersion relation of one instrument set-up (see ``calib/wavecal_seeds.yaml``).

    Attributes
    ----------
    name : str
        Key in the YAML file, e.g. ``'EFOSC2_GR13'``.
    instrument, grism, lamp : str
        Set-up; ``lamp`` is the argument of :func:`specred.calib.arc_lines`.
    medium : str
        ``'air'`` or ``'vacuum'``: medium of :attr:`dispersion_poly`.
    direction : int
        +1 when the wavelength increases with the row, −1 otherwise.
    raw_rows : tuple of int
        ``[first, last + 1)`` rows of the raw frame that can receive light.
    wavelength_range : tuple of float
        Approximate range covered by the detector (Å, in :attr:`medium`).
    dispersion_poly : tuple of float
        λ(r) = Σ c_k r^k (increasing powers), r = 0-based raw row at the slit centre, Å.
    fwhm_px : float
        Nominal line FWHM in pixels along the dispersion (1" slit); only a first guess.
    order_y, order_x : int
        Degrees of the 2D Legendre fit along the dispersion and along the slit.
    citation : str
        Where the numbers come from.
    anchors : tuple
        ``(raw_row, wavelength)`` pairs the polynomial was fitted to.
    """

    name: str
    instrument: str
    grism: str
    lamp: str
    medium: str
    direction: int
    raw_rows: tuple[int, int]
    wavelength_range: tuple[float, float]
    dispersion_poly: tuple[float, ...]
    fwhm_px: float
    order_y: int
    order_x: int
    citation: str
    anchors: tuple = ()

    def wavelength(self, raw_row):
        """Nominal wavelength (Å, :attr:`medium`) at raw row(s) ``raw_row`` (0-based)."""
        return nppoly.polyval(np.asarray(raw_row, dtype=float), self.dispersion_poly)

    def dispersion(self, raw_row):
        """Nominal dλ/dr (Å per pixel, signed) at raw row(s) ``raw_row``."""
        return nppoly.polyval(np.asarray(raw_row, dtype=float), nppoly.polyder(self.dispersion_poly))

    def raw_row(self, wavelength, margin: float = 250.0):
        """Inverse of :meth:`wavelength`: raw row of ``wavelength`` (Å, :attr:`medium`).

        Evaluated on the monotonic part of the polynomial within ``margin`` rows of the
        detector; NaN outside.
        """
        r, w = _seed_grid(self, float(margin))
        return np.interp(np.asarray(wavelength, dtype=float), w, r, left=np.nan, right=np.nan)


@lru_cache(maxsize=32)
def _seed_grid(seed: WavecalSeed, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense (raw row, λ) table of the monotonic part of the seed, sorted by λ."""
    r = np.arange(seed.raw_rows[0] - margin, seed.raw_rows[1] + margin + 0.25, 0.25)
    w = seed.wavelength(r)
    good = np.sign(np.gradient(w)) == np.sign(seed.direction)
    # keep the monotonic run that contains the detector centre
    mid = int(np.argmin(np.abs(r - 0.5 * (seed.raw_rows[0] + seed.raw_rows[1]))))
    lo, hi = mid, mid
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(r) - 1 and good[hi + 1]:
        hi += 1
    r, w = r[lo:hi + 1], w[lo:hi + 1]
    if seed.direction < 0:
        r, w = r[::-1], w[::-1]
    return r, w


@lru_cache(maxsize=None)
def _seed_file() -> dict:
    path = calib_path(SEED_FILE)
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except Exception as exc:  # noqa: BLE001 - re-raised as a user-facing error
        raise SpecredError(f"calib/{SEED_FILE} is unreadable ({exc}); reinstall specred") from exc
    if not isinstance(doc, dict):
        raise SpecredError(f"calib/{SEED_FILE} does not hold a mapping of seeds; reinstall specred")
    return doc


def seed_names() -> list[str]:
    """Names of the seeds in ``calib/wavecal_seeds.yaml``."""
    return sorted(_seed_file())


def _norm_key(s: str) -> str:
    return re.sub(r"[\s_\-#]", "", str(s)).upper()


def load_seed(name: str) -> WavecalSeed:
    """The nominal solution ``name`` from ``calib/wavecal_seeds.yaml``.

    Parameters
    ----------
    name : str
        ``'EFOSC2_GR13'``, ``'SOFI_GB'`` or ``'SOFI_GR'`` (case, '-', '_', '#' and spaces
        ignored).

    Returns
    -------
    WavecalSeed

    Raises
    ------
    SpecredError
        Unknown name (the message lists the known seeds) or a malformed entry (names the
        missing key).
    """
    doc = _seed_file()
    keys = {_norm_key(k): k for k in doc}
    key = keys.get(_norm_key(name))
    if key is None:
        raise SpecredError(f"unknown wavelength-calibration seed {name!r}; known: {', '.join(sorted(doc))}")
    e = doc[key]
    try:
        return WavecalSeed(
            name=key, instrument=str(e["instrument"]), grism=str(e["grism"]), lamp=str(e["lamp"]),
            medium=str(e["medium"]).lower(), direction=int(np.sign(e["direction"])),
            raw_rows=(int(e["raw_rows"][0]), int(e["raw_rows"][1])),
            wavelength_range=(float(e["wavelength_range"][0]), float(e["wavelength_range"][1])),
            dispersion_poly=tuple(float(c) for c in e["dispersion_poly"]), fwhm_px=float(e["fwhm_px"]),
            order_y=int(e["order_y"]), order_x=int(e["order_x"]), citation=str(e.get("citation", "")),
            anchors=tuple(tuple(float(v) for v in a) for a in e.get("anchors", ())))
    except KeyError as exc:
        raise SpecredError(f"calib/{SEED_FILE}: seed {key} lacks the key {exc.args[0]!r}") from exc


def seed_for_setup(instrument: str, grism: str | None) -> str:
    """Seed name for an instrument (``'EFOSC2'``/``'EFOSC'``/``'SOFI'``) and grism name as
    written in the header (``'Gr#13'``, ``'GB'``, ``'GR'``).

    Raises
    ------
    CalibrationError
        No seed for that set-up.
    """
    inst = _norm_key(instrument)
    inst = "EFOSC2" if inst.startswith("EFOSC") else inst
    g = _norm_key(grism or "")
    for k, e in _seed_file().items():
        if _norm_key(e.get("instrument", "")) == inst and _norm_key(e.get("grism", "")) == g:
            return k
    raise CalibrationError(f"no wavelength-calibration seed for {instrument} grism {grism!r} "
                           f"(known: {', '.join(seed_names())})")


# ============================================================================ solution
# ============================================================================ solution
@dataclass
class WaveSolution:
    """A 2D wavelength solution λ(y, x) of one arc image.

    λ(y, x) = Σ_k c_k P_{i_k}(ŷ) P_{j_k}(x̂) with Legendre polynomials P,
    ŷ = 2 (y − δ(x))/(ny − 1) − 1 and x̂ = 2x/(nx − 1) − 1, where (y, x) are 0-based pixel
    coordinates of the image the solution was fitted on and δ(x) (:attr:`slit_shift`) is a
    per-column shift along the dispersion (pixels, zero-mean smooth part removed) that
    captures narrow irregularities of the slit edges (e.g. a −0.26 px notch over columns
    349–353 of the 2012-08-26 EFOSC2 arcs), which a smooth polynomial cannot follow.

    Attributes
    ----------
    coeffs : ndarray
        c_k (Å).
    terms : tuple of (int, int)
        (i_k, j_k): Legendre degrees in y and x of each coefficient.
    shape : tuple of int
        ``(ny, nx)`` of the image the solution describes.
    medium : str
        ``'air'`` or ``'vacuum'`` (medium of the line list).
    rms_px, rms_aa : float
        RMS of the residuals of the final fit (one centre per line per column, measured on
        a running 3-column median) in pixels along the dispersion and in Å.
    n_lines : int
        Number of distinct arc lines in the final fit.
    lines : astropy.table.Table
        One row per line per column bin (see :func:`solve_arc`).
    slit_shift : ndarray (nx,)
        δ(x) in pixels.
    seed : str
        Name of the seed used.
    row_offset : float
        Raw row of the seed (0-based) whose nominal wavelength equals the solution's
        wavelength of image row 0 at the slit centre: where the image starts on the
        detector according to the arc lines (compare with ``CCDSEC``/``LTV2``; exact only
        when the instrument matches the seed's dispersion).
    stretch : float
        Stretch of the seed found by the identification (1 = nominal dispersion).
    origin : tuple of int
        ``(row, column)`` of image pixel (0, 0) in a parent frame (e.g. the raw file the
        image was trimmed from); ``(0, 0)`` by default.
    parent_shape : tuple of int or None
        Shape of that parent frame (``None``: same as :attr:`shape`).
    meta : dict
        Provenance and quality numbers.
    """

    coeffs: np.ndarray
    terms: tuple
    shape: tuple[int, int]
    medium: str
    rms_px: float
    rms_aa: float
    n_lines: int
    lines: Table
    slit_shift: np.ndarray | None = None
    seed: str = ""
    row_offset: float = float("nan")
    stretch: float = 1.0
    origin: tuple[int, int] = (0, 0)
    parent_shape: tuple[int, int] | None = None
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ evaluation
    @property
    def order_y(self) -> int:
        return int(max(i for i, _ in self.terms))

    @property
    def order_x(self) -> int:
        return int(max(j for _, j in self.terms))

    def _cmatrix(self) -> np.ndarray:
        c = np.zeros((self.order_y + 1, self.order_x + 1))
        for (i, j), v in zip(self.terms, self.coeffs):
            c[i, j] = v
        return c

    def _shift(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if self.slit_shift is None:
            return np.zeros_like(x)
        return np.interp(x, np.arange(self.shape[1], dtype=float), self.slit_shift)

    def _norm(self, y, x):
        ny, nx = self.shape
        y = np.asarray(y, dtype=float) - self._shift(x)
        yn = 2.0 * y / max(ny - 1, 1) - 1.0
        xn = 2.0 * np.asarray(x, dtype=float) / max(nx - 1, 1) - 1.0
        return yn, xn

    def wavelength(self, y, x) -> np.ndarray:
        """Wavelength (Å, :attr:`medium`) at (fractional) pixel positions ``(y, x)`` of the
        image the solution was fitted on (0-based; broadcast against each other)."""
        y, x = np.broadcast_arrays(np.asarray(y, dtype=float), np.asarray(x, dtype=float))
        yn, xn = self._norm(y, x)
        return npleg.legval2d(yn, xn, self._cmatrix())

    def dispersion(self, y, x) -> np.ndarray:
        """∂λ/∂y in Å per pixel (signed) at ``(y, x)``."""
        y, x = np.broadcast_arrays(np.asarray(y, dtype=float), np.asarray(x, dtype=float))
        yn, xn = self._norm(y, x)
        dc = npleg.legder(self._cmatrix(), axis=0) * 2.0 / max(self.shape[0] - 1, 1)
        return npleg.legval2d(yn, xn, dc)

    def map(self, full: bool = False) -> np.ndarray:
        """Wavelength (Å, float64) of every pixel.

        Parameters
        ----------
        full : bool
            False: array of :attr:`shape` (the image the solution was fitted on).  True:
            array of :attr:`parent_shape` with the solution at :attr:`origin` and NaN
            outside (e.g. pre/overscan and unilluminated columns of a raw frame).
        """
        ny, nx = self.shape
        c = self._cmatrix()
        lx = npleg.legvander(2.0 * np.arange(nx) / max(nx - 1, 1) - 1.0, self.order_x)     # (nx, ox+1)
        if self.slit_shift is None or not np.any(self.slit_shift):
            ly = npleg.legvander(2.0 * np.arange(ny) / max(ny - 1, 1) - 1.0, self.order_y)
            m = np.einsum("yi,ij,xj->yx", ly, c, lx)
        else:
            yy = np.arange(ny, dtype=float)[:, None] - self.slit_shift[None, :]
            ly = npleg.legvander(2.0 * yy / max(ny - 1, 1) - 1.0, self.order_y)             # (ny, nx, oy+1)
            m = np.einsum("yxi,ij,xj->yx", ly, c, lx)
        if not full or self.parent_shape is None:
            return m
        out = np.full(self.parent_shape, np.nan)
        y0, x0 = self.origin
        out[y0:y0 + ny, x0:x0 + nx] = m
        return out

    # ------------------------------------------------------------------ I/O
    def to_header(self, header: fits.Header | None = None) -> fits.Header:
        """FITS keywords describing the solution (added to a copy of ``header``).

        ``BUNIT`` = 'Angstrom' (for a wavelength map), ``WAVEMED`` ('AIR'/'VACUUM'),
        ``WAVERMS`` (px), ``WAVERMSA`` (Å), ``WAVENLIN``, ``WAVESEED``, ``WAVEROFF``,
        ``WAVESTR``, ``WAVESHMX`` (largest |δ(x)|), the smooth polynomial (``WAVEFUNC``,
        ``WAVENY``/``WAVENX`` normalisation, ``WAVEOY``/``WAVEOX`` degrees, ``WC<i>_<j>``
        coefficients) and ``WAVEY0``/``WAVEX0`` (origin in the parent frame).
        """
        h = fits.Header() if header is None else header.copy()
        h["BUNIT"] = ("Angstrom", "wavelength of every pixel")
        h["WAVEMED"] = ("AIR" if self.medium == "air" else "VACUUM", "wavelength medium")
        h["WAVERMS"] = (round(float(self.rms_px), 4), "arc fit RMS (pixels)")
        h["WAVERMSA"] = (round(float(self.rms_aa), 4), "arc fit RMS (Angstrom)")
        h["WAVENLIN"] = (int(self.n_lines), "arc lines in the fit")
        h["WAVESEED"] = (self.seed, "nominal solution (calib/wavecal_seeds.yaml)")
        h["WAVEROFF"] = (round(float(self.row_offset), 3), "raw row of image row 0 found (seed system)")
        h["WAVESTR"] = (round(float(self.stretch), 5), "stretch of the seed found")
        shmax = 0.0 if self.slit_shift is None else float(np.max(np.abs(self.slit_shift)))
        h["WAVESHMX"] = (round(shmax, 4), "max |per-column slit shift| (pixels)")
        h["WAVEFUNC"] = ("legendre2d", "lambda=sum c_ij P_i(yn) P_j(xn)")
        h["WAVENY"] = (int(self.shape[0]), "yn = 2(y-shift(x))/(WAVENY-1)-1, y 0-based")
        h["WAVENX"] = (int(self.shape[1]), "xn = 2x/(WAVENX-1)-1, x 0-based")
        h["WAVEOY"] = (self.order_y, "Legendre degree along the dispersion")
        h["WAVEOX"] = (self.order_x, "Legendre degree along the slit")
        h["WAVEY0"] = (int(self.origin[0]), "row of solution pixel (0,0) in the parent")
        h["WAVEX0"] = (int(self.origin[1]), "column of solution pixel (0,0) in the parent")
        for (i, j), c in zip(self.terms, self.coeffs):
            h[f"WC{i}_{j}"] = (float(c), "Legendre coefficient (Angstrom)")
        return h


# ============================================================================ 1D helpers
def _robust_sigma(x, axis=None) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    med = np.nanmedian(x, axis=axis, keepdims=True)
    return 1.4826 * np.nanmedian(np.abs(x - med), axis=axis)


def _noise(spec: np.ndarray) -> np.ndarray:
    """Per-pixel noise of spectra along axis 0 from the MAD of first differences."""
    return np.maximum(_robust_sigma(np.diff(spec, axis=0), axis=0) / np.sqrt(2.0), 1e-12)


def _background(spec: np.ndarray, width: int) -> np.ndarray:
    """Smooth lower envelope of spectra along axis 0 (running 20th percentile, smoothed)."""
    width = int(max(5, width)) | 1
    size = (width,) + (1,) * (spec.ndim - 1)
    bg = percentile_filter(spec, 20, size=size, mode="nearest")
    return uniform_filter1d(bg, max(3, width // 2), axis=0, mode="nearest")


def _fit_gaussians(data: np.ndarray, col: np.ndarray, y0: np.ndarray, sig0, hw: int, *,
                   bad: np.ndarray | None = None, n_iter: int = 25, recentre: bool = True) -> dict:
    """Batched Levenberg–Marquardt fits of A·exp(−½((y−μ)/s)²) + B0 + B1 (y − y_w).

    Parameters
    ----------
    data : ndarray (ny, ncol)
        Spectra along axis 0 (NaN = missing).
    col : int array (n,)
        Column of ``data`` of each fit.
    y0 : float array (n,)
        First guesses of μ (window centred on ``round(y0)``, ±``hw`` pixels).
    sig0 : float or array
        First guess of s.
    hw : int
        Half width of the fitting window.
    bad : bool ndarray like ``data``, optional
        Pixels to ignore (saturated, bad).

    Returns
    -------
    dict of arrays ``amp``, ``mu``, ``sigma``, ``bkg``, ``mu_err``, ``peak`` (maximum of the
    data in the window core) and ``ok`` (converged, finite, positive, μ inside the window).
    """
    n = len(y0)
    ny = data.shape[0]
    col = np.asarray(col, dtype=int)
    y0 = np.asarray(y0, dtype=float)
    if n == 0:
        z = np.zeros(0)
        return dict(amp=z, mu=z, sigma=z, bkg=z, mu_err=z, peak=z, ok=np.zeros(0, bool))
    sig0 = np.broadcast_to(np.asarray(sig0, dtype=float), (n,)).copy()
    offs = np.arange(-hw, hw + 1)
    core = np.abs(offs) <= max(1, hw // 3)
    eye = np.eye(5)[None]
    result = None
    centre = np.where(np.isfinite(y0), y0, 0.0)
    for _pass in range(2 if recentre else 1):
        yc = np.round(centre).astype(int)
        rows = yc[:, None] + offs[None, :]
        inside = (rows >= 0) & (rows < ny)
        rc = np.clip(rows, 0, ny - 1)
        d = data[rc, col[:, None]]
        w = inside & np.isfinite(d)
        if bad is not None:
            w &= ~bad[rc, col[:, None]]
        d = np.where(w, d, 0.0)
        big = np.where(w, d, -np.inf)
        yy = rows.astype(float)
        yw = yc[:, None].astype(float)
        wf = w.astype(float)
        nvalid = wf.sum(1)
        small = np.where(w, d, np.inf)
        dmin = np.min(small, axis=1)
        dmin = np.where(np.isfinite(dmin), dmin, 0.0)
        peak = np.max(np.where(core[None, :], big, -np.inf), axis=1)
        peak = np.where(np.isfinite(peak), peak, np.max(big, axis=1))
        peak = np.where(np.isfinite(peak), peak, 0.0)
        mu0 = centre if result is None else result["mu"]
        s0 = sig0 if result is None else np.where(result["ok"], result["sigma"], sig0)
        p = np.stack([np.maximum(peak - dmin, 1e-6), mu0, s0, dmin, np.zeros(n)], axis=1)

        def residuals(p):
            z = (yy - p[:, 1:2]) / p[:, 2:3]
            g = np.exp(-0.5 * z * z)
            model = p[:, 0:1] * g + p[:, 3:4] + p[:, 4:5] * (yy - yw)
            return (d - model) * wf, g, z

        def jacobian(p, g, z):
            a, s = p[:, 0:1], p[:, 2:3]
            return np.stack([g, a * g * z / s, a * g * z * z / s, np.ones_like(g), yy - yw], axis=2) * wf[..., None]

        r, g, z = residuals(p)
        chi2 = np.sum(r * r, axis=1)
        lam = np.full(n, 1e-3)
        for _it in range(n_iter):
            jac = jacobian(p, g, z)
            jt = jac.transpose(0, 2, 1)
            jtj = jt @ jac
            jtr = (jt @ r[..., None])[..., 0]
            diag = np.diagonal(jtj, axis1=1, axis2=2)
            h = jtj + (lam[:, None] * diag + 1e-9 * (diag.max(axis=1, keepdims=True) + 1e-30))[:, :, None] * eye
            try:
                step = np.linalg.solve(h, jtr[..., None])[..., 0]
            except np.linalg.LinAlgError:
                step = np.einsum("nij,nj->ni", np.linalg.pinv(h), jtr)
            pn = p + step
            pn[:, 2] = np.clip(pn[:, 2], 0.25, 2.0 * hw)
            pn[:, 1] = np.clip(pn[:, 1], yw[:, 0] - hw, yw[:, 0] + hw)
            rn, gn, zn = residuals(pn)
            chi2n = np.sum(rn * rn, axis=1)
            better = np.isfinite(chi2n) & (chi2n <= chi2)
            p = np.where(better[:, None], pn, p)
            r = np.where(better[:, None], rn, r)
            g = np.where(better[:, None], gn, g)
            z = np.where(better[:, None], zn, z)
            converged = better & (np.abs(step[:, 1]) < 1e-4)
            chi2 = np.where(better, chi2n, chi2)
            lam = np.where(better, lam / 3.0, lam * 5.0)
            if np.all(converged | (lam > 1e8)):
                break
        jac = jacobian(p, g, z)
        jtj = jac.transpose(0, 2, 1) @ jac
        diag = np.diagonal(jtj, axis1=1, axis2=2)
        jtj = jtj + 1e-9 * (diag.max(axis=1, keepdims=True) + 1e-30)[:, :, None] * eye
        try:
            cov = np.linalg.inv(jtj)
            var_mu = cov[:, 1, 1] * chi2 / np.maximum(nvalid - 5, 1)
        except np.linalg.LinAlgError:
            var_mu = np.full(n, np.inf)
        mu_err = np.sqrt(np.where(var_mu > 0, var_mu, np.inf))
        ok = (np.isfinite(p).all(axis=1) & (p[:, 0] > 0) & (np.abs(p[:, 1] - yw[:, 0]) < hw - 0.5)
              & (nvalid >= 6) & np.isfinite(mu_err) & np.isfinite(y0))
        result = dict(amp=p[:, 0], mu=p[:, 1], sigma=p[:, 2], bkg=p[:, 3], mu_err=mu_err, peak=peak, ok=ok)
        if not recentre or np.all(np.abs(p[:, 1] - yw[:, 0]) < 0.75):
            break
        centre = np.where(ok, p[:, 1], centre)
    return result


def _centre_halfwidth(fwhm: float) -> float:
    """Half width h of the flux-balance window: IRAF ``center1d`` with ``fwidth = 2h``;
    PESSTO identifies NTT arcs with fwidth = 7 px, widened for very broad lines."""
    return max(3.5, 0.6 * float(fwhm))


def _balance_centre(data: np.ndarray, col: np.ndarray, y0: np.ndarray, h: float, *,
                    bad: np.ndarray | None = None, noise=None, n_iter: int = 16) -> dict:
    """Line centres where the flux in [y − h, y] equals the flux in [y, y + h].

    The symmetric-window centre of IRAF ``center1d`` (emission features), with pixels
    treated as boxes: F(y) = C(y + h) + C(y − h) − 2 C(y) = 0, C the cumulative flux, solved
    by bisection within ±0.75 h of ``y0`` (vectorised over all requests).  A constant
    background cancels; a sloped one biases the centre, so pass background-subtracted
    data; saturated plateaus and partly masked cores (masked pixels take the
    window maximum) stay symmetric, so no line-shape model is needed.

    Parameters
    ----------
    data : ndarray (ny, ncol)
        Spectra along axis 0.
    col, y0 : arrays (n,)
        Column of ``data`` and first guess of each centre.
    h : float
        Half width of the balance window (pixels).
    bad : bool ndarray like ``data``, optional
        Masked (saturated) pixels.
    noise : float or array (n,), optional
        Pixel noise, for the centre uncertainty.

    Returns
    -------
    dict of arrays ``mu``, ``err``, ``amp`` (data at the centre) and ``ok``
    (a root was bracketed).
    """
    n = len(y0)
    ny = data.shape[0]
    col = np.asarray(col, dtype=int)
    y0 = np.asarray(y0, dtype=float)
    if n == 0:
        z = np.zeros(0)
        return dict(mu=z, err=z, amp=z, ok=np.zeros(0, bool))
    fin0 = np.isfinite(y0)
    y0c = np.where(fin0, y0, 0.0)
    H = int(np.ceil(1.75 * h)) + 1
    yc = np.round(y0c).astype(int)
    offs = np.arange(-H, H + 1)
    rows = yc[:, None] + offs[None, :]
    inside = (rows >= 0) & (rows < ny)
    rc = np.clip(rows, 0, ny - 1)
    d = np.asarray(data[rc, col[:, None]], dtype=float)
    ok_px = inside & np.isfinite(d)
    top = np.max(np.where(ok_px, d, -np.inf), axis=1)
    low = np.min(np.where(ok_px, d, np.inf), axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    low = np.where(np.isfinite(low), low, 0.0)
    if bad is not None:
        masked = inside & bad[rc, col[:, None]]
        d = np.where(masked, top[:, None], d)
        ok_px |= masked
    d = np.where(ok_px, d, low[:, None])
    rr = np.arange(n)
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(d, axis=1)], axis=1)
    last = cum.shape[1] - 1

    def c_at(x):                     # x relative to yc; edge k sits at offset k - H - 0.5
        t = np.clip(x + H + 0.5, 0.0, last - 1e-9)
        i = t.astype(int)
        return cum[rr, i] + (t - i) * (cum[rr, i + 1] - cum[rr, i])

    def fbal(x):
        return c_at(x + h) + c_at(x - h) - 2.0 * c_at(x)

    lo = (y0c - yc) - 0.75 * h
    hi = (y0c - yc) + 0.75 * h
    ok = (fbal(lo) > 0) & (fbal(hi) < 0) & fin0 & (top > low)
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        pos = fbal(mid) > 0
        lo = np.where(pos, mid, lo)
        hi = np.where(pos, hi, mid)
    x = 0.5 * (lo + hi)
    mu = yc + x
    ic = np.clip(np.round(x).astype(int) + H, 0, 2 * H)
    amp = d[rr, ic]                    # height of the line at its centre (background-subtracted data)
    # 1-sigma: sqrt(2h) * noise / |dF/dy|, dF/dy = I(y+h) + I(y-h) - 2 I(y)
    slope = np.abs(fbal(x + 0.05) - fbal(x - 0.05)) / 0.1
    nz = 0.0 if noise is None else np.broadcast_to(np.asarray(noise, dtype=float), (n,))
    err = np.sqrt(2.0 * h) * nz / np.maximum(slope, 1e-12)
    return dict(mu=np.where(ok, mu, y0), err=err, amp=amp, ok=ok)


@dataclass
class _Peaks:
    y: np.ndarray           # fitted centre (image rows)
    amp: np.ndarray         # fitted amplitude above the background
    sigma: np.ndarray       # fitted Gaussian sigma (px)
    err: np.ndarray         # centre uncertainty (px)
    saturated: np.ndarray   # bool
    spike: np.ndarray       # bool: far too narrow / too wide / failed fit
    crowded: np.ndarray     # bool: another peak too close
    edge: np.ndarray        # bool: too close to the first/last row
    fwhm: float             # median line FWHM (px)
    noise: float

    @property
    def usable(self) -> np.ndarray:
        return ~self.spike

    @property
    def fittable(self) -> np.ndarray:
        """Good for the 1D identification fit (unsaturated, isolated, not at an edge)."""
        return ~(self.spike | self.saturated | self.crowded | self.edge)


def _saturated_peaks(s: np.ndarray, idx: np.ndarray, mfrac: np.ndarray, spec: np.ndarray,
                     saturation: float | None) -> np.ndarray:
    """Saturation flags: masked core, explicit level, or a flat top at the frame maximum."""
    ny = len(s)
    sat = np.zeros(len(idx), bool)
    for off in (-1, 0, 1):
        sat |= mfrac[np.clip(idx + off, 0, ny - 1)] > 0.3
    if saturation is not None:
        sat |= spec[idx] >= 0.97 * saturation
    if len(idx):
        gmax = np.max(s[idx])
        win = s[np.clip(idx[:, None] + np.arange(-3, 4)[None, :], 0, ny - 1)]
        flat = np.sum(win >= 0.98 * s[idx][:, None], axis=1) >= 3
        sat |= flat & (s[idx] >= 0.75 * gmax)
    return sat


def _detect_peaks(spec: np.ndarray, mfrac: np.ndarray, fwhm_guess: float, min_snr: float,
                  saturation: float | None) -> _Peaks:
    """Detect and centroid the emission lines of a 1D arc spectrum (see module doc)."""
    ny = len(spec)
    s = spec - _background(spec, max(41, int(12 * fwhm_guess)))
    noise = float(_noise(s))
    idx, _props = find_peaks(s, prominence=min_snr * noise, distance=max(2, int(0.4 * fwhm_guess)))
    z = np.zeros(0)
    if len(idx) == 0:
        f = np.zeros(0, bool)
        return _Peaks(z, z, z, z, f, f, f, f, fwhm_guess, noise)
    sat = _saturated_peaks(s, idx, mfrac, spec, saturation)
    bad = (mfrac > 0.3)[:, None]
    fwhm = fwhm_guess
    for _ in range(3):   # fit with the guessed width, then with the measured one
        hw = int(max(3, round(1.2 * fwhm)))
        f = _fit_gaussians(s[:, None], np.zeros(len(idx), int), idx.astype(float), fwhm / _FWHM_PER_SIGMA, hw,
                           bad=bad)
        good = f["ok"] & ~sat & (f["sigma"] > 0.6)
        if np.count_nonzero(good) >= 3:
            order = np.argsort(-np.where(good, f["amp"], -np.inf))[:15]
            order = order[good[order]]
            new = float(np.median(f["sigma"][order])) * _FWHM_PER_SIGMA
        else:
            new = fwhm
        done = abs(new - fwhm) < 0.1 * fwhm
        fwhm = new
        if done:
            break
    sig_med = fwhm / _FWHM_PER_SIGMA
    spike = (~f["ok"] | (f["sigma"] < 0.45 * sig_med) | (f["sigma"] > 2.2 * sig_med)
             | (f["amp"] < 0.5 * min_snr * noise))
    y = np.where(f["ok"], f["mu"], idx.astype(float))
    amp = np.where(f["ok"], f["amp"], np.maximum(s[idx], 0.0))
    # centres: flux balance (IRAF center1d convention), also for saturated plateaus
    b = _balance_centre(s[:, None], np.zeros(len(idx), int), y, _centre_halfwidth(fwhm), bad=bad, noise=noise)
    y = np.where(b["ok"], b["mu"], y)
    amp[sat] = b["amp"][sat]
    spike[sat] = ~b["ok"][sat]
    spike &= ~(sat & b["ok"])
    err = np.where(b["ok"], b["err"], np.inf)
    # one peak per line: drop detections that converged onto a stronger peak's centre
    keep = np.ones(len(y), bool)
    for i in np.argsort(-amp):
        if keep[i]:
            dup = (np.abs(y - y[i]) < 0.5 * fwhm) & keep
            dup[i] = False
            keep &= ~dup
    y, amp, sat, spike, err = y[keep], amp[keep], sat[keep], spike[keep], err[keep]
    f = {k: v[keep] for k, v in f.items()}
    # crowded: another detected peak with > 10 % of the amplitude within 1.5 FWHM
    dy = np.abs(y[:, None] - y[None, :])
    ratio = amp[None, :] / np.maximum(amp[:, None], 1e-12)
    crowded = ((dy < 1.5 * fwhm) & (dy > 0) & (ratio > 0.1) & ~spike[None, :]).any(axis=1)
    hw = int(max(3, round(1.2 * fwhm)))
    edge = (y < hw) | (y > ny - 1 - hw)
    return _Peaks(y=y, amp=amp, sigma=f["sigma"], err=err, saturated=sat, spike=spike, crowded=crowded,
                  edge=edge, fwhm=float(fwhm), noise=noise)


# ============================================================================ line list
@dataclass
class _Lines:
    lam: np.ndarray         # wavelength (Å, list medium); unresolved blends merged
    lam_seed: np.ndarray    # same in the seed medium
    r: np.ndarray           # nominal raw row
    inten: np.ndarray       # relative intensity
    blended: np.ndarray     # bool: never enters a fit
    species: np.ndarray     # str
    ncomp: np.ndarray       # number of merged list entries


_NOTE_WAVE = re.compile(r"(?<![\d.])(\d{4,5}\.\d+)")


def _prepare_lines(table: Table, seed: WavecalSeed, fwhm_px: float, list_medium: str,
                   preferred_only: bool = False) -> _Lines:
    """Merge unresolved lines, flag blends, place the lines on the seed (see module doc).

    A line is *blended* when a neighbour of the (merged) list lies within 1.0 FWHM with
    ≥ 2 % of its intensity, within 1.6 FWHM with ≥ 10 % or within 2.2 FWHM with ≥ 40 %, or
    when its ``note`` names a wavelength within 2 FWHM that is not in the list (e.g.
    'Ar I 4200.674 with Ar I 4198.32').
    """
    from .. import calib

    if "wavelength" not in table.colnames:
        raise CalibrationError("line list has no 'wavelength' column")
    lam = np.asarray(table["wavelength"], dtype=float)
    inten = (np.asarray(table["intensity"], dtype=float) if "intensity" in table.colnames
             else np.ones(len(lam)))
    species = (np.asarray(table["species"]).astype(str) if "species" in table.colnames
               else np.full(len(lam), ""))
    notes = (np.asarray(table["note"]).astype(str) if "note" in table.colnames else np.full(len(lam), ""))
    pref = (np.asarray(table["preferred"], dtype=bool) if (preferred_only and "preferred" in table.colnames)
            else np.ones(len(lam), bool))
    ok = np.isfinite(lam) & np.isfinite(inten) & (inten > 0)
    lam, inten, species, notes, pref = lam[ok], inten[ok], species[ok], notes[ok], pref[ok]
    o = np.argsort(lam)
    lam, inten, species, notes, pref = lam[o], inten[o], species[o], notes[o], pref[o]
    if list_medium != seed.medium:
        lam_seed = calib.vacuum_to_air(lam) if seed.medium == "air" else calib.air_to_vacuum(lam)
    else:
        lam_seed = lam
    r = seed.raw_row(lam_seed)
    mid = 0.5 * sum(seed.raw_rows)
    fw_aa = fwhm_px * np.abs(seed.dispersion(np.where(np.isfinite(r), r, mid)))
    # lines blended with a line that is not in the list (named in the note)
    unlisted = np.zeros(len(lam), bool)
    for k, note in enumerate(notes):
        for m in _NOTE_WAVE.findall(note):
            w = float(m)
            if 0.5 < abs(w - lam[k]) < 2.0 * fw_aa[k] and not np.any(np.abs(lam - w) < 0.05):
                unlisted[k] = True
    # merge chains of lines closer than 0.3 FWHM
    gap = np.diff(lam) >= 0.3 * 0.5 * (fw_aa[1:] + fw_aa[:-1])
    group = np.concatenate([[0], np.cumsum(gap)]).astype(int)
    ng = int(group[-1]) + 1 if len(lam) else 0
    wsum = np.bincount(group, inten, ng)
    m_lam = np.bincount(group, inten * lam, ng) / wsum
    m_seed = np.bincount(group, inten * lam_seed, ng) / wsum
    ncomp = np.bincount(group, None, ng).astype(int)
    m_unl = np.bincount(group, unlisted.astype(float), ng) > 0
    m_unl |= np.bincount(group, pref.astype(float), ng) == 0
    m_species = np.array(["+".join(dict.fromkeys(species[group == g])) for g in range(ng)]) if ng \
        else np.zeros(0, str)
    m_r = seed.raw_row(m_seed)
    m_fw = fwhm_px * np.abs(seed.dispersion(np.where(np.isfinite(m_r), m_r, mid)))
    sep = np.abs(m_lam[:, None] - m_lam[None, :]) / m_fw[:, None]
    rel = wsum[None, :] / wsum[:, None]
    near = sep > 0
    blended = (near & (((sep < 1.0) & (rel >= 0.02)) | ((sep < 1.6) & (rel >= 0.1))
                       | ((sep < 2.2) & (rel >= 0.4)))).any(axis=1) | m_unl
    keep = np.isfinite(m_r)
    return _Lines(lam=m_lam[keep], lam_seed=m_seed[keep], r=m_r[keep], inten=wsum[keep], blended=blended[keep],
                  species=m_species[keep], ncomp=ncomp[keep])


# ============================================================================ identification
def _search(py: np.ndarray, pw: np.ndarray, lr: np.ndarray, lw: np.ndarray, ny: int, seed: WavecalSeed,
            fwhm: float, prior_rc: float | None, window: float, n_cand: int = 8,
            stretch: float = 0.03, max_bend: float = 25.0) -> list[tuple[float, float, float, float]]:
    """Vote for (r_c, b, q): raw row of the image centre, stretch, bend (see module doc).

    Returns up to ``n_cand`` distinct candidates ``(r_c, b, q, score)``, best first.
    """
    yc = 0.5 * (ny - 1)
    h = max(0.5 * ny, 1.0)
    step = 0.5
    dy = py - yc
    nb = int(round(2 * stretch / 0.001)) + 1
    bs = 1.0 + np.linspace(-stretch, stretch, nb)
    qmax = max_bend * (h / 512.0) ** 2
    nq = max(1, int(round(2 * qmax / 1.0)) + 1)
    qs = np.linspace(-qmax, qmax, nq) if nq > 1 else np.zeros(1)
    if prior_rc is not None:
        lo, hi = prior_rc - window, prior_rc + window
    else:
        lo = seed.raw_rows[0] + yc - 150.0
        hi = seed.raw_rows[1] - 1 - yc + 150.0
        if hi < lo:
            lo, hi = min(lo, hi) - 150.0, max(lo, hi) + 150.0
    na = int(np.ceil((hi - lo) / step)) + 1
    if na < 3 or len(py) == 0 or len(lr) == 0:
        return []
    wpair = (pw[:, None] * lw[None, :]).reshape(1, len(py), len(lr))
    score = np.zeros((nb, nq, na))
    bend = (dy / h) ** 2
    qi = np.arange(nq)[:, None, None] * na
    for ib, b in enumerate(bs):
        rp = b * dy[None, :] + qs[:, None] * bend[None, :]              # (nq, npk)
        k = np.rint((lr[None, None, :] - rp[:, :, None] - lo) / step).astype(int)
        inside = (k >= 0) & (k < na)
        flat = (qi + k)[inside]
        wts = np.broadcast_to(wpair, k.shape)[inside]
        score[ib] = np.bincount(flat, wts, nq * na).reshape(nq, na)
    sig = max(0.8, 0.4 * fwhm) / step
    score = gaussian_filter1d(score, sig, axis=2, mode="constant")
    flat = score.reshape(nb * nq, na)
    best = flat.argmax(axis=0)
    prof = flat[best, np.arange(na)]
    pk, _ = find_peaks(np.concatenate([[0.0], prof, [0.0]]), distance=max(1, int(1.5 * fwhm / step)))
    pk = pk - 1
    pk = pk[(pk >= 0) & (pk < na)]
    if len(pk) == 0:
        pk = np.array([int(np.argmax(prof))])
    pk = pk[np.argsort(-prof[pk])][:n_cand]
    out = []
    for k in pk:
        ib, iq = divmod(int(best[k]), nq)
        out.append((lo + k * step, float(bs[ib]), float(qs[iq]), float(prof[k])))
    return out


@dataclass
class _Identification:
    line_idx: np.ndarray      # index into _Lines of each match
    peak_idx: np.ndarray      # index into _Peaks
    used: np.ndarray          # bool: entered the final 1D fit
    model: object             # callable y -> λ (list medium)
    rms_px: float
    n_used: int
    scale: float              # peak amplitude per unit list intensity
    rc: float
    b: float
    q: float
    frac_peaks: float = 0.0   # fraction of the 10 brightest peaks identified
    frac_lines: float = 0.0   # fraction of the list lines expected > 20 sigma that were found


def _identify(cand, pk: _Peaks, ln: _Lines, ny: int, seed: WavecalSeed, deg: int) -> _Identification | None:
    """Iterative matching and fitting starting from a search candidate."""
    rc, b, q = cand[:3]
    yc = 0.5 * (ny - 1)
    h = max(0.5 * ny, 1.0)
    ygrid = np.arange(-2.0, ny + 1.5, 0.5)
    yn_grid = 2.0 * ygrid / max(ny - 1, 1) - 1.0

    def base(y):
        return seed.wavelength(rc + b * (y - yc) + q * ((y - yc) / h) ** 2)

    base_grid = base(ygrid)
    # base is in the seed medium; the list medium offset is absorbed by the correction
    corr = np.zeros(1)
    fw = pk.fwhm
    schedule = [(max(3.0, 0.8 * fw), 1), (max(2.0, 0.5 * fw), 2), (max(1.5, 0.35 * fw), 3),
                (max(1.0, 0.25 * fw), deg), (max(1.0, 0.25 * fw), deg)]
    usable = pk.usable
    scale = None
    line_order = np.argsort(-ln.inten)
    result = None
    for tol, d in schedule:
        lam_grid = base_grid + npleg.legval(yn_grid, corr)
        dl = np.diff(lam_grid)
        if not (np.all(dl > 0) or np.all(dl < 0)):
            return None
        srt = np.argsort(lam_grid)
        ypred = np.interp(ln.lam, lam_grid[srt], ygrid[srt], left=np.nan, right=np.nan)
        claimed = np.zeros(len(pk.y), bool)
        li, pi = [], []
        for j in line_order:
            yp = ypred[j]
            if not np.isfinite(yp) or yp < -1 or yp > ny:
                continue
            dist = np.abs(pk.y - yp)
            cand_ok = usable & ~claimed & (dist < tol)
            if scale is not None:
                ratio = pk.amp / max(scale * ln.inten[j], 1e-12)
                cand_ok &= ((ratio < 8.0) | pk.saturated) & (ratio > 1.0 / 8.0)
            if not cand_ok.any():
                continue
            i = int(np.argmin(np.where(cand_ok, dist, np.inf)))
            claimed[i] = True
            li.append(j)
            pi.append(i)
        li, pi = np.array(li, int), np.array(pi, int)
        if len(li) < 3:
            return None
        unsat = ~pk.saturated[pi]
        if np.count_nonzero(unsat) >= 3:
            scale = float(np.median(pk.amp[pi[unsat]] / ln.inten[li[unsat]]))
        fit_ok = ~ln.blended[li] & pk.fittable[pi]
        if scale is not None:   # attenuated (filter edge) or anomalously bright (unlisted blend)
            ratio = pk.amp[pi] / (scale * ln.inten[li])
            fit_ok &= (ratio > 0.2) & (ratio < 5.0)
        if np.count_nonzero(fit_ok) < 3:
            return None
        yfit = pk.y[pi]
        target = ln.lam[li] - base(yfit)
        yn = 2.0 * yfit / max(ny - 1, 1) - 1.0
        disp_grid = np.abs(np.gradient(lam_grid, ygrid))
        disp = np.interp(yfit, ygrid, disp_grid)
        use = fit_ok.copy()
        dd = int(min(d, max(0, np.count_nonzero(use) - 3)))
        for _clip in range(5):
            c = npleg.legfit(yn[use], target[use], dd)
            res_px = (target - npleg.legval(yn, c)) / disp
            sig = max(1.4826 * np.median(np.abs(res_px[use])), 0.05)
            new = fit_ok & (np.abs(res_px) < max(3.0 * sig, 0.25))
            if np.count_nonzero(new) < dd + 2:
                break
            if np.array_equal(new, use):
                break
            use = new
        corr = npleg.legfit(yn[use], target[use], dd)
        res_px = (target - npleg.legval(yn, corr)) / disp
        rms = float(np.sqrt(np.mean(res_px[use] ** 2)))
        result = (li, pi, use, corr.copy(), rms)
    li, pi, use, corr, rms = result
    # plausibility of the identification (an arc, not e.g. night-sky lines matched by chance):
    # the brightest peaks must be identified, and the bright list lines must be found
    cand_pk = pk.usable & ~pk.edge & ~pk.crowded
    bright = np.argsort(-np.where(cand_pk, pk.amp, -np.inf))[:10]
    bright = bright[cand_pk[bright]]
    frac_peaks = float(np.isin(bright, pi).mean()) if len(bright) else 0.0
    lam_grid = base_grid + npleg.legval(yn_grid, corr)
    srt = np.argsort(lam_grid)
    ypred = np.interp(ln.lam, lam_grid[srt], ygrid[srt], left=np.nan, right=np.nan)
    inside = np.isfinite(ypred) & (ypred > 2 * fw) & (ypred < ny - 1 - 2 * fw)
    expect = inside & (np.nan_to_num(scale or 0.0) * ln.inten > 20.0 * pk.noise)
    frac_lines = float(np.isin(np.nonzero(expect)[0], li).mean()) if expect.any() else 0.0

    def model(y, _corr=corr):
        y = np.asarray(y, dtype=float)
        return base(y) + npleg.legval(2.0 * y / max(ny - 1, 1) - 1.0, _corr)

    return _Identification(line_idx=li, peak_idx=pi, used=use, model=model, rms_px=rms,
                           n_used=int(np.count_nonzero(use)), scale=float(scale or np.nan), rc=rc, b=b, q=q,
                           frac_peaks=frac_peaks, frac_lines=frac_lines)


# ============================================================================ 2D
def _column_bins(nx: int, bin_width: int) -> np.ndarray:
    nb = max(3, int(round(nx / bin_width)))
    return np.linspace(0, nx, nb + 1).round().astype(int)


def _binned_spectra(img: np.ndarray, mask: np.ndarray | None, edges: np.ndarray):
    nb = len(edges) - 1
    ny = img.shape[0]
    spec = np.empty((ny, nb))
    mfrac = np.zeros((ny, nb))
    has_nan = not np.all(np.isfinite(img))
    for k in range(nb):
        blk = img[:, edges[k]:edges[k + 1]]
        spec[:, k] = np.nanmedian(blk, axis=1) if has_nan else np.median(blk, axis=1)
        if mask is not None:
            mfrac[:, k] = mask[:, edges[k]:edges[k + 1]].mean(axis=1)
    return spec, mfrac


def _trace(spec: np.ndarray, bad: np.ndarray, noise: np.ndarray, k0: int, y_start: np.ndarray,
           sat: np.ndarray, fwhm: float, min_snr: float) -> tuple[np.ndarray, np.ndarray]:
    """Follow lines from bin ``k0`` outwards; returns (y, y_err) arrays (nlines, nbins),
    NaN where a line was not measured."""
    nl = len(y_start)
    nb = spec.shape[1]
    Y = np.full((nl, nb), np.nan)
    E = np.full((nl, nb), np.nan)
    h = _centre_halfwidth(fwhm)
    tol = max(0.75, 0.2 * fwhm)

    def fit_at(k, ypred, alive):
        idx = np.nonzero(alive)[0]
        b = _balance_centre(spec, np.full(len(idx), k), ypred[idx], h, bad=bad, noise=noise[k])
        good = b["ok"] & (np.abs(b["mu"] - ypred[idx]) < tol) & (b["amp"] > min_snr * noise[k])
        return idx, dict(mu=b["mu"], mu_err=b["err"]), good

    idx, f, good = fit_at(k0, y_start, np.ones(nl, bool))
    Y[idx[good], k0] = f["mu"][good]
    E[idx[good], k0] = f["mu_err"][good]
    for step in (1, -1):
        last = np.where(np.isfinite(Y[:, k0]), Y[:, k0], y_start)
        last_k = np.full(nl, k0)
        slope = np.zeros(nl)
        nslope = np.zeros(nl, int)
        alive = np.ones(nl, bool)
        misses = np.zeros(nl, int)
        k = k0 + step
        while 0 <= k < nb and alive.any():
            ypred = last + slope * (k - last_k)
            idx, f, good = fit_at(k, ypred, alive)
            gi = idx[good]
            Y[gi, k] = f["mu"][good]
            E[gi, k] = f["mu_err"][good]
            new_slope = (f["mu"][good] - last[gi]) / (k - last_k[gi])
            slope[gi] = np.where(nslope[gi] > 0, 0.6 * slope[gi] + 0.4 * new_slope, new_slope)
            nslope[gi] += 1
            last[gi] = f["mu"][good]
            last_k[gi] = k
            misses[gi] = 0
            misses[idx[~good]] += 1
            alive &= misses <= 3
            k += step
    return Y, E


def _terms(order_y: int, order_x: int, cross_y: int | None = None) -> tuple:
    cross_y = _CROSS_Y if cross_y is None else cross_y
    """Legendre terms (i, j): all i ≤ order_y for j = 0, i ≤ min(order_y, cross_y) for
    1 ≤ j ≤ order_x (the tilt changes slowly with wavelength)."""
    t = [(i, 0) for i in range(order_y + 1)]
    for j in range(1, order_x + 1):
        t += [(i, j) for i in range(min(order_y, cross_y) + 1)]
    return tuple(t)


def _design(y, x, shape, terms, order_y, order_x, deriv: bool = False):
    """Design matrix of the 2D Legendre terms at (y, x) (and of ∂/∂y if ``deriv``)."""
    ny, nx = shape
    yn = 2.0 * y / max(ny - 1, 1) - 1.0
    xn = 2.0 * x / max(nx - 1, 1) - 1.0
    ly = npleg.legvander(yn, order_y)
    lx = npleg.legvander(xn, order_x)
    a = np.stack([ly[:, i] * lx[:, j] for i, j in terms], axis=1)
    if not deriv:
        return a
    dly = np.stack([npleg.legval(yn, npleg.legder(np.eye(order_y + 1)[i])) for i in range(order_y + 1)], 1) \
        * 2.0 / max(ny - 1, 1)
    return a, np.stack([dly[:, i] * lx[:, j] for i, j in terms], axis=1)


def _dot(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a @ c without BLAS (einsum loops): these products are small, and multithreaded BLAS
    calls were found to cost seconds when another process competes for the cores."""
    return np.einsum("ni,i->n", a, c)


def _wlsq(a: np.ndarray, b: np.ndarray, sw: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Weighted linear least squares via the normal equations (Legendre design matrices
    are well conditioned); no BLAS for the same reason as :func:`_dot`."""
    aw = a[use] * sw[use, None]
    bw = b[use] * sw[use]
    return np.linalg.solve(np.einsum("ni,nj->ij", aw, aw), np.einsum("ni,n->i", aw, bw))


def _group_median(values: np.ndarray, groups: np.ndarray, ngroups: int, mask: np.ndarray) -> np.ndarray:
    """Median of ``values[mask]`` per group (0 … ngroups−1); NaN for empty groups."""
    v, g = values[mask], groups[mask]
    order = np.lexsort((v, g))
    v, g = v[order], g[order]
    counts = np.bincount(g, minlength=ngroups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    med = np.full(ngroups, np.nan)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    med[has] = 0.5 * (v[lo] + v[hi])
    return med


def _fit_2d(y, x, lam, line_id, weight, shape, terms, order_y, order_x, n_iter: int = 40,
            min_line_sigma: float = 0.15):
    """σ-clipped weighted least-squares 2D Legendre fit.

    Points beyond 3σ (robust, in pixels) are rejected, and whole lines whose median
    residual is off by more than max(4 × the line-to-line scatter, ``min_line_sigma`` px)
    (misidentified, or blended with a line missing from the list): one line at a time, the
    worst first, and a rejected line comes back if the refit makes it agree.  Returns
    (coeffs, used, residual Å, residual px) or None.
    """
    a, da = _design(y, x, shape, terms, order_y, order_x, deriv=True)
    sw = np.sqrt(np.asarray(weight, dtype=float))
    ids, inv = np.unique(line_id, return_inverse=True)
    nl = len(ids)
    bad_lines = np.zeros(nl, bool)
    pt_ok = np.ones(len(y), bool)
    use = pt_ok.copy()
    coef = None
    for _ in range(n_iter):
        if np.count_nonzero(use) <= len(terms) or len(np.unique(inv[use])) <= order_y + 1:
            return None
        coef = _wlsq(a, lam, sw, use)
        res_px = (lam - _dot(a, coef)) / np.maximum(np.abs(_dot(da, coef)), 1e-9)
        sig = max(1.4826 * np.median(np.abs(res_px[use])), 0.01)
        pt_ok = np.abs(res_px) < max(3.0 * sig, 0.05)
        med = _group_median(res_px, inv, nl, pt_ok)
        fallback = ~np.isfinite(med)
        if np.any(fallback):
            med = np.where(fallback, _group_median(res_px, inv, nl, np.ones(len(y), bool)), med)
        med = np.where(np.isfinite(med), med, np.inf)
        good_med = np.abs(med[~bad_lines & np.isfinite(med)])
        scatter = max(1.4826 * np.median(good_med) if len(good_med) else 0.0, 0.02)
        now_bad = ~np.isfinite(med) | (np.abs(med) > max(_LINE_NSIG * scatter, min_line_sigma))
        new_bad = bad_lines & now_bad
        cand = now_bad & ~bad_lines
        if np.any(cand):
            worst = np.argmax(np.where(cand, np.abs(np.nan_to_num(med, posinf=1e9)), -1.0))
            new_bad[worst] = True
        new = pt_ok & ~new_bad[inv]
        if np.array_equal(new, use) and np.array_equal(new_bad, bad_lines):
            break
        use, bad_lines = new, new_bad
    if coef is None or np.count_nonzero(use) <= len(terms):
        return None
    coef = _wlsq(a, lam, sw, use)
    res = lam - _dot(a, coef)
    res_px = res / _dot(da, coef)
    return coef, use, res, res_px


def _slit_shift(res_pos: np.ndarray, cols: np.ndarray, line_id: np.ndarray, nx: int, order_x: int) -> np.ndarray:
    """δ(x): per-column median over the lines of the position residuals (≥ 3 lines), smooth
    part (Legendre degree ``order_x``) removed, missing columns interpolated."""
    ids, inv = np.unique(line_id, return_inverse=True)
    grid = np.full((len(ids), nx), np.nan)
    grid[inv, cols] = res_pos
    n = np.sum(np.isfinite(grid), axis=0)
    delta = np.full(nx, np.nan)
    have = n >= 3
    if np.any(have):
        delta[have] = np.nanmedian(grid[:, have], axis=0)
    good = np.isfinite(delta)
    if np.count_nonzero(good) < max(order_x + 2, 5):
        return np.zeros(nx)
    xx = np.arange(nx, dtype=float)
    delta = np.interp(xx, xx[good], delta[good])
    xn = 2.0 * xx / max(nx - 1, 1) - 1.0
    smooth = npleg.legval(xn, npleg.legfit(xn[good], delta[good], order_x))
    return delta - smooth


# ============================================================================ main entry
def solve_arc(arc_image, lines_table: Table, seed, mask=None, row_offset: float | None = None, *,
              saturation: float | None = None, min_snr: float = 5.0, n_center: int = 10,
              center_col: int | None = None, bin_width: int = 16, order_y: int | None = None,
              order_x: int | None = None, slit_shift: bool = True, saturated_weight: float = 0.5,
              preferred_only: bool = False, min_frac_peaks: float = 0.5, min_frac_lines: float = 0.4,
              min_lines: int = 6, max_rms_px: float = 0.5, search_window: float = 40.0,
              name: str = "arc image") -> WaveSolution:
    """Identify the arc lines of a 2D arc image and fit λ(y, x) automatically.

    Parameters
    ----------
    arc_image : array_like (ny, nx)
        Bias-subtracted (and trimmed) arc frame; dispersion along axis 0, slit along axis 1.
        Any linear unit (ADU, e−).  NaN pixels are ignored.
    lines_table : astropy.table.Table
        Line list with ``wavelength`` (Å) and optionally ``intensity``, ``species``,
        ``note`` (:func:`specred.calib.arc_lines`); ``meta['medium']`` gives its medium
        (default: the seed's).  The solution is in that medium (air for the EFOSC2 He-Ar
        list, vacuum for the SofI Xe list).
    seed : WavecalSeed or str
        Nominal solution (:func:`load_seed`).
    mask : array_like of bool, optional
        True = bad or saturated pixel (e.g. the mask of
        :func:`specred.reduce.ccd.process_frame`); masked pixels are left out of the
        centroid fits.
    row_offset : float, optional
        Raw row (seed system, 0-based) of image row 0 when known (trimmed frames:
        ``CCDSEC`` y1 − 1 or −``LTV2``).  Only narrows the search to ± ``search_window``
        rows (the full detector is searched if that fails); None = unknown.
    saturation : float, optional
        Level (image units) above which a peak counts as saturated.
    min_snr : float
        Detection threshold (peak prominence in units of the noise).
    n_center : int
        Number of columns (median) of the central spectrum used for the identification.
    center_col : int, optional
        Column of that spectrum (default: middle of the image).
    bin_width : int
        Columns per bin when tracing the lines along the slit.
    order_y, order_x : int, optional
        Degrees of the 2D fit (default: the seed's).
    slit_shift : bool
        Fit the per-column shift δ(x) (see :class:`WaveSolution`).
    saturated_weight : float
        Weight (relative to 1) of saturated lines in the 2D fit; their centres come from
        the unsaturated wings.  In EFOSC2 Gr#13 the only line between 5016 and 6678 Å is
        the saturated He I 5875.6; 0 leaves saturated lines out.
    preferred_only : bool
        Fit only lines flagged ``preferred`` in the list (others may still claim peaks).
    min_frac_peaks, min_frac_lines : float
        Plausibility of an identification: the fraction of the 10 brightest isolated peaks
        that were identified, and of the list lines expected above 20σ (from the
        intensity scale of the matched lines) that were found.  Night-sky (OH) spectra
        matched to the Xe list by chance reach ≈ 0.3 / 0.15, real arcs ≥ 0.6 / 0.6.
    min_lines : int
        Fewer identified lines raise :class:`~specred.errors.CalibrationError`.
    max_rms_px : float
        A larger fit RMS raises :class:`~specred.errors.CalibrationError`.
    search_window : float
        Half width (rows) of the search around ``row_offset``.
    name : str
        Name of the frame in error messages and logs.

    Returns
    -------
    WaveSolution
        ``lines`` has one row per line per column bin: ``wavelength`` (Å, list medium),
        ``species``, ``x`` (bin centre column), ``y`` (measured centre in the binned
        spectrum, px), ``y_err``, ``wavelength_fit`` (solution at (y, x)), ``residual``
        (Å, list − fit), ``residual_px`` (residual / ∂λ/∂y), ``saturated``, ``used``.

    Raises
    ------
    CalibrationError
        No peaks, too few identified lines, or a poor fit; the message names ``name``.
    """
    t0 = time.perf_counter()
    if isinstance(seed, str):
        seed = load_seed(seed)
    img = np.asarray(arc_image, dtype=float)
    if img.ndim != 2 or min(img.shape) < 10:
        raise CalibrationError(f"{name}: an arc image must be 2D (got shape {img.shape})")
    ny, nx = img.shape
    m = None if mask is None else np.asarray(mask, dtype=bool)
    if m is not None and m.shape != img.shape:
        raise CalibrationError(f"{name}: mask shape {m.shape} differs from the image {img.shape}")
    if not np.all(np.isfinite(img)):
        bad_px = ~np.isfinite(img)
        m = bad_px if m is None else (m | bad_px)
    list_medium = str(lines_table.meta.get("medium", seed.medium)).lower()
    list_medium = "air" if list_medium.startswith("air") else "vacuum"
    oy = seed.order_y if order_y is None else int(order_y)
    ox = seed.order_x if order_x is None else int(order_x)

    # ---- 1D spectrum at the slit centre
    xc = nx // 2 if center_col is None else int(center_col)
    c0 = int(np.clip(xc - n_center // 2, 0, nx - 1))
    c1 = int(np.clip(c0 + max(n_center, 1), 1, nx))
    band = img[:, c0:c1]
    spec = np.nanmedian(band, axis=1) if not np.all(np.isfinite(band)) else np.median(band, axis=1)
    spec = np.where(np.isfinite(spec), spec, np.nanmedian(spec) if np.isfinite(spec).any() else 0.0)
    mfrac = m[:, c0:c1].mean(axis=1) if m is not None else np.zeros(ny)
    pk = _detect_peaks(spec, mfrac, seed.fwhm_px, min_snr, saturation)
    n_good = int(np.count_nonzero(pk.usable))
    if n_good < min_lines:
        raise CalibrationError(f"{name}: only {n_good} emission peaks above {min_snr:g} sigma in the central "
                               f"spectrum — not an arc frame, or the lamps were off")
    ln = _prepare_lines(lines_table, seed, pk.fwhm, list_medium, preferred_only)
    if len(ln.lam) < min_lines:
        raise CalibrationError(f"{name}: the line list has fewer than {min_lines} lines in the range of seed "
                               f"{seed.name}")

    # ---- identification: vote, then refine the best candidates
    pw = np.sqrt(np.clip(pk.amp[pk.usable], 0, None) / max(pk.noise, 1e-12))
    lw = np.sqrt(ln.inten / ln.inten.max())
    py = pk.y[pk.usable]
    deg1 = min(oy, 5)
    best = None
    rejected = 0
    priors = [None] if row_offset is None else [float(row_offset) + 0.5 * (ny - 1), None]
    for prior in priors:
        for cand in _search(py, pw, ln.r, lw, ny, seed, pk.fwhm, prior, search_window):
            ident = _identify(cand, pk, ln, ny, seed, deg1)
            if ident is None:
                continue
            if ident.frac_peaks < min_frac_peaks or ident.frac_lines < min_frac_lines:
                rejected = max(rejected, ident.n_used)
                continue
            if best is None or (ident.n_used, -ident.rms_px) > (best.n_used, -best.rms_px):
                best = ident
        if best is not None and best.n_used >= max(min_lines, deg1 + 3) and best.rms_px < 0.3 * max(pk.fwhm, 1.0):
            break
    if best is None or best.n_used < min_lines:
        n = 0 if best is None else best.n_used
        why = (f"; the best pattern match ({rejected} lines) leaves most bright peaks unidentified — "
               f"not a {seed.lamp} arc of this set-up" if rejected >= min_lines and n < min_lines else "")
        raise CalibrationError(f"{name}: could not identify the arc lines ({n} lines matched the "
                               f"{seed.lamp} list through seed {seed.name}; need {min_lines}){why}")
    log.debug("%s: identified %d lines, 1D rms %.3f px, raw row of image centre %.1f, stretch %.4f, "
              "bright peaks identified %.2f, expected lines found %.2f", name, best.n_used, best.rms_px, best.rc,
              best.b, best.frac_peaks, best.frac_lines)

    # ---- lines to trace: the 1D fit lines + isolated saturated lines (the flux-balance centre
    #      of a symmetric plateau is still the line centre)
    li_all, pi_all = best.line_idx, best.peak_idx
    sat_ok = (pk.saturated[pi_all] & ~pk.spike[pi_all] & ~pk.crowded[pi_all] & ~pk.edge[pi_all]
              & ~ln.blended[li_all])
    # a saturated line must still sit where the 1D model puts it
    sat_ok &= np.abs(best.model(pk.y[pi_all]) - ln.lam[li_all]) < 0.5 * pk.fwhm * np.abs(
        np.gradient(best.model(np.arange(ny, dtype=float)))[np.clip(np.round(pk.y[pi_all]).astype(int), 0, ny - 1)])
    take = best.used | (sat_ok & (saturated_weight > 0))
    li, pi = li_all[take], pi_all[take]
    lsat = pk.saturated[pi]

    # ---- 2D stage 1: trace in column bins, smooth 2D polynomial
    edges = _column_bins(nx, bin_width)
    bspec, bmfrac = _binned_spectra(img, m, edges)
    bbg = _background(bspec, max(41, int(12 * pk.fwhm)))
    bspec = bspec - bbg
    noise_b = _noise(bspec)
    xcen = 0.5 * (edges[:-1] + edges[1:]) - 0.5
    k0 = int(np.argmin(np.abs(xcen - xc)))
    Y, E = _trace(bspec, bmfrac > 0.3, noise_b, k0, pk.y[pi], lsat, pk.fwhm, min_snr)
    nbins = len(xcen)
    trace_coef = np.full((len(li), 3), np.nan)
    for row in range(len(li)):
        ok = np.isfinite(Y[row])
        if np.count_nonzero(ok) < max(4, int(0.3 * nbins)):
            Y[row] = np.nan
            continue
        for _ in range(4):
            c = np.polyfit(xcen[ok] - xc, Y[row, ok], 2)
            r = Y[row] - np.polyval(c, xcen - xc)
            s = max(1.4826 * np.nanmedian(np.abs(r[ok])), 0.02)
            new = np.isfinite(Y[row]) & (np.abs(r) < max(3.5 * s, 0.1))
            if np.array_equal(new, ok) or np.count_nonzero(new) < 4:
                break
            ok = new
        Y[row, ~ok] = np.nan
        trace_coef[row] = np.polyfit(xcen[ok] - xc, Y[row, ok], 2)
    rows_i, bins_i = np.nonzero(np.isfinite(Y))
    if len(np.unique(rows_i)) < min_lines:
        raise CalibrationError(f"{name}: only {len(np.unique(rows_i))} identified lines could be traced along "
                               f"the slit (need {min_lines})")
    oy_eff = int(min(oy, max(1, len(np.unique(rows_i)) - 3)))
    terms = _terms(oy_eff, ox)
    wline = np.where(lsat, saturated_weight, 1.0)
    fit = _fit_2d(Y[rows_i, bins_i], xcen[bins_i], ln.lam[li[rows_i]], rows_i, wline[rows_i], (ny, nx), terms,
                  oy_eff, ox)
    if fit is None:
        raise CalibrationError(f"{name}: the 2D wavelength fit failed (too few measurements)")
    coef, used_b, _res_b, _ = fit
    good_lines = np.unique(rows_i[used_b])

    # ---- 2D stage 2: one centroid per line per column (3-column median), per-column shift
    delta = np.zeros(nx)
    final = None
    med3 = _median3(img)
    bad3 = None if m is None else (_median3(m.astype(np.float32)) > 0)
    noise_c = _noise(med3)
    col_bin = np.clip(np.searchsorted(edges, np.arange(nx), side="right") - 1, 0, len(edges) - 2)
    med3 = med3 - bbg[:, col_bin]             # background of the column bins
    gl = good_lines[np.all(np.isfinite(trace_coef[good_lines]), axis=1)]
    cols = np.arange(nx)
    lid = np.repeat(gl, nx)
    cc = np.tile(cols, len(gl))
    ypred = np.concatenate([np.polyval(trace_coef[g], cols - xc) for g in gl]) if len(gl) else np.zeros(0)
    f = _balance_centre(med3, cc, ypred, _centre_halfwidth(pk.fwhm), bad=bad3, noise=noise_c[cc])
    good = f["ok"] & (np.abs(f["mu"] - ypred) < max(0.6, 0.2 * pk.fwhm)) & (f["amp"] > min_snr * noise_c[cc])
    yq, xq, cq, iq = f["mu"][good], cc[good].astype(float), cc[good], lid[good]
    lq, wq = ln.lam[li[iq]], wline[iq]
    if len(np.unique(iq)) >= min_lines:
        a_q, da_q = _design(yq, xq, (ny, nx), terms, oy_eff, ox, deriv=True)
        coef_q = coef
        for _it in range(2 if slit_shift else 1):
            if slit_shift:
                res_pos = -(lq - _dot(a_q, coef_q)) / _dot(da_q, coef_q)   # measured - model position (px)
                keep_rows = np.isin(iq, good_lines) & ~lsat[iq]
                delta = _slit_shift(res_pos[keep_rows], cq[keep_rows], iq[keep_rows], nx, ox)
            fit_q = _fit_2d(yq - delta[cq], xq, lq, iq, wq, (ny, nx), terms, oy_eff, ox)
            if fit_q is None:
                break
            coef_q, used_q, res_q, respx_q = fit_q
            good_lines = np.unique(iq[used_q])
            final = (coef_q, used_q, res_q, respx_q, iq)
    if final is None:    # fall back to the binned measurements (no per-column shift)
        delta = np.zeros(nx)
        final = (coef, used_b, _res_b, fit[3], rows_i)
    coef, used_q, res_q, respx_q, iq = final
    n_lines = int(len(np.unique(iq[used_q])))
    rms_px = float(np.sqrt(np.mean(respx_q[used_q] ** 2)))
    rms_aa = float(np.sqrt(np.mean(res_q[used_q] ** 2)))
    if n_lines < min_lines:
        raise CalibrationError(f"{name}: only {n_lines} lines survived the 2D fit (need {min_lines})")
    if not rms_px <= max_rms_px:
        raise CalibrationError(f"{name}: wavelength solution RMS {rms_px:.2f} px exceeds {max_rms_px:g} px "
                               f"({n_lines} lines) — misidentified lines or not an arc frame")

    sol = WaveSolution(coeffs=np.asarray(coef, dtype=float), terms=terms, shape=(ny, nx), medium=list_medium,
                       rms_px=rms_px, rms_aa=rms_aa, n_lines=n_lines, lines=Table(), slit_shift=delta,
                       seed=seed.name)
    # ---- line table: binned measurements against the final solution
    used_lines = set(np.unique(iq[used_q]).tolist())
    yb, xb = Y[rows_i, bins_i], xcen[bins_i]
    lam_b = ln.lam[li[rows_i]]
    lam_fit = sol.wavelength(yb, xb)
    res_b = lam_b - lam_fit
    lines_out = Table({
        "wavelength": lam_b, "species": ln.species[li[rows_i]], "x": xb, "y": yb, "y_err": E[rows_i, bins_i],
        "wavelength_fit": lam_fit, "residual": res_b, "residual_px": res_b / sol.dispersion(yb, xb),
        "saturated": lsat[rows_i], "used": np.array([r in used_lines for r in rows_i], bool)})
    for col, unit in (("wavelength", "Angstrom"), ("x", "pix"), ("y", "pix"), ("y_err", "pix"),
                      ("wavelength_fit", "Angstrom"), ("residual", "Angstrom"), ("residual_px", "pix")):
        lines_out[col].unit = unit
    lines_out.meta.update({"medium": list_medium, "seed": seed.name, "fwhm_px": round(pk.fwhm, 3),
                           "description": "identified arc lines, one row per line per column bin; "
                                          "residual = list - fit (Angstrom)"})
    sol.lines = lines_out
    lam0 = float(sol.wavelength(0.0, float(xc)))
    if list_medium != seed.medium:
        from .. import calib
        lam0 = float(calib.vacuum_to_air(lam0) if seed.medium == "air" else calib.air_to_vacuum(lam0))
    sol.row_offset = float(seed.raw_row(lam0))
    sol.stretch = float(best.b)
    sol.meta = {"seed": seed.name, "medium": list_medium, "fwhm_px": float(pk.fwhm),
                "n_lines_1d": int(best.n_used), "rms_1d_px": float(best.rms_px),
                "n_saturated": int(len({r for r in used_lines if lsat[r]})),
                "row_offset_prior": None if row_offset is None else float(row_offset),
                "slit_shift_max_px": float(np.max(np.abs(delta))),
                "seconds": time.perf_counter() - t0}
    log.info("%s: wavelength solution from %d lines, rms %.3f px (%.3f Å), %.2f s", name, n_lines, rms_px,
             rms_aa, sol.meta["seconds"])
    return sol


def _median3(img: np.ndarray) -> np.ndarray:
    """Running median of 3 columns (edges: the 2 available columns' mean)."""
    a = np.asarray(img, dtype=float)
    left = np.concatenate([a[:, :1], a[:, :-1]], axis=1)
    right = np.concatenate([a[:, 1:], a[:, -1:]], axis=1)
    return np.maximum(np.minimum(left, a), np.minimum(np.maximum(left, a), right))


# ============================================================================ file level
def wavecal_file(path, out_path=None, instrument: str | None = None, *, seed: str | None = None,
                 check_type: bool = True, **solve_kw) -> WaveSolution:
    """Wavelength-calibrate one arc FITS file.

    Parameters
    ----------
    path : str or Path
        Arc frame: a raw ESO file (overscan subtracted and trimmed here with the
        instrument geometry) or an already trimmed frame (e.g. a PESSTO product;
        recognised by its shape differing from the raw read-out, with ``CCDSEC``/``LTV2``
        giving its place on the detector).
    out_path : str or Path, optional
        Where to write the wavelength map (atomic write): float64 Å for every pixel of the
        INPUT array (same shape as the file's data; for a raw frame NaN outside the trimmed
        region, i.e. pre/overscan and unilluminated columns), header ``WAVEMED``,
        ``BUNIT = 'Angstrom'``, ``WAVERMS`` (px), ``WAVERMSA`` (Å), ``WAVENLIN``, the
        polynomial (:meth:`WaveSolution.to_header`, origin = trimmed region) and the input
        file name; extension ``LINES`` lists the identified lines (one row per line per
        column bin), ``SLITSHFT`` holds the per-column shift δ(x) (pixels).
    instrument : str, optional
        ``'EFOSC2'`` or ``'SOFI'``; default from ``INSTRUME``.
    seed : str, optional
        Seed name; default from the instrument and grism in the header.
    check_type : bool
        Refuse frames the header classifies as something other than an arc.
    **solve_kw
        Further parameters of :func:`solve_arc` (``min_snr``, ``order_y``, ...).

    Returns
    -------
    WaveSolution
        Solution of the trimmed image (``sol.map()``); ``sol.map(full=True)`` has the shape
        of the file's data array.  Air Å for EFOSC2, vacuum Å for SofI (``sol.medium``).

    Raises
    ------
    CalibrationError
        Unreadable file, not an arc, no seed for the set-up, or no solution found; the
        one-line message names the file.
    """
    from .. import calib
    from ..instruments import get_instrument, identify
    from ..instruments.base import stored_region
    from ..io import atomic_write_fits
    from .ccd import process_frame

    path = Path(path)
    fname = path.name
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header.copy()
            data = None
            for hdu in hdul:
                if hdu.data is not None and getattr(hdu.data, "ndim", 0) == 2:
                    data = np.asarray(hdu.data, dtype=np.float32)
                    if hdu is not hdul[0]:
                        skip = ("XTENSION", "PCOUNT", "GCOUNT", "EXTNAME", "BITPIX")
                        header.update({k: v for k, v in hdu.header.items()
                                       if not k.startswith("NAXIS") and k not in skip})
                        header["NAXIS"], header["NAXIS1"], header["NAXIS2"] = 2, data.shape[1], data.shape[0]
                    break
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{fname}: cannot read the FITS file ({exc})") from exc
    if data is None:
        raise CalibrationError(f"{fname}: no 2D image in the file — not an arc frame")
    try:
        inst = get_instrument(instrument) if instrument else identify(header, str(path))
    except SpecredError as exc:
        raise CalibrationError(f"{fname}: {exc}") from exc
    try:
        info = inst.classify(header, str(path))
        ftype, grism = info.frame_type, info.grism
    except SpecredError as exc:
        if check_type:
            raise CalibrationError(f"{fname}: cannot classify the frame ({exc})") from exc
        ftype, grism = "unknown", None
    if check_type and ftype not in ("arc", "unknown"):
        raise CalibrationError(f"{fname}: not an arc frame (the header says {ftype}); "
                               "give an arc-lamp exposure")
    try:
        seed_name = seed or seed_for_setup(inst.name, grism)
        sd = load_seed(seed_name)
    except SpecredError as exc:
        raise CalibrationError(f"{fname}: {exc}") from exc
    geom = inst.geometry(header)
    if tuple(data.shape) != tuple(geom.shape):
        raise CalibrationError(f"{fname}: data shape {data.shape} does not match the header {geom.shape}")
    ccd = process_frame(data, geom)
    ty0, tx0 = geom.trim_section[0].start or 0, geom.trim_section[1].start or 0
    is_raw = geom.prescan is not None or geom.overscan is not None or tuple(data.shape) == tuple(inst.raw_shape(header))
    if is_raw:
        row_offset = float(ty0)
    else:
        x1, x2, y1, y2 = stored_region(header, tuple(data.shape))
        row_offset = float(y1 - 1 + ty0)
    lines = calib.arc_lines(sd.lamp)
    sol = solve_arc(ccd.data, lines, sd, mask=ccd.mask, row_offset=row_offset, name=fname, **solve_kw)
    sol = replace(sol, origin=(int(ty0), int(tx0)), parent_shape=tuple(int(v) for v in data.shape))
    sol.meta.update({"file": fname, "raw_input": bool(is_raw), "header_row_offset": row_offset})
    if out_path is not None:
        hdr = sol.to_header()
        hdr["WAVEFILE"] = fname[:68]
        hdr["WAVEINST"] = (inst.name, "instrument")
        hdr["COMMENT"] = ("Wavelength of every pixel of the input array; NaN outside the trimmed region. "
                          "Pixel (y, x) of this array = solution pixel (y - WAVEY0, x - WAVEX0).")
        lt = sol.lines.copy()
        lt.meta = {}
        shift = fits.ImageHDU(np.asarray(sol.slit_shift, dtype=np.float64), name="SLITSHFT")
        shift.header["BUNIT"] = ("pix", "per-column shift along the dispersion")
        shift.header["CRVAL1"] = (int(tx0), "input-array column of element 0")
        hdus = fits.HDUList([fits.PrimaryHDU(sol.map(full=True).astype(np.float64), header=hdr),
                             fits.table_to_hdu(lt), shift])
        hdus[1].name = "LINES"
        atomic_write_fits(hdus, out_path)
    return sol
