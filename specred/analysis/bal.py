"""Broad absorption lines (BALs) of quasars: balnicity and absorption indices.

    >>> from specred.analysis import load_spectrum
    >>> from specred.analysis.bal import measure_bal, plot_bal
    >>> spec = load_spectrum("OUT/spectra/J0408_EFOSC2.fits")
    >>> res = measure_bal(spec, z=1.687)                  # z from the redshift finder
    >>> res.bal, res.lobal, res.balnicity_index, res["CIV"].bi_err
    >>> plot_bal(spec, 1.687, res, "J0408_bal.png")        # Solarz et al. (2020) Fig. 9 style

What is measured
----------------
For Si IV λ1400, C IV λ1549, Al III λ1857 and Mg II λ2800 the flux is divided by a model
of the *unabsorbed* quasar spectrum and the troughs of the normalised flux f(v) are
integrated over the outflow velocity

    v = c (λ_c − λ) / λ_c,        λ_c = λ_rest,vac (1 + z)                           (1)

(v > 0 blueward of the line centre; the first-order Doppler form, the same one the
simulator uses for its troughs).

* **Balnicity index** (Weymann et al. 1991, ApJ 373, 23, their eq. 1)

      BI = ∫_{3000}^{25000} (1 − f(v)/0.9) C dv                                       (2)

  with C = 1 only where f < 0.9 has held *continuously* for more than 2000 km/s,
  counted from the velocity at which the contiguous region starts (the region may start
  below 3000 km/s; it is followed from v = 0); C = 0 elsewhere.  On the pixel grid each
  pixel contributes the part of its velocity width that lies beyond (run start +
  2000 km/s) and inside the window, so BI does not jump by whole pixels.
* **Absorption index**, the variant of Hall et al. (2002, ApJS 141, 267, their eq. 2):

      AI = ∫_{0}^{29000} (1 − f(v)) C dv                                              (3)

  with C = 1 in every contiguous region of f < 0.9 whose *total* width is at least
  450 km/s (the whole region counts, not only the part beyond 450 km/s); note the
  integrand is 1 − f (not 1 − f/0.9 as in Trump et al. 2006, ApJS 165, 1).
* **Mg II windows.** The region blueward of Mg II overlaps the strong UV Fe II
  complexes at 2585–2630 Å (UV 1 multiplet), whose strength a pseudo-continuum model
  reproduces only roughly, so for Mg II both integrals stop at 20000 km/s (2612 Å)
  instead of 25000 / 29000 km/s.  This reduced window is our choice; the C IV, Si IV and
  Al III windows are the published ones.
* f(v) is the normalised flux after a 3-pixel running mean (narrower than the EFOSC2
  resolution element, ~3.5 px FWHM, so it removes pixel noise but no resolved structure);
  without it single noisy pixels break real troughs and the 2000 km/s contiguity becomes
  noise-dominated at S/N ~ 5.  Masked pixels are interpolated in the normalised flux.
  Only velocities inside the spectral coverage are integrated; the covered fraction of
  the BI window is reported.

Model of the unabsorbed spectrum
--------------------------------
One weighted linear least-squares model over rest 1260–3100 Å (vacuum; above the Lyα
forest and N V, below the Balmer continuum), fitted to the observed flux:

* a power law  F_c = A (λ_rest / 2000 Å)^α.  α enters through the Gauss–Newton column
  F_c·ln(λ_rest/2000 Å) of the linearised model, updated every sweep, so its uncertainty
  is part of the linear covariance;
* broad emission lines, each a Gaussian in wavelength with its own velocity shift and
  width (observed width: instrumental broadening is included, nothing is deconvolved):
  Si IV+O IV] 1400, C IV 1549, He II 1640, Al III 1857, C III] 1909, Mg II 2800.  Si IV,
  C IV, C III] and Mg II are two concentric Gaussians (widths in the fixed ratio 1 : 2.5,
  free non-negative amplitudes) because real profiles are peakier than one Gaussian
  (a core plus wings); He II and Al III are single Gaussians.  Shift (grid step 400 km/s
  over −3000…+1000 km/s for C IV, whose blueshift reaches thousands of km/s
  (Richards et al. 2002, AJ 124, 1); −2000…+1000 for Si IV; −1500…+1000 for the others)
  and FWHM of the narrower component (1200–8000 km/s, 10 log steps) are found by a
  vectorised grid search with the amplitudes solved linearly and constrained ≥ 0 for
  every grid point at once (variable projection), refined by a parabola through the grid
  neighbours; one line at a time with the others held (back-fitting: 2 sweeps in the
  first pass, 1 in the second, then amplitudes only);
* a UV Fe II pseudo-continuum: one non-negative amplitude times a fixed template of five
  broad blends at rest 2400, 2520, 2630, 2950 and 3050 Å (FWHM 180, 160, 160, 150,
  120 Å; relative strengths 18 : 20 : 16 : 12 : 6) approximating the Fe II bumps of
  quasar composites (Vanden Berk et al. 2001, AJ 122, 549; Vestergaard & Wilkes 2001,
  ApJS 134, 1).  **Limitation:** these are the blends the specred simulator injects;
  real Fe II differs from object to object and an empirical template would be better
  where it matters (the Mg II trough region).

Absorbed pixels must not drag the model down; two measures:

1. the **line cores and red sides constrain the lines first**: in the first pass the
   BAL-candidate region of each line (2500 km/s to the upper BI limit blueward of it)
   gets 2 % weight, so line centres and widths come from the cores (kept: C IV peaks up
   to ~1500 km/s blueward of its systemic wavelength), the red halves and the continuum
   between the lines.  (Starting the region at 500 km/s instead left the C IV centre
   unconstrained and let the second pass clip the blue half of normal, blueshifted
   C IV lines into false troughs: 1 of 183 simulated QSOs at S/N 27.)
2. **iterative asymmetric clipping**: afterwards all pixels count again, except those
   more than 2.5 σ *and* more than 5 % below the current model (grown by one pixel each
   side), and spikes more than 5 σ above it; the mask is rebuilt from the current model
   in every iteration (up to 5) until it no longer changes.  The 5 % floor stops the
   clipping from chasing noise at high S/N; BAL troughs (f < 0.9) are always clipped.

Errors: Monte-Carlo, vectorised over ``n_mc`` realisations at once: Gaussian noise from the
flux errors is added to the flux, and the linear model parameters (continuum amplitude,
α through its Gauss–Newton column, line and Fe II amplitudes) are drawn from their
covariance (scaled by max(1, χ²_ν)); line centres and widths stay fixed (refitting them
per realisation would cost ~n_mc fits).  The normalised flux of every realisation goes
through the same smoothing and index code; the errors are the standard deviations.
On simulated LoBALs the reported C IV BI error matches the scatter of BI over
independent noise realisations within a factor 1.3 (S/N 6–20).

Classification rules (our choices, documented here):

* a line's BI is **significant** if BI > 0 and BI ≥ 3 σ_BI, with σ_BI the larger of the
  MC error and the propagated pixel noise of the C = 1 pixels;
* a line is **covered** if the spectrum has good pixels on its red side (−3000 to
  −300 km/s, needed for the emission model) and over at least half of its BI window;
  partly covered lines are measured and flagged ``PARTIAL:<line>`` but do not classify;
* ``bal``: a significant BI in a covered C IV or Si IV; only if neither is covered (e.g.
  z < 1.6 for EFOSC2), a significant BI in a covered Al III or Mg II (flag
  ``BAL_FROM_LOW_ION``);
* a low-ionisation line (Al III, Mg II) **qualifies** with a significant BI or with one
  AI trough at least 1600 km/s wide (the Mg II BAL width criterion of Zhang et al. 2010,
  ApJ 714, 367) whose integrated deficit ∫(1 − f)dv is ≥ 5 σ;
  ``lobal`` = ``bal`` and Al III or Mg II qualifies (a LoBAL is a BAL quasar that also
  shows low-ionisation troughs, e.g. Solarz et al. 2020, Sect. 4.2).

AI is reported for every line but does not by itself make a BAL: at EFOSC2 resolution
(~1400 km/s) a 450 km/s region is one or two pixels, so AI > 0 is common in noisy
spectra.

Validation on simulated EFOSC2 spectra (``specred.simulate``; noise as in
``simulate --spectra``): C IV BI within 10 % of the noiseless truth for 56 LoBALs at
z 1.4–2.6 and S/N 8–35 (median +2 %: the ~1400 km/s instrumental resolution and the
running mean widen the troughs slightly), Si IV within 10 %, Al III within 32 %, trough
edges within 1.1e3 km/s; 1200 random spectra (2 seeds of ``simulate_spectra(…, 600)``):
no BAL among 382 QSOs, 60 Fe-rich QSOs and 697 galaxies / other objects, 59 of 61 LoBALs found
as LoBALs (the two misses, at z = 3.3 and S/N 3–4, are found as BALs; their Al III
troughs are not significant and Mg II is not covered).  One real SDSS HiBAL
(J140732.28+183604.1, z = 1.91) comes out BAL, not LoBAL.

Not handled: telluric A/B bands must be corrected beforehand (an uncorrected A band
at 7600 Å would look like a 4000 km/s trough); redshift errors shift all velocities;
narrow associated absorbers inside a trough are integrated with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.ndimage import uniform_filter1d

from ..errors import ConfigError, SpectrumError
from . import lines as L
from .spectrum import C_KMS, FWHM_PER_SIGMA, AnalysisSpectrum

#: rest-frame (vacuum Å) range of the model of the unabsorbed spectrum
FIT_RANGE = (1260.0, 3100.0)
#: pivot wavelength (rest Å) of the power law
PIVOT = 2000.0
#: normalised-flux threshold of the BAL definitions
THRESHOLD = 0.9
#: running-mean width (pixels) applied to the normalised flux before the indices
SMOOTH_PX = 3
#: significance of BI (in σ) needed for a line to count
BI_SIGMA = 3.0
#: low-ionisation trough via AI: minimum width (km/s, Zhang et al. 2010) and significance
LOWION_WIDTH_KMS = 1600.0
LOWION_SIGMA = 5.0
#: clipping: lower threshold (σ), minimal fractional deficit, upper threshold (σ)
CLIP_LO, CLIP_FRAC, CLIP_HI = 2.5, 0.05, 5.0
SHIFT_STEP_KMS = 400.0
FWHM_GRID_KMS = np.geomspace(1200.0, 8000.0, 10)
BROAD_RATIO = 2.5
#: UV Fe II template blends: (rest centre Å, FWHM Å, relative strength)
FEII_UV = ((2400.0, 180.0, 18.0), (2520.0, 160.0, 20.0), (2630.0, 160.0, 16.0),
           (2950.0, 150.0, 12.0), (3050.0, 120.0, 6.0))


@dataclass(frozen=True)
class _LineDef:
    key: str
    name: str
    label: str
    bi_window: tuple
    ai_window: tuple
    low_ion: bool


#: the BAL lines: key, catalogue name, label, BI window, AI window (km/s), low ionisation
BAL_LINES = (
    _LineDef("SiIV", "SiIV_1400", "Si IV", (3000.0, 25000.0), (0.0, 29000.0), False),
    _LineDef("CIV", "CIV_1549", "C IV", (3000.0, 25000.0), (0.0, 29000.0), False),
    _LineDef("AlIII", "AlIII_1857", "Al III", (3000.0, 25000.0), (0.0, 29000.0), True),
    _LineDef("MgII", "MgII_2800", "Mg II", (3000.0, 20000.0), (0.0, 20000.0), True),
)
_BY_KEY = {d.key.lower(): d for d in BAL_LINES} | {d.name.lower(): d for d in BAL_LINES}

#: emission lines of the model: catalogue name, shift range (km/s), number of components
EMISSION = (("SiIV_1400", -2000.0, 1000.0, 2), ("CIV_1549", -3000.0, 1000.0, 2),
            ("HeII_1640", -1500.0, 1000.0, 1), ("AlIII_1857", -1500.0, 1000.0, 1),
            ("CIII_1909", -1500.0, 1000.0, 2), ("MgII_2800", -1500.0, 1000.0, 2))


# ============================================================================ results
@dataclass(frozen=True)
class BALLine:
    """BAL measurement of one line.  Velocities in km/s (outflow > 0), indices in km/s.

    ``covered``: red side and ≥ half of the BI window have good pixels; ``cover_frac``:
    covered fraction of the BI window; ``v_cov_min``/``v_cov_max``: velocity range with
    pixels inside the AI window.  ``v_min``/``v_max``: extent of the troughs that
    contribute to BI (from where f first drops below 0.9 to where it recovers; NaN if
    BI = 0).  ``bi_err``: the larger of the Monte-Carlo error and the propagated pixel
    noise of the C = 1 pixels; ``bi_snr`` = BI / ``bi_err``; ``ai_err``: Monte-Carlo
    (pixel noise if ``n_mc`` < 2).  ``depth_max``: 1 − min f inside the AI window.
    ``significant``: BI > 0 at ≥ 3σ; ``qualifies``: counts for the classification
    (significant BI, or for Al III / Mg II a wide significant AI trough).
    ``troughs``: (v_start, v_end, kind) with kind 'BI' (contributes to BI) or 'AI'.
    """

    key: str
    line: str
    rest_vac: float
    covered: bool
    cover_frac: float
    v_cov_min: float
    v_cov_max: float
    bi: float
    bi_err: float
    bi_snr: float
    ai: float
    ai_err: float
    v_min: float
    v_max: float
    depth_max: float
    significant: bool
    qualifies: bool
    troughs: tuple = ()
    flags: str = ""


@dataclass(frozen=True)
class BALResult:
    """BAL classification of one spectrum (see the module docstring for the rules).

    ``balnicity_index``: C IV BI, or Si IV BI if C IV is not covered (NaN if neither is);
    ``absorption_index`` likewise.  ``lines``: one :class:`BALLine` per Si IV, C IV,
    Al III, Mg II (index by key: ``res["CIV"]``).  ``alpha``: power-law slope of the
    continuum (F_λ ∝ λ^α); ``chi2_red``: reduced χ² of the model on unclipped pixels.
    ``model``: the unabsorbed-spectrum model at ``spec.wave`` (NaN outside the fit range).
    """

    spectrum: str
    z: float
    bal: bool
    lobal: bool
    balnicity_index: float
    balnicity_index_err: float
    bi_line: str
    absorption_index: float
    absorption_index_err: float
    lines: tuple
    alpha: float
    chi2_red: float
    n_mc: int
    flags: str = ""
    reason: str = ""
    model: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __getitem__(self, key: str) -> BALLine:
        d = _BY_KEY.get(str(key).lower())
        if d is None:
            raise KeyError(f"{key!r}: BAL lines are {', '.join(x.key for x in BAL_LINES)}")
        return next(ln for ln in self.lines if ln.key == d.key)

    def to_row(self) -> dict:
        row = {"spectrum": self.spectrum, "z": self.z, "bal": self.bal, "lobal": self.lobal,
               "balnicity_index": self.balnicity_index, "balnicity_index_err": self.balnicity_index_err,
               "bi_line": self.bi_line, "absorption_index": self.absorption_index,
               "absorption_index_err": self.absorption_index_err}
        for ln in self.lines:
            k = ln.key.lower()
            row.update({f"bi_{k}": ln.bi, f"bi_{k}_err": ln.bi_err, f"ai_{k}": ln.ai, f"ai_{k}_err": ln.ai_err,
                        f"vmin_{k}": ln.v_min, f"vmax_{k}": ln.v_max, f"covered_{k}": ln.covered,
                        f"trough_{k}": ln.qualifies})
        row.update({"alpha": self.alpha, "chi2_red": self.chi2_red, "n_mc": self.n_mc, "flags": self.flags,
                    "reason": self.reason})
        return row


# ============================================================================ helpers
def _check_input(spec, z, n_mc):
    if not isinstance(spec, AnalysisSpectrum):
        raise SpectrumError(f"measure_bal needs an AnalysisSpectrum (load_spectrum / make_spectrum), "
                            f"not {type(spec).__name__}")
    try:
        z = float(z)
    except (TypeError, ValueError) as exc:
        raise SpectrumError(f"{spec.name or 'spectrum'}: redshift {z!r} is not a number") from exc
    if not np.isfinite(z) or z < 0:
        raise SpectrumError(f"{spec.name or 'spectrum'}: redshift must be finite and >= 0 for a BAL "
                            f"measurement, got {z}")
    try:
        ok = int(n_mc) == n_mc and n_mc >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"n_mc must be a non-negative integer, got {n_mc!r}")
    return z, int(n_mc)


def _gauss(lam, mu, sig):
    t = np.subtract(lam, mu)
    t /= sig
    t *= t
    t *= -0.5
    return np.exp(t, out=t)


def _edges(x):
    """Pixel edges (len n+1) from centres: midpoints, ends extrapolated by half a step."""
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate(([x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]))


def _solve(A, f, w, nonneg, want_cov=False):
    """Weighted least squares f ≈ A β with β[nonneg] ≥ 0.

    Active set: columns whose constrained coefficient comes out negative are dropped and
    the rest refitted (the usual outcome is one pass).  Columns are scaled to unit
    weighted norm before solving.  Returns β, the covariance of β (zeros for dropped
    columns; only if ``want_cov``) and the mask of active columns."""
    K = A.shape[1]
    Aw = A * w[:, None]
    M = Aw.T @ A
    b = Aw.T @ f
    d = np.sqrt(np.clip(np.diag(M), 0.0, None))
    active = d > 0
    beta = np.zeros(K)
    idx = np.flatnonzero(active)
    Ms = None
    for _ in range(K):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        di = d[idx]
        Ms = M[np.ix_(idx, idx)] / np.outer(di, di) + 1e-10 * np.eye(idx.size)
        try:
            sol = np.linalg.solve(Ms, b[idx] / di) / di
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(Ms, b[idx] / di, rcond=None)[0] / di
        neg = nonneg[idx] & (sol < 0)
        if not neg.any():
            beta[idx] = sol
            break
        active[idx[neg]] = False
    cov = None
    if want_cov:
        cov = np.zeros((K, K))
        if idx.size and Ms is not None:
            di = d[idx]
            try:
                inv = np.linalg.inv(Ms)
            except np.linalg.LinAlgError:
                inv = np.linalg.pinv(Ms)
            cov[np.ix_(idx, idx)] = inv / np.outer(di, di)
    return beta, cov, active


def _nn_local(cols, r, w):
    """Non-negative amplitudes of the 1 or 2 columns of ``cols`` (n×k) fitted to ``r``."""
    cw = cols * w[:, None]
    h = cw.T @ cols
    c = cw.T @ r
    if cols.shape[1] == 1:
        return np.array([max(c[0], 0.0) / h[0, 0]]) if h[0, 0] > 0 else np.zeros(1)
    det = h[0, 0] * h[1, 1] - h[0, 1] ** 2
    if det > 1e-12 * h[0, 0] * h[1, 1]:
        a = np.array([h[1, 1] * c[0] - h[0, 1] * c[1], h[0, 0] * c[1] - h[0, 1] * c[0]]) / det
        if a[0] >= 0 and a[1] >= 0:
            return a
    out = np.zeros(2)
    g = [max(c[i], 0.0) ** 2 / h[i, i] if h[i, i] > 0 else 0.0 for i in (0, 1)]
    i = 0 if g[0] >= g[1] else 1
    if h[i, i] > 0:
        out[i] = max(c[i], 0.0) / h[i, i]
    return out


class _Line:
    """One emission line of the model: its grid of candidate profiles on local pixels."""

    def __init__(self, name, lo, hi, ncomp, lam, z, good):
        self.name = name
        self.ncomp = ncomp
        self.lam_c = L.rest_wavelength(name) * (1.0 + z)
        self.shifts = np.arange(lo, hi + 1e-6, SHIFT_STEP_KMS)
        self.fwhms = FWHM_GRID_KMS
        v = C_KMS * (lam / self.lam_c - 1.0)
        sig_max = FWHM_GRID_KMS[-1] * (BROAD_RATIO if ncomp == 2 else 1.0) / FWHM_PER_SIGMA
        self.loc = np.flatnonzero((v > lo - 3.2 * sig_max) & (v < hi + 3.2 * sig_max))
        core = np.abs(v) < 3000.0
        self.usable = int(np.sum(good & core)) >= 5 and self.loc.size >= 10
        if not self.usable:
            return
        self.x = lam[self.loc]
        sh, fw = np.meshgrid(self.shifts, self.fwhms, indexing="ij")          # (S, W)
        mu = self.lam_c * (1.0 + sh.ravel() / C_KMS)
        sg = mu * fw.ravel() / C_KMS / FWHM_PER_SIGMA
        # float32: the grid only ranks candidates (the chosen profile is recomputed in float64)
        x32 = self.x.astype(np.float32)[None, :]
        mu, sg = mu.astype(np.float32)[:, None], sg.astype(np.float32)[:, None]
        b1 = _gauss(x32, mu, sg)
        self.B = [b1]
        self.BB = [[b1 * b1]]
        if ncomp == 2:
            b2 = _gauss(x32, mu, np.float32(BROAD_RATIO) * sg)
            self.B.append(b2)
            self.BB = [[b1 * b1, b1 * b2], [None, b2 * b2]]
        self.set_params(0.0 if lo <= 0 <= hi else lo, 3500.0)

    def set_params(self, shift, fwhm):
        self.shift, self.fwhm = float(shift), float(fwhm)
        mu = self.lam_c * (1.0 + self.shift / C_KMS)
        sg = mu * self.fwhm / C_KMS / FWHM_PER_SIGMA
        cols = [_gauss(self.x, mu, sg)]
        if self.ncomp == 2:
            cols.append(_gauss(self.x, mu, BROAD_RATIO * sg))
        self.cols = np.column_stack(cols)                # (n_loc, ncomp)

    def set_weights(self, w):
        self.wl = w[self.loc]
        wl = self.wl.astype(np.float32)
        if self.ncomp == 1:
            self.H = ((self.BB[0][0] @ wl).astype(float),)
        else:
            self.H = tuple((b @ wl).astype(float) for b in (self.BB[0][0], self.BB[0][1], self.BB[1][1]))

    def grid_search(self, r_loc):
        """Best (shift, FWHM) for the local residual ``r_loc`` (other components
        subtracted): non-negative amplitudes solved for every grid candidate at once, a
        parabola through the neighbours of the best one, then its amplitudes."""
        rw = (r_loc * self.wl).astype(np.float32)
        if self.ncomp == 1:
            c1 = (self.B[0] @ rw).astype(float)
            h = self.H[0]
            gain = np.where(h > 0, np.maximum(c1, 0.0) ** 2 / np.where(h > 0, h, 1.0), 0.0)
        else:
            c1, c2 = (self.B[0] @ rw).astype(float), (self.B[1] @ rw).astype(float)
            h11, h12, h22 = self.H
            det = h11 * h22 - h12 ** 2
            ok = det > 1e-12 * np.maximum(h11 * h22, 1e-300)
            sdet = np.where(ok, det, 1.0)
            a1 = (h22 * c1 - h12 * c2) / sdet
            a2 = (h11 * c2 - h12 * c1) / sdet
            g_both = np.where(ok & (a1 >= 0) & (a2 >= 0), a1 * c1 + a2 * c2, -np.inf)
            g1 = np.where(h11 > 0, np.maximum(c1, 0.0) ** 2 / np.where(h11 > 0, h11, 1.0), 0.0)
            g2 = np.where(h22 > 0, np.maximum(c2, 0.0) ** 2 / np.where(h22 > 0, h22, 1.0), 0.0)
            gain = np.maximum(np.maximum(g_both, g1), g2)
        S, W = self.shifts.size, self.fwhms.size
        g = gain.reshape(S, W)
        i, j = np.unravel_index(int(np.argmax(g)), g.shape)
        if g[i, j] > 0:
            ds = _parabola(g[i - 1, j] if i > 0 else None, g[i, j], g[i + 1, j] if i < S - 1 else None)
            lw = np.log(self.fwhms)
            dw = _parabola(g[i, j - 1] if j > 0 else None, g[i, j], g[i, j + 1] if j < W - 1 else None)
            self.set_params(self.shifts[i] + SHIFT_STEP_KMS * ds, np.exp(lw[j] + (lw[1] - lw[0]) * dw))
        return _nn_local(self.cols, r_loc, self.wl)


def _parabola(gm, g0, gp):
    """Offset (in grid steps, within ±0.5) of the vertex of a parabola through three points."""
    if gm is None or gp is None:
        return 0.0
    gm, g0, gp = float(gm), float(g0), float(gp)
    if not (math.isfinite(gm) and math.isfinite(gp)):
        return 0.0
    den = gm - 2.0 * g0 + gp
    if den >= 0:
        return 0.0
    return float(min(0.5, max(-0.5, 0.5 * (gm - gp) / den)))


def _feii_template(lr):
    t = np.zeros_like(lr)
    for c, fwhm, s in FEII_UV:
        t += s * _gauss(lr, c, fwhm / FWHM_PER_SIGMA)
    return t / 20.0


# ============================================================================ model
class _Fit:
    """The model of the unabsorbed spectrum (module docstring): power law (Gauss–Newton
    column for α), UV Fe II template, broad lines; back-fitting with clipping."""

    def __init__(self, lam, lr, f, s, good, z):
        self.lam, self.good = lam, good
        self.fscale = float(np.median(np.abs(f[good]))) or 1.0
        self.f = f / self.fscale
        self.s = s / self.fscale
        self.base_w = np.where(good, 1.0 / np.where(good, self.s, 1.0) ** 2, 0.0)
        self.lines = [ln for ln in (_Line(nm, lo, hi, nc, lam, z, good) for nm, lo, hi, nc in EMISSION)
                      if ln.usable]
        tmpl = _feii_template(lr)
        self.tmpl = tmpl if np.sum(good & (tmpl > 0.05 * tmpl.max(initial=0.0))) >= 20 else None
        self.llog = np.log(lr / PIVOT)
        self.alpha = -1.5
        self.nbase = 2 + (self.tmpl is not None)
        self.offsets = np.cumsum([self.nbase] + [ln.ncomp for ln in self.lines])[:-1]
        self.K = self.nbase + sum(ln.ncomp for ln in self.lines)
        self.nonneg = np.ones(self.K, bool)
        self.nonneg[1] = False

    def design(self):
        A = np.zeros((self.lam.size, self.K))
        p = np.exp(self.alpha * self.llog)
        A[:, 0] = p
        A[:, 1] = p * self.llog
        if self.tmpl is not None:
            A[:, 2] = p * self.tmpl
        for ln, k in zip(self.lines, self.offsets):
            A[ln.loc, k:k + ln.ncomp] = ln.cols
        return A

    def joint(self, w, want_cov=False):
        A = self.design()
        beta, cov, active = _solve(A, self.f, w, self.nonneg, want_cov)
        return A, beta, cov, active

    def step_alpha(self, beta):
        if beta[0] > 0:
            self.alpha = float(np.clip(self.alpha + np.clip(beta[1] / beta[0], -1.0, 1.0), -5.0, 3.0))

    def sweep(self, w):
        A, beta, _, _ = self.joint(w)
        model = A @ beta
        self.step_alpha(beta)
        for ln, k in zip(self.lines, self.offsets):
            old = ln.cols @ beta[k:k + ln.ncomp]
            r_loc = self.f[ln.loc] - model[ln.loc] + old
            amp = ln.grid_search(r_loc)
            beta[k:k + ln.ncomp] = amp
            model[ln.loc] += ln.cols @ amp - old

    def run(self, zones):
        good = self.good
        # starting slope: straight line in log F - log λ through the positive good pixels
        pos = good & (self.f > 0)
        if pos.sum() > 10:
            sl = np.polyfit(self.llog[pos], np.log(self.f[pos]), 1)[0]
            self.alpha = float(np.clip(sl, -5.0, 3.0)) if np.isfinite(sl) else -1.5
        w = self.base_w * np.where(zones, 0.02, 1.0)
        mask = good.copy()
        for it in range(5):
            if it > 0:
                w = self.base_w * mask
            for ln in self.lines:
                ln.set_weights(w)
            for _ in range(2 if it == 0 else (1 if it == 1 else 0)):
                self.sweep(w)
            A, beta, _, active = self.joint(w)
            model = A @ beta
            zres = (self.f - model) / np.where(good, self.s, np.inf)
            low = (zres < -CLIP_LO) & (self.f < (1.0 - CLIP_FRAC) * model)
            low = low | np.r_[low[1:], False] | np.r_[False, low[:-1]]
            new = good & ~low & ~(zres > CLIP_HI)
            if it > 0 and np.array_equal(new, mask):
                break
            mask = new
        else:
            w = self.base_w * mask
        A, beta, cov, active = self.joint(w, want_cov=True)
        model = A @ beta
        dof = max(int(np.sum(w > 0)) - int(active.sum()), 1)
        chi2 = float(np.sum(w * (self.f - model) ** 2) / dof)
        cov = cov * max(chi2, 1.0)
        self.info = {"lines": {ln.name: (ln.shift, ln.fwhm) for ln in self.lines},
                     "feii": self.tmpl is not None, "n_clipped": int(np.sum(good & ~mask))}
        fs = self.fscale
        # slope of the final (linearised) power law p·(β0 + β1 ln λ/λ0): α + β1/β0
        alpha = self.alpha + (beta[1] / beta[0] if beta[0] > 0 else 0.0)
        return model * fs, A[:, active] * fs, cov[np.ix_(active, active)], float(alpha), chi2, mask


# ============================================================================ indices
def _interp_bad(arr, good):
    """Linear interpolation over bad pixels along the last axis (index space), vectorised."""
    if good.all() or not good.any():
        return arr
    gi = np.flatnonzero(good)
    bi = np.flatnonzero(~good)
    pos = np.searchsorted(gi, bi)
    left = gi[np.clip(pos - 1, 0, gi.size - 1)]
    right = gi[np.clip(pos, 0, gi.size - 1)]
    span = np.where(right != left, right - left, 1)
    t = np.where(right != left, (bi - left) / span, 0.0)
    t = np.where(bi < gi[0], 1.0, np.where(bi > gi[-1], 0.0, t))
    out = arr.copy()
    out[..., bi] = (1 - t) * arr[..., left] + t * arr[..., right]
    return out


def _measure_lines(z, lam_lo, lam_hi, fs, nsig, good, n_mc):
    """BI / AI of all BAL lines from the smoothed normalised flux rows ``fs`` (row 0 =
    data, rows 1.. = Monte-Carlo realisations); ``lam_lo``/``lam_hi``: pixel edges (Å).

    The velocity windows of the four lines are laid side by side (each followed by a
    sentinel pixel at f = 1 that ends any run), so eqs. (2) and (3) are evaluated for all
    lines and all realisations in one vectorised pass."""
    nan = float("nan")
    R, P = fs.shape
    cols, e_lo, e_hi, wins, seg, n_red = [], [], [], [], [], []
    for d in BAL_LINES:
        lam_c = L.rest_wavelength(d.name) * (1.0 + z)
        v_lo_px = C_KMS * (lam_c - lam_hi) / lam_c           # red edge = low velocity
        v_hi_px = C_KMS * (lam_c - lam_lo) / lam_c
        vmax = max(d.bi_window[1], d.ai_window[1])
        sel = np.flatnonzero((v_hi_px > 0.0) & (v_lo_px < vmax))[::-1]      # increasing velocity
        n_red.append(int(np.sum((v_lo_px > -3000.0) & (v_hi_px < -300.0) & good)))
        seg.append(len(cols) and sum(c.size for c in cols))
        lo_ = np.maximum(v_lo_px[sel], 0.0)
        hi_ = v_hi_px[sel]
        last = hi_[-1] if sel.size else 0.0
        cols.append(np.r_[sel, P])
        e_lo.append(np.r_[lo_, last])
        e_hi.append(np.r_[hi_, last])
        wins.append(np.repeat([[*d.bi_window, *d.ai_window]], sel.size + 1, axis=0))
    cols = np.concatenate(cols)
    dt = fs.dtype
    e_lo, e_hi = np.concatenate(e_lo).astype(dt), np.concatenate(e_hi).astype(dt)
    wins = np.concatenate(wins).astype(dt)
    seg = np.array(seg)
    fsc = np.concatenate([fs, np.ones((R, 1), fs.dtype)], axis=1)[:, cols]
    gc = np.r_[good, False][cols]
    sc = np.r_[np.where(good, nsig, 0.0), 0.0][cols]           # bad pixels: no noise term
    # ---- runs of f < 0.9 and the two integrals, all rows at once
    Q = cols.size
    below = fsc < THRESHOLD
    idx = np.arange(Q)
    start = np.minimum(np.maximum.accumulate(np.where(below, -1, idx), axis=1) + 1, Q - 1)
    nxt = np.minimum.accumulate(np.where(below, Q, idx)[:, ::-1], axis=1)[:, ::-1]
    v0, v1 = e_lo[start], e_hi[np.maximum(nxt - 1, 0)]
    lo = np.maximum(np.maximum(e_lo, wins[:, 0]), v0 + 2000.0)
    ov_bi = np.where(below, np.clip(np.minimum(e_hi, wins[:, 1]) - lo, 0.0, None), 0.0)
    ov_ai = np.clip(np.minimum(e_hi, wins[:, 3]) - np.maximum(e_lo, wins[:, 2]), 0.0, None)
    ov_ai = np.where(below & (v1 - v0 >= 450.0), ov_ai, 0.0)
    bi = np.add.reduceat(ov_bi * (1.0 - fsc / THRESHOLD), seg, axis=1) + 0.0   # (R, 4); no -0.0
    ai = np.add.reduceat(ov_ai * (1.0 - fsc), seg, axis=1)
    noise = np.sqrt(np.add.reduceat((ov_bi[0] * sc / THRESHOLD) ** 2, seg))
    ai_noise = np.sqrt(np.add.reduceat((ov_ai[0] * sc) ** 2, seg))
    if n_mc >= 2:
        bi_mc, ai_mc = np.std(bi[1:], axis=0, ddof=1), np.std(ai[1:], axis=0, ddof=1)
    else:
        bi_mc, ai_mc = np.full(4, nan), ai_noise
    # ---- the troughs of the data row (per contiguous region via bincount)
    b0 = below[0]
    starts = b0 & ~np.r_[False, b0[:-1]]
    rid = (np.cumsum(starts) - 1)[b0]
    nr = int(rid[-1]) + 1 if rid.size else 0
    r_bi = np.bincount(rid, weights=ov_bi[0][b0], minlength=nr)
    r_ai = np.bincount(rid, weights=ov_ai[0][b0], minlength=nr)
    r_def = np.bincount(rid, weights=(ov_ai[0] * (1.0 - fsc[0]))[b0], minlength=nr)
    r_var = np.bincount(rid, weights=((ov_ai[0] * sc) ** 2)[b0], minlength=nr)
    r_v0, r_v1 = v0[0][starts], v1[0][starts]
    r_line = np.searchsorted(seg, np.flatnonzero(starts), side="right") - 1
    wide = (r_v1 - r_v0 >= LOWION_WIDTH_KMS) & (r_ai > 0) & (r_def >= LOWION_SIGMA * np.sqrt(r_var))
    line_of = np.searchsorted(seg, idx, side="right") - 1
    out = []
    for k, d in enumerate(BAL_LINES):
        rest = L.rest_wavelength(d.name)
        m = (line_of == k) & (cols < P)
        g = m & gc
        if not g.any():
            out.append(BALLine(d.key, d.name, rest, False, 0.0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan,
                               False, False, (), "NOT_COVERED"))
            continue
        w0, w1 = d.bi_window
        cover_frac = float(np.sum(np.clip(np.minimum(e_hi[g], w1) - np.maximum(e_lo[g], w0), 0.0, None))
                           / (w1 - w0))
        covered = bool(n_red[k] >= 3 and cover_frac >= 0.5)
        b, err_mc = float(bi[0, k]), float(bi_mc[k])
        err = float(noise[k]) if not np.isfinite(err_mc) else max(err_mc, float(noise[k]))
        significant = bool(b > 0 and b >= BI_SIGMA * err)
        snr = (b / err if err > 0 else float("inf")) if b > 0 else 0.0
        mine = r_line == k
        troughs = tuple((float(a), float(c), "BI" if rb > 0 else "AI")
                        for a, c, rb, ra in zip(r_v0[mine], r_v1[mine], r_bi[mine], r_ai[mine]) if rb > 0 or ra > 0)
        has_bi = mine & (r_bi > 0)
        v_min = float(r_v0[has_bi].min()) if has_bi.any() else nan
        v_max = float(r_v1[has_bi].max()) if has_bi.any() else nan
        inwin = g & (e_hi > d.ai_window[0]) & (e_lo < d.ai_window[1])
        qualifies = significant or (d.low_ion and bool(np.any(wide & mine)))
        out.append(BALLine(
            d.key, d.name, rest, covered, cover_frac,
            float(e_lo[inwin].min()) if inwin.any() else nan, float(e_hi[inwin].max()) if inwin.any() else nan,
            b, err, float(snr), float(ai[0, k]), float(ai_mc[k]),
            v_min, v_max, float(1.0 - np.min(fsc[0][inwin])) if inwin.any() else nan,
            significant, bool(qualifies), troughs,
            "" if covered else ("PARTIAL" if cover_frac > 0 else "NOT_COVERED")))
    return out


@lru_cache(maxsize=4)
def _normal_draws(seed, n_mc, n_pix, n_par):
    """Standard-normal draws for the Monte-Carlo (read-only, cached: the same seed and
    sizes give the same draws, and repeated calls on same-sized spectra skip the RNG)."""
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((n_mc, n_pix), dtype=np.float32)
    xi = rng.standard_normal((n_mc, n_par))
    eps.flags.writeable = False
    xi.flags.writeable = False
    return eps, xi


def _velocity(d, lam, z):
    lc = L.rest_wavelength(d.name) * (1.0 + z)
    return C_KMS * (lc - lam) / lc


# ============================================================================ public
def measure_bal(spec: AnalysisSpectrum, z: float, n_mc: int = 100, seed: int = 0) -> BALResult:
    """Balnicity and absorption indices of Si IV, C IV, Al III, Mg II and the BAL / LoBAL
    classification of a quasar spectrum at redshift ``z`` (see the module docstring).

    ``n_mc``: Monte-Carlo realisations for the errors (0: errors from the propagated
    pixel noise only); ``seed``: their random seed.  Raises :class:`SpectrumError` for a
    non-finite or negative ``z`` or an input that is not an :class:`AnalysisSpectrum`.
    """
    z, n_mc = _check_input(spec, z, n_mc)
    nan = float("nan")
    name = spec.name or "spectrum"
    lam_all = np.asarray(spec.wave, float)
    lr_all = lam_all / (1.0 + z)
    sel = (lr_all >= FIT_RANGE[0]) & (lr_all <= FIT_RANGE[1])
    good_all = np.asarray(spec.good, bool) & np.isfinite(spec.flux) & np.isfinite(spec.sigma) & (spec.sigma > 0)
    model_full = np.full(lam_all.size, nan)
    if np.sum(sel & good_all) < 30:
        none = np.zeros(0)
        lines = tuple(_measure_lines(z, none, none, np.zeros((1, 0)), none, none.astype(bool), 0))
        return BALResult(name, z, False, False, nan, nan, "", nan, nan, lines, nan, nan, n_mc,
                         ",".join(f"NOT_COVERED:{d.key}" for d in BAL_LINES),
                         f"rest {FIT_RANGE[0]:.0f}-{FIT_RANGE[1]:.0f} A (Si IV to Mg II) not covered at z={z:.3f}",
                         model_full)
    lam, lr = lam_all[sel], lr_all[sel]
    good = good_all[sel]
    f = np.where(good, np.asarray(spec.flux, float)[sel], 0.0)
    s = np.where(good, np.asarray(spec.sigma, float)[sel], np.inf)
    # first pass: BAL-candidate zones (2500 km/s .. upper BI limit) down-weighted
    vel = {d.key: _velocity(d, lam, z) for d in BAL_LINES}
    zones = np.zeros(lam.size, bool)
    for d in BAL_LINES:
        zones |= (vel[d.key] > 2500.0) & (vel[d.key] < d.bi_window[1])
    fit = _Fit(lam, lr, f, s, good, z)
    model, A, cov, alpha, chi2, mask = fit.run(zones)
    model_full[sel] = model
    flags = []
    ok = good & (model > 0)
    if not np.all(model[good] > 0):
        flags.append("MODEL_NONPOSITIVE")

    # ---- normalised flux (data + MC rows) on the pixels the indices need
    need = np.zeros(lam.size, bool)
    for d in BAL_LINES:
        need |= (vel[d.key] > -3500.0) & (vel[d.key] < max(d.bi_window[1], d.ai_window[1]) + 1500.0)
    sub = np.flatnonzero(need)
    el = _edges(lam)
    lam_lo, lam_hi = el[:-1][sub], el[1:][sub]
    fsub, ssub, msub, oks = f[sub], s[sub], model[sub], ok[sub]
    nf = np.where(oks, fsub / np.where(oks, msub, 1.0), 0.0)
    nsig = np.where(oks, ssub / np.where(oks, msub, 1.0), np.inf)
    rows = nf[None, :].astype(np.float32)          # float32: ample for f(v) near 0.9
    if n_mc > 0:
        eps, xi = _normal_draws(int(seed), n_mc, 64 * (sub.size // 64 + 1), 64)
        eps, xi = eps[:, :sub.size], xi[:, :cov.shape[0]]
        ev, evec = np.linalg.eigh(0.5 * (cov + cov.T))
        dbeta = xi @ (evec * np.sqrt(np.clip(ev, 0.0, None))).T
        # model draws: einsum, not BLAS (OpenBLAS threading costs more than the product here)
        mod_mc = (msub[None, :] + np.einsum("mk,nk->mn", dbeta, A[sub])).astype(np.float32)
        okm = oks[None, :] & (mod_mc > 0)
        f_mc = fsub.astype(np.float32)[None, :] + eps * np.where(oks, ssub, 0.0).astype(np.float32)[None, :]
        rows = np.vstack([rows, np.where(okm, f_mc / np.where(okm, mod_mc, np.float32(1.0)), np.float32(0.0))])
    rows = _interp_bad(rows, oks)
    fs = uniform_filter1d(rows, SMOOTH_PX, axis=-1, mode="nearest") if SMOOTH_PX > 1 else rows
    results = _measure_lines(z, lam_lo, lam_hi, fs, nsig, oks, n_mc)
    by = {r.key: r for r in results}

    # ---- classification (rules in the module docstring)
    label = {d.key: d.label for d in BAL_LINES}
    hi_cov = [by[k] for k in ("CIV", "SiIV") if by[k].covered]
    lo_cov = [by[k] for k in ("AlIII", "MgII") if by[k].covered]
    deciding = hi_cov if hi_cov else lo_cov
    sig = [r for r in deciding if r.significant]
    bal = bool(sig)
    if bal and not hi_cov:
        flags.append("BAL_FROM_LOW_ION")
    low_q = [r for r in lo_cov if r.qualifies]
    lobal = bool(bal and low_q)
    for r in results:
        if not r.covered:
            flags.append(f"{'PARTIAL' if r.cover_frac > 0 else 'NOT_COVERED'}:{r.key}")
        elif r.bi > 0 and not r.significant:
            flags.append(f"BI_NOT_SIGNIFICANT:{r.key}")
    if fit.info["n_clipped"] > 0.3 * good.sum():
        flags.append("HEAVY_CLIPPING")
    if bal:
        reason = "BAL: " + "; ".join(f"{label[r.key]} BI = {r.bi:.0f} +- {r.bi_err:.0f} km/s ({r.bi_snr:.1f} sigma)"
                                     for r in sig)
        if lobal:
            reason += "; low-ionisation troughs in " + ", ".join(label[r.key] for r in low_q)
        elif lo_cov:
            reason += "; no qualifying Al III / Mg II trough (HiBAL)"
        else:
            reason += "; Al III and Mg II not covered"
    elif not deciding:
        reason = f"no BAL line (Si IV, C IV, Al III, Mg II) sufficiently covered at z={z:.3f}"
    else:
        reason = "no significant BI > 0 trough in " + ", ".join(label[r.key] for r in deciding)
    main = by["CIV"] if by["CIV"].covered else (by["SiIV"] if by["SiIV"].covered else None)
    return BALResult(
        name, z, bal, lobal,
        main.bi if main else nan, main.bi_err if main else nan, main.key if main else "",
        main.ai if main else nan, main.ai_err if main else nan,
        tuple(results), float(alpha), float(chi2), n_mc, ",".join(flags), reason, model_full)


def plot_bal(spec: AnalysisSpectrum, z: float, result: BALResult, path=None):
    """Normalised flux against velocity for each covered BAL line (Solarz et al. 2020,
    Fig. 9 style): data (grey) and its 3-pixel running mean (black), the 1.0 and 0.9
    levels, troughs contributing to BI shaded orange, other AI troughs light blue.
    Returns a :class:`matplotlib.figure.Figure`; writes a PNG when ``path`` is given."""
    from matplotlib.figure import Figure

    z = float(z)
    shown = [ln for ln in result.lines if ln.covered or ln.cover_frac > 0]
    fig = Figure(figsize=(7.0, 2.2 * max(len(shown), 1) + 0.6))
    if not shown or result.model is None:
        ax = fig.subplots()
        ax.text(0.5, 0.5, f"{result.spectrum}: no BAL line covered at z={z:.3f}", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        axes = np.atleast_1d(fig.subplots(len(shown), 1, sharex=True))
        m = result.model
        ok = np.isfinite(m) & (m > 0) & spec.good
        nf = np.where(ok, spec.flux / np.where(ok, m, 1.0), np.nan)
        sm = uniform_filter1d(np.where(ok, nf, 0.0), SMOOTH_PX) / np.maximum(
            uniform_filter1d(ok.astype(float), SMOOTH_PX), 1e-9)
        sm = np.where(ok, sm, np.nan)
        for ax, ln in zip(axes, shown):
            lc = ln.rest_vac * (1.0 + z)
            v = C_KMS * (lc - spec.wave) / lc
            inw = (v > -6000) & (v < 31000) & ok
            ax.plot(-v[inw], nf[inw], color="0.65", lw=0.6, drawstyle="steps-mid")
            ax.plot(-v[inw], sm[inw], color="k", lw=1.0)
            ax.axhline(1.0, color="0.3", lw=0.6, ls=":")
            ax.axhline(THRESHOLD, color="tab:red", lw=0.8, ls="--")
            d = _BY_KEY[ln.key.lower()]
            ax.axvspan(-d.bi_window[1], -d.bi_window[0], color="0.93", zorder=0)      # BI window
            for v0, v1, kind in ln.troughs:
                ax.axvspan(-v1, -v0, color="tab:orange" if kind == "BI" else "lightblue", alpha=0.45, zorder=0.5)
            ax.set_ylim(-0.1, 1.8)
            ax.set_xlim(-31000, 6000)
            txt = f"{d.label}: BI = {ln.bi:.0f} ± {ln.bi_err:.0f}, AI = {ln.ai:.0f} ± {ln.ai_err:.0f} km/s"
            if not ln.covered:
                txt += " (partly covered)"
            ax.text(0.01, 0.93, txt, transform=ax.transAxes, va="top", fontsize=8)
            ax.set_ylabel("F / F_model")
        axes[-1].set_xlabel("velocity relative to the line (km/s; negative = outflow)")
        tag = "LoBAL" if result.lobal else ("BAL" if result.bal else "no BAL")
        fig.suptitle(f"{result.spectrum}  z={z:.3f}  {tag}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
