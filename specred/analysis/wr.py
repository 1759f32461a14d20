"""Wolf-Rayet features: the blue bump at 4640–4686 Å and the red bump at 5808 Å.

Galaxies hosting Wolf-Rayet (WR) stars show broad stellar emission from the expanding
winds of those stars (Conti 1991, ApJ 377, 115; Schaerer & Vacca 1998, ApJ 497, 618;
Crowther 2007, ARA&A 45, 177):

* the **blue bump** around 4600–4720 Å: N III 4634/4641 and C III 4647/4650 (C IV 4658)
  from WN/WC stars and **broad He II 4686** (WN stars), intrinsic FWHM ~ 1000–3000 km/s;
* the **red bump**: C IV 5801/5812 (WC stars), often weaker and broader.

Three galaxies of the programme show the blue bump (Solarz et al. 2020, A&A 642, A103,
Fig. 4).  On top of the bump sit *narrow nebular* lines that must not be mistaken for it:
nebular He II 4686 (strong in Seyfert 2 nuclei too), [Fe III] 4658, [Ar IV] 4711 blended
with He I 4713, and [Ar IV] 4740 (López-Sánchez & Esteban 2010, A&A 516, A104;
Brinchmann, Kunth & Durret 2008, A&A 485, 657).

The model (:func:`measure_wr_bump`)
-----------------------------------
A dedicated vectorised least-squares model in three rest-frame windows (vacuum Å):

* **Hβ window** 4790–5060: linear continuum, narrow Hβ and the [O III] 4959/5007 doublet
  (ratio 2.98, Storey & Zeippen 2000).  It measures the *effective* width of the narrow
  lines (see below) and holds the AGN check: one broad Hβ Gaussian;
* **blue window** 4520–4820: linear continuum; narrow He II 4687.02, [Fe III] 4659.35,
  [Ar IV] 4711 + He I 4713 (one column at 4713.57: 1.8 Å apart, unresolved at R < 2500) and
  [Ar IV] 4741.49, all at the narrow-line kinematics; two **broad** Gaussians at the N III/
  C III blend (catalogue ``NIII_4640``, 4640.64) and He II 4687.02 sharing one velocity
  shift and one intrinsic width: the bump;
* **red window** 5660–5960: linear continuum, narrow [N II] 5756.24 and He I 5877.25, a
  Na I D absorption column (5891.58/5897.56, at their mean, stellar/interstellar, sign
  free) and one broad Gaussian at C IV 5808.0.

Vacuum wavelengths: the project's catalogue (NIST ASD, Kramida et al.; WR blends after
Crowther 2007) and, for the lines it lacks, the NIST ASD air wavelengths [Fe III] 4658.05,
[Ar IV] 4711.37 and 4740.16, He I 4713.14 converted to vacuum with Morton (2000, ApJS 130,
403), see :data:`FEIII_4658` etc.

Every Gaussian is averaged over its pixel (variance of the pixel box added) and broadened
by the instrument as in :mod:`specred.analysis.fitting`: σ_total² = σ_LSF² + q|q|, where
q is the intrinsic σ and may be negative for the narrow lines (a nominal LSF slightly
wider than the true one would otherwise leave symmetric residuals that a broad component
fits).  The narrow-line redshift and q are found on grids in the Hβ window (about 1 ms); a
:class:`~specred.analysis.LineFitResult` of the project's fitter passed as ``lines=``
(e.g. the BPT fit the pipeline makes anyway) supplies the narrow redshift and Hβ flux
instead.  :func:`~specred.analysis.fit_lines` itself cannot fit the bump: He II 4686 would
have to sit in a narrow and a broad group at once, and a ``LineFitResult`` holds one line
per name (``res[name]`` returns the first; the fluxes of the two would be reported as one).

For given broad kinematics the model is linear in the continuum coefficients and fluxes
(variable projection, Golub & Pereyra 1973).  The χ² gain of the broad columns is computed
for every candidate (shift ±300 km/s, intrinsic FWHM from a lower bound — see rule 3 — to
6000 km/s) at once, after projecting data and broad columns orthogonally to the fixed
columns, first on a coarse then on a fine grid.  Errors: the covariance of all parameters
from the full Jacobian (fluxes, continuum, shift and width) scaled by max(1, reduced χ²), or,
with ``n_mc > 1``, the scatter of ``n_mc`` refits of noise realisations drawn from the
errors.  Δχ² = χ²(no broad components) − χ²(best), divided by the reduced χ² when that
exceeds 1 (unmodelled structure dilutes the evidence).

The decision rule (``WRResult.wr``)
-----------------------------------
A spectrum is flagged WR when all of these hold:

1. the blue bump region 4600–4720 Å (rest) is covered, >= 80 % of its pixels usable, with
   continuum on both sides (otherwise flag ``NOT_COVERED``);
2. the bump (broad N III/C III + broad He II) has positive flux and is significant:
   Δχ² >= :data:`DCHI2_MIN` (16: likelihood-ratio significance sqrt(Δχ²) >= 4σ, a margin
   over 3σ for the search over shift and width) and flux / flux_err >= :data:`SNR_MIN` (3);
   its rest EW is >= :data:`EW_MIN` (2 Å: a 1–2 % continuum mismatch over the ~40 Å of the
   bump — flux calibration, stellar templates — reaches ~1 Å; in high-S/N SDSS spectra of
   early-type galaxies such residuals are formally significant); and neither component is
   negative by more than 2σ (WR emission has both parts >= 0; a positive sum of a positive
   and a negative part is continuum structure);
3. it is clearly broader than the narrow lines, by construction of the width search:
   intrinsic FWHM >= :data:`FWHM_MIN_KMS` (800 km/s) and >= 2 × the narrow FWHM, and an
   instrumentally broadened FWHM >= 1.5 × that of the narrow lines (below that, broad and
   narrow He II are the same column at EFOSC2 resolution); and FWHM <= :data:`FWHM_MAX_KMS`
   (5000 km/s: broader "bumps" are continuum shape, e.g. flux-calibration wiggles);
4. it is not the broad-line region of an AGN: a broad Hβ component that is significant
   (Δχ² >= 25, S/N >= 5, FWHM >= 1200 km/s) and carries more flux than the bump or more than
   half the narrow Hβ vetoes it (type-1 AGN: broad He II 4686 and the Fe II 4570 blend under
   a strong broad Hβ; WR stars add little broad Hβ to the nebular one).  Flag
   ``BROAD_HBETA``.

The significance requirement of rule 2 is relaxed to Δχ² >= 9 and S/N >= 2 (3σ and 2σ)
when the red bump (C IV 5808) is seen at >= 3σ too (Δχ² >= 9, positive, EW >= 2 Å, FWHM
<= 5000 km/s): two independent features at 3σ.  The red bump alone never makes a WR galaxy
(WN-dominated populations have none, and its window holds Na D and He I 5876); it is
reported (``red_*``) and flagged ``RED_BUMP`` at Δχ² >= 16.

The thresholds were set on simulated EFOSC2 spectra (specred.simulate, Gaussian noise):
1000 SF, Seyfert 2, S0 and E galaxies at z 0.01–0.3 and S/N 5–50 gave no false WR (largest
no-bump Δχ² ~ 20, failing the other cuts), nor did 80 QSOs; of 200 WR galaxies at z
0.02–0.15 and S/N 10–40, 76 % were flagged (54 % at S/N 10–20, 80 % at 20–30, 95 % at
30–40: the simulated bumps are 0.18–0.3 Hβ, rest EW ~ 3–15 Å, and with the true width and
shift given, Δχ² >= 16 alone would reach 79 %).  Bump fluxes: median ratio to the truth
1.05, scatter 17 % at S/N >= 25; errors: pulls with mean +0.2, rms 0.9.  Six real SDSS
spectra (early types with the Fe 4668 absorption band, a type-1 AGN, a Seyfert 2 with
nebular He II, a z = 1.9 quasar) are all rejected.  About 7 ms CPU per spectrum.

Nebular lines are emission: their fluxes are held >= 0 in both models (the active-set
step of NNLS).  For a host known to be star-forming (``star_forming=True``, what
:func:`~specred.analysis.classify.classify_spectrum` passes for SF and composite galaxies)
they are also held below :data:`NEBULAR_MAX_HBETA` × narrow Hβ: at EFOSC2 resolution a free
narrow He II plus [Fe III] otherwise soaks up much of a weak bump.  On 40 simulated WR
galaxies (S/N 10–40) that finds 38 instead of 31 (S/N < 20: 11/13 instead of 5/13), with
no false WR in 60 SF galaxies without a bump (largest Δχ² 12).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import SpectrumError
from . import lines as L
from .fitting import LineFitResult
from .spectrum import C_KMS, FWHM_PER_SIGMA, AnalysisSpectrum

# ============================================================================ constants
#: Rest-frame vacuum wavelengths (Å) of nebular lines near the bumps that the catalogue
#: does not hold: NIST ASD (Kramida et al.) air wavelengths converted to vacuum with Morton
#: (2000): [Fe III] 4658.05 -> 4659.35, [Ar IV] 4711.37 -> 4712.69, He I 4713.14 -> 4714.46,
#: [Ar IV] 4740.16 -> 4741.49.  Na I D2/D1 5891.58/5897.56 as in the catalogue.
FEIII_4658 = 4659.35
ARIV_4711 = 4712.69
HEI_4713 = 4714.46
ARIV_4740 = 4741.49
ARIV_HEI_BLEND = 0.5 * (ARIV_4711 + HEI_4713)
#: Upper limits, in units of the narrow Hβ flux, on the nebular lines under and beside the
#: bumps when the host is a star-forming galaxy (``measure_wr_bump(star_forming=True)``).
#: At EFOSC2 resolution (FWHM ~ 1000 km/s) a free narrow He II 4686 and [Fe III] 4658 absorb
#: most of a 1500–2500 km/s bump; star formation alone does not make them strong: nebular
#: He II 4686 / Hβ is 0.005–0.02 in H II galaxies, rarely up to 0.03 at the lowest
#: metallicities (Guseva, Izotov & Thuan 2000, ApJ 531, 776; Shirazi & Brinchmann 2012,
#: MNRAS 421, 1043, where pure star formation stays below log He II/Hβ ~ -1), [Fe III] 4658,
#: [Ar IV] 4711/4740, He I 4713 and [N II] 5755 are ≲ 0.01 Hβ and He I 5876 ≈ 0.1 Hβ
#: (Izotov et al. 2006, A&A 448, 955); the limits sit a factor ~2 above those.  AGN
#: (Seyfert 2 He II / Hβ ~ 0.2–0.3) are measured without them.
NEBULAR_MAX_HBETA = {"HeII_4686n": 0.04, "FeIII_4658": 0.02, "ArIV_4711+HeI_4713": 0.03, "ArIV_4740": 0.02,
                     "NII_5755": 0.02, "HeI_5876": 0.2}
NAD_MEAN = 0.5 * (5891.58 + 5897.56)

#: rest-frame vacuum windows (Å) and the ranges that must be covered in them
BLUE_WINDOW = (4520.0, 4820.0)
BLUE_CORE = (4600.0, 4720.0)
RED_WINDOW = (5660.0, 5960.0)
RED_CORE = (5750.0, 5870.0)
HB_WINDOW = (4790.0, 5060.0)
HB_CORE = (4840.0, 5020.0)
#: rest wavelength (Å) where the bump EW is taken (between its two broad components)
BUMP_CENTRE = 4665.0
#: polynomial order of the local continuum of every window
CONTINUUM_ORDER = 1

#: decision thresholds (module docstring)
DCHI2_MIN = 16.0
SNR_MIN = 3.0
FWHM_MIN_KMS = 800.0
FWHM_MAX_KMS = 5000.0
EW_MIN = 2.0                    # rest-frame Å
PART_NEG_SIGMA = 2.0
NARROW_FWHM_FACTOR = 2.0
TOTAL_WIDTH_FACTOR = 1.5
RED_DCHI2_MIN = 16.0
JOINT_DCHI2_MIN = 9.0           # blue and red bump both at >= 3 sigma
JOINT_SNR_MIN = 2.0
AGN_DCHI2_MIN = 25.0
AGN_SNR_MIN = 5.0
AGN_NARROW_FRACTION = 0.5
LOW_SNR_CONTINUUM = 5.0         # median continuum S/N per pixel in the blue window -> LOW_SNR

#: search grids: broad shift (km/s), upper intrinsic FWHM (km/s), ratio of grid widths
DV_GRID = np.linspace(-300.0, 300.0, 9)
FWHM_GRID_MAX = 6000.0
FWHM_STEP = 1.22
HB_DV_GRID = np.array([-500.0, 0.0, 500.0])
HB_FWHM_GRID = np.geomspace(1200.0, 12000.0, 9)


# ============================================================================ result
@dataclass(frozen=True)
class WRResult:
    """The Wolf-Rayet measurement of one spectrum.

    Fluxes in erg s⁻¹ cm⁻², EWs rest-frame Å (> 0 emission) against the fitted local
    continuum at 4665 Å (blue) / 5808 Å (red), FWHM intrinsic km/s (instrument removed).
    ``flux`` is the whole blue bump (broad N III/C III 4640–4650 + broad He II 4686);
    ``flux_niii`` and ``flux_heii_broad`` are its parts.  ``significance`` =
    sign(flux)·sqrt(Δχ²) of the bump against the same model without it, ``snr`` =
    flux / flux_err.  ``heii_narrow_*``: nebular He II 4686.  ``narrow_*``: the narrow-line
    redshift and intrinsic FWHM used (0: unresolved).  ``hbeta_*``: narrow Hβ from
    the Hβ window fit (or ``lines``); ``broad_hbeta_*``: the AGN check.  ``wr``: the
    decision (module docstring), explained in ``reason``.  ``flags``: comma-separated
    ``NOT_COVERED``, ``LOW_SNR``, ``FWHM_AT_BOUND``, ``BROAD_HBETA``, ``NO_NARROW_LINES``,
    ``LSF_UNKNOWN`` (widths then include the instrument), ``ABSORPTION_TROUGH`` (a significant
    *deficit* under the bump: stellar absorption, e.g. the Fe 4668 band of old populations),
    ``RED_NOT_COVERED``, ``RED_BUMP``.  ``model``: curves for :func:`plot_wr`.
    """

    spectrum: str
    z: float
    wr: bool
    reason: str
    covered: bool
    flux: float
    flux_err: float
    snr: float
    significance: float
    delta_chi2: float
    flux_niii: float
    flux_niii_err: float
    flux_heii_broad: float
    flux_heii_broad_err: float
    ew_rest: float
    ew_rest_err: float
    fwhm_kms: float
    fwhm_kms_err: float
    shift_kms: float
    continuum: float
    continuum_snr: float
    heii_narrow_flux: float
    heii_narrow_flux_err: float
    narrow_z: float
    narrow_fwhm_kms: float
    hbeta_flux: float
    hbeta_flux_err: float
    broad_hbeta_flux: float
    broad_hbeta_flux_err: float
    broad_hbeta_delta_chi2: float
    broad_hbeta_fwhm_kms: float
    red_covered: bool
    red_flux: float
    red_flux_err: float
    red_significance: float
    red_ew_rest: float
    red_fwhm_kms: float
    method: str
    flags: str = ""
    model: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def bump_to_hbeta(self) -> float:
        """Blue bump / narrow Hβ flux (NaN without a positive Hβ)."""
        if not (np.isfinite(self.hbeta_flux) and self.hbeta_flux > 0):
            return float("nan")
        return float(self.flux / self.hbeta_flux)

    def to_row(self) -> dict:
        """One flat row, ``wr_``-prefixed column names (for a per-spectrum table)."""
        return {
            "wr_bump": bool(self.wr), "wr_significance": self.significance, "wr_delta_chi2": self.delta_chi2,
            "wr_snr": self.snr, "wr_flux": self.flux, "wr_flux_err": self.flux_err,
            "wr_flux_niii": self.flux_niii, "wr_flux_niii_err": self.flux_niii_err,
            "wr_flux_heii_broad": self.flux_heii_broad, "wr_flux_heii_broad_err": self.flux_heii_broad_err,
            "wr_ew": self.ew_rest, "wr_ew_err": self.ew_rest_err, "wr_fwhm_kms": self.fwhm_kms,
            "wr_fwhm_kms_err": self.fwhm_kms_err, "wr_shift_kms": self.shift_kms,
            "wr_continuum": self.continuum, "wr_continuum_snr": self.continuum_snr,
            "heii_narrow_flux": self.heii_narrow_flux, "heii_narrow_flux_err": self.heii_narrow_flux_err,
            "wr_narrow_z": self.narrow_z, "wr_narrow_fwhm_kms": self.narrow_fwhm_kms,
            "wr_hbeta_flux": self.hbeta_flux, "wr_bump_hbeta": self.bump_to_hbeta,
            "wr_broad_hbeta_flux": self.broad_hbeta_flux, "wr_broad_hbeta_flux_err": self.broad_hbeta_flux_err,
            "wr_broad_hbeta_delta_chi2": self.broad_hbeta_delta_chi2,
            "wr_red_flux": self.red_flux, "wr_red_flux_err": self.red_flux_err,
            "wr_red_significance": self.red_significance, "wr_red_ew": self.red_ew_rest,
            "wr_red_fwhm_kms": self.red_fwhm_kms, "wr_covered": bool(self.covered),
            "wr_red_covered": bool(self.red_covered), "wr_method": self.method,
            "wr_flags": self.flags, "wr_reason": self.reason,
        }


# ============================================================================ the window model
class _Window:
    """Pixels of one rest-frame window and the columns of its linear model: fixed columns
    (continuum polynomial, lines at fixed kinematics) plus broad Gaussians whose common
    shift and width are searched on a grid."""

    def __init__(self, spec: AnalysisSpectrum, z: float, window, core, flux=None):
        self.z = float(z)
        rest = spec.wave / (1.0 + z)
        sel = spec.good & (rest >= window[0]) & (rest <= window[1])
        idx = np.flatnonzero(sel)
        self.idx, self.n = idx, idx.size
        self.covered = False
        # nebular columns held >= 0, their upper limits, and amplitudes held at a limit
        self.nonneg, self.caps, self.pinned = set(), {}, {}
        if self.n < CONTINUUM_ORDER + 12:
            return
        wgood = spec.wave[spec.good]
        in_core = (rest >= core[0]) & (rest <= core[1])
        r = rest[idx]
        self.covered = bool(wgood[0] <= core[0] * (1 + z) and wgood[-1] >= core[1] * (1 + z)
                            and in_core.sum() >= 3 and spec.good[in_core].mean() >= 0.8
                            and np.sum(r < core[0]) >= 3 and np.sum(r > core[1]) >= 3)
        if not self.covered:
            return
        w = spec.wave
        lo = np.maximum(idx - 1, 0)
        hi = np.minimum(idx + 1, w.size - 1)
        width = (w[hi] - w[lo]) / np.maximum(hi - lo, 1)          # pixel width from its neighbours
        self.pix2_12 = width ** 2 / 12.0                            # variance of the pixel box
        self.wave = w[idx]
        self.y = (spec.flux if flux is None else flux)[idx]
        self.sig = spec.sigma[idx]
        self.w = 1.0 / self.sig
        lsf = spec.lsf_sigma_kms[idx]
        self.lsf = np.where(np.isfinite(lsf), lsf, 0.0)
        self.centre = 0.5 * (self.wave[0] + self.wave[-1])
        self.half = max(0.5 * (self.wave[-1] - self.wave[0]), 1.0)
        x = (self.wave - self.centre) / self.half
        self.fixed = [x ** k for k in range(CONTINUUM_ORDER + 1)]
        self.fixed_names = [f"c{k}" for k in range(CONTINUUM_ORDER + 1)]
        self.broad_rest = np.zeros(0)

    # ------------------------------------------------------------------ columns
    def gauss(self, mu, q):
        """Unit-flux pixel-averaged Gaussians (..., n_pix, k) at observed vacuum centres
        ``mu`` (Å) with width parameter ``q`` (km/s; σ_total² = σ_LSF² + q|q|), both (..., k)."""
        mu = np.asarray(mu, float)
        q = np.asarray(q, float)
        lsf = np.interp(mu, self.wave, self.lsf)
        v2 = np.maximum(lsf ** 2 + q * np.abs(q), np.maximum((0.3 * lsf) ** 2, 1.0))
        s2 = (mu / C_KMS) ** 2 * v2
        se2 = s2[..., None, :] + self.pix2_12[:, None]
        d = self.wave[:, None] - mu[..., None, :]
        return np.exp(-0.5 * d * d / se2) / np.sqrt(2.0 * np.pi * se2)

    def narrow_cols(self, rest, z_n, q, weights=None):
        """Columns of lines at fixed redshift for width parameters ``q`` (shape S):
        (*S, n_pix) for one line or a tied set (``weights``)."""
        rest = np.atleast_1d(np.asarray(rest, float))
        wts = np.ones(rest.size) if weights is None else np.asarray(weights, float)
        q = np.asarray(q, float)[..., None]
        mu = np.broadcast_to(rest * (1 + z_n), q.shape[:-1] + rest.shape)
        return self.gauss(mu, np.broadcast_to(q, mu.shape)) @ wts

    def add_fixed(self, name, col, nonneg=False):
        """A column at fixed kinematics; ``nonneg``: its amplitude is an emission-line flux
        and may not be negative (see :meth:`nonneg_fit`)."""
        self.fixed.append(col)
        self.fixed_names.append(name)
        if nonneg:
            self.nonneg.add(name)
        self._nfixed = None

    def drop_fixed(self, name, value=0.0):
        """Remove a fixed column, holding its amplitude at ``value`` (its contribution is
        taken off the data and kept in ``pinned`` for the model curves)."""
        k = self.fixed_names.index(name)
        if value:
            self.y = self.y - value * self.fixed[k]
            self.pinned[name] = (value, self.fixed[k])
        del self.fixed[k], self.fixed_names[k]
        self._nfixed = None

    def state(self):
        return (list(self.fixed), list(self.fixed_names), self.y, dict(self.pinned))

    def restore(self, st):
        self.fixed, self.fixed_names, self.y, self.pinned = list(st[0]), list(st[1]), st[2], dict(st[3])
        self._nfixed = None

    def nonneg_fit(self, fit, beta_at=0):
        """``fit()`` (returning a tuple with the linear parameters at ``beta_at``) with the non-negative columns held >= 0: the
        most negative of them (in χ² units: amplitude × weighted column norm) is dropped,
        i.e. fixed at zero, and the fit repeated until none is negative (the active-set
        step of NNLS, Lawson & Hanson 1974, on the constrained columns only); likewise one
        above its upper limit in ``caps`` is held at that limit.  Free, a narrow nebular
        He II of negative flux cancels part of a broad bump under it and halves the bump's
        significance.  Returns (fit output, names held); the window keeps the reduced
        column set."""
        dropped = []
        caps = self.caps
        while True:
            out = fit()
            beta = out[beta_at]
            worst, name, value = 0.0, None, 0.0
            for k, n in enumerate(self.fixed_names):
                if n not in self.nonneg:
                    continue
                nrm = float(np.linalg.norm(self.fixed[k] * self.w))
                if beta[k] * nrm < worst:
                    worst, name, value = beta[k] * nrm, n, 0.0
                if n in caps and (caps[n] - beta[k]) * nrm < worst:
                    worst, name, value = (caps[n] - beta[k]) * nrm, n, caps[n]
            if name is None:
                return out, dropped
            self.drop_fixed(name, value)
            dropped.append(name)

    def broad(self, dv, fwhm):
        """Broad columns for shifts ``dv`` and intrinsic FWHM ``fwhm`` (km/s, arrays of one
        shape S): (*S, n_pix, n_broad)."""
        dv = np.asarray(dv, float)[..., None]
        q = np.asarray(fwhm, float)[..., None] / FWHM_PER_SIGMA
        mu = self.broad_rest * (1 + self.z) * (1 + dv / C_KMS)
        return self.gauss(mu, np.broadcast_to(q, mu.shape))

    def base_matrix(self):
        return np.array(self.fixed).T                                # (n_pix, n_fixed)

    # ------------------------------------------------------------------ solving
    def solve(self, G=None, Y=None):
        """Weighted linear least squares of the fixed columns plus ``G`` ((*S, n_pix, k) or
        None).  ``Y``: the data (default) or realisations (n_pix, m).  Returns
        (beta (*S, n_lin[, m]), chi2 (*S[, m]))."""
        B = self.base_matrix()
        A = B if G is None else np.concatenate([np.broadcast_to(B, G.shape[:-1] + B.shape[1:]), G], axis=-1)
        Aw = A * self.w[:, None]
        y = self.y if Y is None else Y
        multi = np.ndim(y) == 2
        yw = y * (self.w[:, None] if multi else self.w)
        AwT = np.swapaxes(Aw, -1, -2)
        N = AwT @ Aw
        d = np.sqrt(np.einsum("...ii->...i", N))
        d = np.where(d > 0, d, 1.0)
        Ns = N / (d[..., :, None] * d[..., None, :])
        rhs = AwT @ (yw if multi else yw[:, None])
        try:
            bs = np.linalg.solve(Ns, rhs / d[..., :, None])
        except np.linalg.LinAlgError:
            bs = np.linalg.pinv(Ns) @ (rhs / d[..., :, None])
        beta = bs / d[..., :, None]
        chi2 = np.sum(yw * yw, axis=0) - np.sum(beta * rhs, axis=-2)
        if not multi:
            beta, chi2 = beta[..., 0], chi2[..., 0]
        return beta, chi2

    def _projector(self):
        """Orthonormal basis of the weighted fixed columns (SVD, rank-safe), cached."""
        if getattr(self, "_nfixed", None) != len(self.fixed):
            Bw = self.base_matrix() * self.w[:, None]
            nrm = np.linalg.norm(Bw, axis=0)
            U, s, _ = np.linalg.svd(Bw / np.where(nrm > 0, nrm, 1.0), full_matrices=False)
            self._Q = U[:, s > 1e-10 * s.max()]
            self._nfixed = len(self.fixed)
        return self._Q

    def delta_chi2(self, G, Y=None):
        """χ² decrease brought by the columns ``G`` (*S, n_pix, k) over the fixed model, for
        every candidate (and realisation): data and ``G`` are projected orthogonally to the
        fixed columns, then Δχ² = bᵀ M⁻¹ b with b = G⊥ᵀ r₀, M = G⊥ᵀ G⊥ (k × k per candidate)."""
        Q = self._projector()
        y = self.y if Y is None else Y
        multi = np.ndim(y) == 2
        yw = y * (self.w[:, None] if multi else self.w)
        r0 = yw - Q @ (Q.T @ yw)
        Gw = G * self.w[:, None]
        Gp = Gw - Q @ (Q.T @ Gw)
        GpT = np.swapaxes(Gp, -1, -2)
        M = GpT @ Gp
        b = GpT @ (r0 if multi else r0[:, None])
        d = np.sqrt(np.einsum("...ii->...i", M))
        d = np.where(d > 0, d, 1.0)
        Ms = M / (d[..., :, None] * d[..., None, :])
        bs = b / d[..., :, None]
        try:
            x = np.linalg.solve(Ms, bs)
        except np.linalg.LinAlgError:
            x = np.linalg.pinv(Ms) @ bs
        out = np.sum(bs * x, axis=-2)
        return out if multi else out[..., 0]

    def search(self, dv_grid, fwhm_grid, Y=None, fine=True):
        """Grid search of the broad kinematics, coarse then (``fine``) a 7 × 7 grid around
        the best; returns (dv, fwhm, beta, chi2) of the best candidate, per realisation
        when ``Y`` holds several."""
        DV, FW = np.meshgrid(dv_grid, fwhm_grid, indexing="ij")
        dvs, fws = DV.ravel(), FW.ravel()
        gain = self.delta_chi2(self.broad(dvs, fws), Y)
        if fine:
            k = int(np.argmax(gain))
            ddv = dv_grid[1] - dv_grid[0] if dv_grid.size > 1 else 0.0
            rf = fwhm_grid[1] / fwhm_grid[0] if fwhm_grid.size > 1 else 1.0
            fdv = np.unique(np.clip(dvs[k] + np.linspace(-1, 1, 7) * ddv, dv_grid[0], dv_grid[-1]))
            ffw = np.unique(np.clip(fws[k] * rf ** np.linspace(-1, 1, 7), fwhm_grid[0], fwhm_grid[-1]))
            D2, F2 = np.meshgrid(fdv, ffw, indexing="ij")
            dvs, fws = D2.ravel(), F2.ravel()
            gain = self.delta_chi2(self.broad(dvs, fws), Y)
        k = np.argmax(gain, axis=0)
        if np.ndim(k) == 0:
            beta, chi2 = self.solve(self.broad(dvs[k:k + 1], fws[k:k + 1]))
            return float(dvs[k]), float(fws[k]), beta[0], float(chi2[0])
        beta, chi2 = self.solve(self.broad(dvs[k], fws[k]), Y)        # (m, n_lin, m)
        m = np.arange(k.size)
        return dvs[k], fws[k], beta[m, :, m], chi2[m, m]

    def covariance(self, dv, fwhm, beta, chi2, free_dv=True, free_fwhm=True):
        """Covariance of (linear parameters, dv, fwhm) from the full Jacobian at the optimum,
        scaled up by the reduced χ² when it exceeds 1 (never down: a chance low χ² should not
        shrink the errors a detection threshold is applied to); a parameter at a grid bound
        is held fixed (NaN row).
        Returns (cov, redchi)."""
        def model(dv_, fw_):
            return self.broad(np.array([dv_]), np.array([fw_]))[0] @ beta[-self.broad_rest.size:]
        A = np.hstack([self.base_matrix(), self.broad(np.array([dv]), np.array([fwhm]))[0]])
        cols, pos = [A], list(range(A.shape[1]))
        if free_dv:
            cols.append(((model(dv + 5.0, fwhm) - model(dv - 5.0, fwhm)) / 10.0)[:, None])
            pos.append(A.shape[1])
        if free_fwhm:
            h = 0.01 * fwhm
            cols.append(((model(dv, fwhm + h) - model(dv, fwhm - h)) / (2 * h))[:, None])
            pos.append(A.shape[1] + 1)
        J = np.hstack(cols) * self.w[:, None]
        dof = self.n - J.shape[1]
        redchi = chi2 / dof if dof > 0 else 1.0
        out = np.full((A.shape[1] + 2, A.shape[1] + 2), np.nan)
        out[np.ix_(pos, pos)] = _inverse(J.T @ J) * max(redchi, 1.0)
        return out, float(redchi)

    def cont_vector(self, rest_wave):
        """Row vector giving the continuum at ``rest_wave`` from the linear parameters."""
        x = (rest_wave * (1 + self.z) - self.centre) / self.half
        v = np.zeros(len(self.fixed) + self.broad_rest.size)
        v[: CONTINUUM_ORDER + 1] = x ** np.arange(CONTINUUM_ORDER + 1)
        return v


def _inverse(m):
    d = np.sqrt(np.abs(np.diag(m)))
    d = np.where(d > 0, d, 1.0)
    try:
        inv = np.linalg.inv(m / np.outer(d, d))
        if not np.all(np.isfinite(inv)):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(m / np.outer(d, d))
    return inv / np.outer(d, d)


def _at_bound(v, grid):
    span = grid[-1] - grid[0]
    return bool(span == 0 or v - grid[0] < 1e-3 * span or grid[-1] - v < 1e-3 * span)


def _err(cov, idx):
    v = float(np.sum(cov[np.ix_(idx, idx)]))
    return float(np.sqrt(v)) if np.isfinite(v) and v >= 0 else float("nan")


def _ew(flux, cont, fvar, cvar, fcv, z):
    """Rest EW (Å) and error of a flux over a continuum with covariances."""
    nan = float("nan")
    if not (np.isfinite(cont) and cont > 0):
        return nan, nan
    var = fvar / cont ** 2 + flux ** 2 * cvar / cont ** 4 - 2 * flux * fcv / cont ** 3
    return float(flux / cont / (1 + z)), float(np.sqrt(max(var, 0.0)) / (1 + z))


def _fwhm_grid(narrow_q, lsf_sigma):
    """Intrinsic FWHM grid (km/s) of a broad component: from the lowest width that is
    clearly broader than the narrow lines (rule 3 of the module docstring) to
    :data:`FWHM_GRID_MAX`, geometric steps of :data:`FWHM_STEP`."""
    lsf_fwhm = FWHM_PER_SIGMA * lsf_sigma
    narrow_fwhm = FWHM_PER_SIGMA * max(narrow_q, 0.0)
    tot_n = FWHM_PER_SIGMA * np.sqrt(max(lsf_sigma ** 2 + narrow_q * abs(narrow_q), 0.0))
    need = np.sqrt(max((TOTAL_WIDTH_FACTOR * tot_n) ** 2 - lsf_fwhm ** 2, 0.0))
    lo = min(max(FWHM_MIN_KMS, NARROW_FWHM_FACTOR * narrow_fwhm, need), 0.6 * FWHM_GRID_MAX)
    n = max(int(np.ceil(np.log(FWHM_GRID_MAX / lo) / np.log(FWHM_STEP))) + 1, 4)
    return np.geomspace(lo, FWHM_GRID_MAX, n)


# ============================================================================ narrow lines
def _narrow_from_lines(res, z):
    """(z_narrow, Hβ flux, Hβ error, detected) from a :class:`LineFitResult` of the project's
    fitter: the redshift of the group holding [O III] 5007 / Hβ / Hα when detected."""
    nan = float("nan")
    if not isinstance(res, LineFitResult):
        raise SpectrumError(f"lines must be a LineFitResult from fit_lines, not {type(res).__name__}")
    hb = res["Hbeta"] if "Hbeta" in res and res["Hbeta"].covered else None
    hbf, hbe = (float(hb.flux), float(hb.flux_err)) if hb is not None else (nan, nan)
    ref = [n for n in ("OIII_5007", "Hbeta", "Halpha") if n in res and res[n].covered and res[n].detected]
    if not ref:
        return z, hbf, hbe, False
    zn = float(res.group_z.get(res[ref[0]].group, z))
    if not np.isfinite(zn) or abs(zn - z) * C_KMS / (1 + z) > 1000.0:
        return z, hbf, hbe, False
    return zn, hbf, hbe, True


def _fit_hbeta(win: _Window, z, zn_given):
    """Narrow-line kinematics and the broad-Hβ AGN check in the Hβ window.

    Narrow Hβ + [O III] 4959/5007 (tied) on a linear continuum, searched on grids of the
    shift (±300 km/s around ``z`` in 25 km/s steps, then 5 km/s; skipped when ``zn_given``)
    and of the width parameter q (σ_total² = σ_LSF² + q|q|; q from -0.7 σ_LSF to 600 km/s,
    1500 without an LSF; then refined between the neighbours of the best).  The narrow
    lines count as detected when they lower χ² by >= 25.  Then one broad Hβ Gaussian
    (shift 0, ±500 km/s; FWHM 1200–12000 km/s) is tried on top.
    Returns (z_narrow, q, detected, Hβ flux, Hβ error, broad-Hβ dict)."""
    hb = L.rest_wavelength("Hbeta")
    r = L.FIXED_RATIOS[("OIII_5007", "OIII_4959")]
    o3 = np.array([L.rest_wavelength("OIII_5007"), L.rest_wavelength("OIII_4959")])
    o3w = np.array([1.0, 1.0 / r])
    lsf = float(np.interp(hb * (1 + z), win.wave, win.lsf))
    # without a known LSF the width parameter carries the instrumental width as well
    qs = np.unique(np.concatenate([-lsf * np.array([0.7, 0.55, 0.4, 0.25, 0.1]), [0.0],
                                   np.geomspace(30.0, 600.0 if lsf > 0 else 1500.0, 10 if lsf > 0 else 14)]))

    def cols(zz, qq):          # (S, n_pix, 2) for arrays zz, qq of shape S
        rest = np.concatenate([[hb], o3])
        mu = rest * (1 + zz[..., None])
        g = win.gauss(mu, np.broadcast_to(qq[..., None], mu.shape))
        return np.stack([g[..., 0], g[..., 1:] @ o3w], axis=-1)

    def best(zz, qq):
        ZZ, QQ = np.meshgrid(zz, qq, indexing="ij")
        gain = win.delta_chi2(cols(ZZ.ravel(), QQ.ravel()))
        k = int(np.argmax(gain))
        return ZZ.ravel()[k], QQ.ravel()[k], float(gain[k])

    # shift and width are nearly orthogonal for symmetric lines: search them in turn
    if zn_given is None:
        zn = best(z + (1 + z) * np.linspace(-300.0, 300.0, 25) / C_KMS, np.array([0.0]))[0]
        q = best(np.array([zn]), qs)[1]
        zn = best(zn + (1 + z) * np.linspace(-25.0, 25.0, 11) / C_KMS, np.array([q]))[0]
    else:
        zn = zn_given
        q = best(np.array([zn]), qs)[1]
    k = int(np.argmin(np.abs(qs - q)))
    q, gain = best(np.array([zn]), np.linspace(qs[max(k - 1, 0)], qs[min(k + 1, qs.size - 1)], 9))[1:]
    detected = gain >= 25.0
    if not detected:
        zn, q = (z if zn_given is None else zn_given), 0.0
    G = cols(np.array(zn), np.array(q))
    win.add_fixed("Hbeta", G[:, 0])
    win.add_fixed("OIII", G[:, 1])
    nf = len(win.fixed)
    beta0, chi2_0 = win.solve()
    hb_cov = _inverse((win.base_matrix() * win.w[:, None]).T @ (win.base_matrix() * win.w[:, None]))
    dof0 = win.n - nf
    hb_err = float(np.sqrt(hb_cov[nf - 2, nf - 2] * max(chi2_0 / dof0 if dof0 > 0 else 1.0, 1.0)))
    win.z = float(zn)
    win.broad_rest = np.array([hb])
    grid = HB_FWHM_GRID
    dv, fw, beta, chi2 = win.search(HB_DV_GRID, grid, fine=False)
    cov, redchi = win.covariance(dv, fw, beta, chi2, free_dv=False, free_fwhm=False)
    bh = dict(flux=float(beta[nf]), err=_err(cov, [nf]), dchi2=float((chi2_0 - chi2) / max(redchi, 1.0)),
              fwhm=float(fw), narrow=float(beta[nf - 2]))
    return float(zn), float(q), bool(detected), float(beta0[nf - 2]), hb_err, bh


# ============================================================================ main entry
def _check(spec, z):
    if not isinstance(spec, AnalysisSpectrum):
        raise SpectrumError("measure_wr_bump needs an AnalysisSpectrum (use specred.analysis.load_spectrum)")
    try:
        zf = float(z)
    except (TypeError, ValueError):
        raise SpectrumError(f"{spec.name}: redshift must be a number (got {z!r})") from None
    if not np.isfinite(zf) or zf < 0:
        raise SpectrumError(f"{spec.name}: redshift must be a finite number >= 0 (got {z!r})")
    return zf


def measure_wr_bump(spec: AnalysisSpectrum, z: float, n_mc: int = 0, seed: int | None = 0,
                    red_bump: bool = True, lines: LineFitResult | None = None,
                    stellar_continuum=None, star_forming: bool = False) -> WRResult:
    """Measure the Wolf-Rayet blue bump (and the C IV 5808 red bump) of ``spec`` at ``z``.

    ``n_mc``: number of Monte-Carlo noise realisations for the errors (0: covariance).
    ``red_bump``: also measure C IV 5808.  ``lines``: a
    :class:`~specred.analysis.LineFitResult` of the same spectrum with Hβ / [O III] 5007
    (the narrow redshift and Hβ flux of the group holding [O III] 5007 / Hβ are used when
    detected, instead of the internal grid).
    ``stellar_continuum``: a :class:`~specred.analysis.StellarContinuum` subtracted first
    (early-type hosts with metal absorption under the bump).  ``star_forming``: the host
    is a star-forming galaxy (e.g. by its BPT class), so its nebular lines near the bumps
    are held below :data:`NEBULAR_MAX_HBETA` × the narrow Hβ flux (which breaks the
    degeneracy of narrow and broad He II at low resolution).  Model and decision rule: see
    the module docstring.  A non-finite or negative ``z`` raises
    :class:`~specred.errors.SpectrumError`.
    """
    z = _check(spec, z)
    nan = float("nan")
    flags = []
    base = None
    if stellar_continuum is not None:
        base = np.where(np.isfinite(stellar_continuum.model), stellar_continuum.model, 0.0)
        if base.shape != spec.flux.shape:
            raise SpectrumError("stellar_continuum: the model was fitted to a different spectrum")
    yfit = None if base is None else spec.flux - base
    nan = float("nan")
    zn, hbf, hbe, detected = z, nan, nan, False
    if lines is not None:
        zn, hbf, hbe, detected = _narrow_from_lines(lines, z)
    rng = np.random.default_rng(seed)
    n_mc = int(n_mc or 0)
    model = {}

    # ------------------------------------------------ narrow kinematics + AGN check (Hβ window)
    q = 0.0
    bh = dict(flux=nan, err=nan, dchi2=nan, fwhm=nan, narrow=nan)
    hbw = _Window(spec, z, HB_WINDOW, HB_CORE, flux=yfit)
    if hbw.covered:
        zn, q, det, hbf2, hbe2, bh = _fit_hbeta(hbw, z, zn if detected else None)
        if lines is None or not detected:
            detected, hbf, hbe = det, hbf2, hbe2
    if not detected:
        flags.append("NO_NARROW_LINES")
    if not np.any(np.isfinite(spec.lsf_sigma_kms)):
        flags.append("LSF_UNKNOWN")
    agn = bool(np.isfinite(bh["dchi2"]) and bh["dchi2"] >= AGN_DCHI2_MIN and bh["flux"] > 0
               and bh["flux"] >= AGN_SNR_MIN * bh["err"])
    if agn:
        flags.append("BROAD_HBETA")
    blue = _Window(spec, z, BLUE_WINDOW, BLUE_CORE, flux=yfit)

    # ------------------------------------------------ blue bump
    b = None
    if blue.covered:
        b = _fit_blue(blue, zn, q, n_mc, rng, model, base, hbeta=hbf if star_forming else None)
        if np.isfinite(b["csnr"]) and b["csnr"] < LOW_SNR_CONTINUUM:
            flags.append("LOW_SNR")
        if b["at_bound"]:
            flags.append("FWHM_AT_BOUND")
        if b["sig"] <= -np.sqrt(DCHI2_MIN):
            flags.append("ABSORPTION_TROUGH")
    else:
        flags.append("NOT_COVERED")

    # ------------------------------------------------ red bump
    r = dict(flux=nan, err=nan, sig=nan, ew=nan, fwhm=nan)
    red_cov = False
    if red_bump:
        red = _Window(spec, z, RED_WINDOW, RED_CORE, flux=yfit)
        red_cov = red.covered
        if red_cov:
            r = _fit_red(red, zn, q, n_mc, rng, model, base, hbeta=hbf if star_forming else None)
            if _red_ok(r, RED_DCHI2_MIN):
                flags.append("RED_BUMP")
        else:
            flags.append("RED_NOT_COVERED")

    wr, reason = _decide(b, r if red_cov else None, agn, bh)
    if b is None:
        b = dict.fromkeys(("flux", "flux_err", "snr", "sig", "dchi2", "f1", "e1", "f2", "e2", "ew", "ew_err",
                           "fwhm", "fwhm_err", "dv", "cont", "csnr", "hn", "hne"), nan)
    return WRResult(
        spectrum=spec.name, z=z, wr=wr, reason=reason, covered=bool(blue.covered), flux=b["flux"],
        flux_err=b["flux_err"], snr=b["snr"], significance=b["sig"], delta_chi2=b["dchi2"], flux_niii=b["f1"],
        flux_niii_err=b["e1"], flux_heii_broad=b["f2"], flux_heii_broad_err=b["e2"], ew_rest=b["ew"],
        ew_rest_err=b["ew_err"], fwhm_kms=b["fwhm"], fwhm_kms_err=b["fwhm_err"], shift_kms=b["dv"],
        continuum=b["cont"], continuum_snr=b["csnr"], heii_narrow_flux=b["hn"], heii_narrow_flux_err=b["hne"],
        narrow_z=zn, narrow_fwhm_kms=FWHM_PER_SIGMA * max(q, 0.0), hbeta_flux=hbf, hbeta_flux_err=hbe,
        broad_hbeta_flux=bh["flux"], broad_hbeta_flux_err=bh["err"], broad_hbeta_delta_chi2=bh["dchi2"],
        broad_hbeta_fwhm_kms=bh["fwhm"], red_covered=bool(red_cov), red_flux=r["flux"], red_flux_err=r["err"],
        red_significance=r["sig"], red_ew_rest=r["ew"], red_fwhm_kms=r["fwhm"],
        method=f"mc{n_mc}" if n_mc > 1 else "covariance", flags=",".join(flags), model=model)


def _red_ok(r, dchi2_min):
    return bool(r is not None and r["sig"] >= np.sqrt(dchi2_min) and r["flux"] > 0 and r["ew"] >= EW_MIN
                and r["fwhm"] <= FWHM_MAX_KMS)


def _decide(b, r, agn, bh):
    """The WR decision rule of the module docstring: (wr, reason)."""
    if b is None:
        return False, "blue bump region (4600-4720 A rest) not covered by usable pixels"
    if not (np.isfinite(b["flux"]) and b["flux"] > 0):
        return False, "no positive bump flux"
    strong = b["dchi2"] >= DCHI2_MIN and b["snr"] >= SNR_MIN
    joint = b["dchi2"] >= JOINT_DCHI2_MIN and b["snr"] >= JOINT_SNR_MIN and _red_ok(r, JOINT_DCHI2_MIN)
    if not (strong or joint):
        return False, (f"bump not significant (delta chi2 {b['dchi2']:.1f}, need >= {DCHI2_MIN:g}; "
                       f"S/N {b['snr']:.1f}, need >= {SNR_MIN:g}; or >= {JOINT_DCHI2_MIN:g} and "
                       f"{JOINT_SNR_MIN:g} with a red bump)")
    if not b["ew"] >= EW_MIN:
        return False, (f"bump EW {b['ew']:.2f} A < {EW_MIN:g} A: within the reach of continuum systematics "
                       f"(flux calibration, stellar absorption)")
    if b["f1"] < -PART_NEG_SIGMA * b["e1"] or b["f2"] < -PART_NEG_SIGMA * b["e2"]:
        return False, (f"one bump component is negative (N III/C III {b['f1']:.3g}, broad He II {b['f2']:.3g}): "
                       f"continuum structure, not WR emission")
    if b["fwhm"] > FWHM_MAX_KMS:
        return False, f"bump too broad (FWHM {b['fwhm']:.0f} > {FWHM_MAX_KMS:g} km/s): continuum shape"
    if agn and (bh["flux"] > b["flux"] or not bh["narrow"] > 0 or bh["flux"] > AGN_NARROW_FRACTION * bh["narrow"]):
        return False, (f"broad H-beta (FWHM {bh['fwhm']:.0f} km/s, flux {bh['flux']:.3g}, bump {b['flux']:.3g}): "
                       f"AGN broad-line region, not WR stars")
    text = (f"WR blue bump at {b['sig']:.1f} sigma (delta chi2 {b['dchi2']:.1f}, S/N {b['snr']:.1f}), "
            f"FWHM {b['fwhm']:.0f} km/s, EW {b['ew']:.1f} A")
    if not strong:
        text += f", with a C IV 5808 red bump at {r['sig']:.1f} sigma"
    return True, text


def _fit_blue(win: _Window, zn, q, n_mc, rng, model, base, hbeta=None):
    """The blue bump: narrow lines fixed, two broad components searched."""
    nan = float("nan")
    win.add_fixed("HeII_4686n", win.narrow_cols(L.rest_wavelength("HeII_4686"), zn, q), nonneg=True)
    win.add_fixed("FeIII_4658", win.narrow_cols(FEIII_4658, zn, q), nonneg=True)
    win.add_fixed("ArIV_4711+HeI_4713", win.narrow_cols(ARIV_HEI_BLEND, zn, q), nonneg=True)
    win.add_fixed("ArIV_4740", win.narrow_cols(ARIV_4740, zn, q), nonneg=True)
    win.broad_rest = np.array([L.rest_wavelength("NIII_4640"), L.rest_wavelength("HeII_4686")])
    grid = _fwhm_grid(q, float(np.interp(BUMP_CENTRE * (1 + win.z), win.wave, win.lsf)))
    full, chi2_0, (dv, fw, beta, chi2) = _null_and_bump(win, grid, hbeta)
    nf = len(win.fixed)
    at_fw = _at_bound(fw, grid)
    cov, redchi = win.covariance(dv, fw, beta, chi2, free_dv=not _at_bound(dv, DV_GRID), free_fwhm=not at_fw)
    dchi2 = float(chi2_0 - chi2) / max(redchi, 1.0)
    i1, i2 = nf, nf + 1                                 # broad N III/C III 4640, broad He II 4686
    # narrow He II 4686 (held at zero or at its cap when the data pushed it beyond)
    ih = win.fixed_names.index("HeII_4686n") if "HeII_4686n" in win.fixed_names else None
    held = win.pinned.get("HeII_4686n", (0.0, None))[0]
    flux = float(beta[i1] + beta[i2])
    cvec = win.cont_vector(BUMP_CENTRE)
    cfit = float(cvec @ beta)
    cont = cfit + (0.0 if base is None else float(np.interp(BUMP_CENTRE * (1 + win.z), win.wave, base[win.idx])))
    fvec = np.zeros(cvec.size)
    fvec[[i1, i2]] = 1.0
    c_ = cov[: cvec.size, : cvec.size]
    ew, ew_err = _ew(flux, cont, float(fvec @ c_ @ fvec), float(cvec @ c_ @ cvec), float(cvec @ c_ @ fvec), win.z)
    fw_var = cov[-1, -1]
    out = dict(flux=flux, flux_err=_err(cov, [i1, i2]), dchi2=dchi2, f1=float(beta[i1]), e1=_err(cov, [i1]),
               f2=float(beta[i2]), e2=_err(cov, [i2]), fwhm=float(fw),
               fwhm_err=float(np.sqrt(fw_var)) if np.isfinite(fw_var) and fw_var >= 0 else nan,
               dv=float(dv), hn=float(beta[ih]) if ih is not None else float(held),
               hne=_err(cov, [ih]) if ih is not None else nan, ew=ew, ew_err=ew_err, cont=cont,
               at_bound=at_fw)
    tot = full[2] if base is None else full[2] + base[win.idx]
    out["csnr"] = float(np.median(np.abs(tot) / win.sig))
    if n_mc > 1:
        Y = win.y[:, None] + rng.standard_normal((win.n, n_mc)) * win.sig[:, None]
        _, fwm, bm, _ = win.search(DV_GRID, grid, Y=Y, fine=False)
        fm = bm[:, i1] + bm[:, i2]
        cm = bm @ cvec + (cont - cfit)
        out.update(flux_err=float(np.std(fm, ddof=1)), e1=float(np.std(bm[:, i1], ddof=1)),
                   e2=float(np.std(bm[:, i2], ddof=1)),
                   hne=float(np.std(bm[:, ih], ddof=1)) if ih is not None else nan,
                   fwhm_err=float(np.std(fwm, ddof=1)))
        ok = cm > 0
        if ok.sum() > 2:
            out["ew_err"] = float(np.std(fm[ok] / cm[ok], ddof=1)) / (1 + win.z)
    out["snr"] = flux / out["flux_err"] if out["flux_err"] > 0 else nan
    out["sig"] = float(np.sign(flux) * np.sqrt(max(dchi2, 0.0)))
    _store(model, "blue", win, beta, dv, fw, base)
    return out


def _fit_red(win: _Window, zn, q, n_mc, rng, model, base, hbeta=None):
    """The red bump: broad C IV 5808 beside narrow [N II] 5755, He I 5876 and Na D."""
    win.add_fixed("NII_5755", win.narrow_cols(L.rest_wavelength("NII_5755"), zn, q), nonneg=True)
    win.add_fixed("HeI_5876", win.narrow_cols(L.rest_wavelength("HeI_5876"), zn, q), nonneg=True)
    win.add_fixed("NaD", -win.narrow_cols([5891.58, 5897.56], zn, 150.0))
    c4 = L.rest_wavelength("CIV_5808")
    win.broad_rest = np.array([c4])
    grid = _fwhm_grid(q, float(np.interp(c4 * (1 + win.z), win.wave, win.lsf)))
    full, chi2_0, (dv, fw, beta, chi2) = _null_and_bump(win, grid, hbeta)
    nf = len(win.fixed)
    cov, redchi = win.covariance(dv, fw, beta, chi2, free_dv=not _at_bound(dv, DV_GRID),
                                 free_fwhm=not _at_bound(fw, grid))
    dchi2 = float(chi2_0 - chi2) / max(redchi, 1.0)
    flux, err = float(beta[nf]), _err(cov, [nf])
    if n_mc > 1:
        Y = win.y[:, None] + rng.standard_normal((win.n, n_mc)) * win.sig[:, None]
        err = float(np.std(win.search(DV_GRID, grid, Y=Y, fine=False)[2][:, nf], ddof=1))
    cvec = win.cont_vector(c4)
    cont = float(cvec @ beta) + (0.0 if base is None else float(np.interp(c4 * (1 + win.z), win.wave,
                                                                              base[win.idx])))
    _store(model, "red", win, beta, dv, fw, base)
    return dict(flux=flux, err=err, sig=float(np.sign(flux) * np.sqrt(max(dchi2, 0.0))),
                ew=float(flux / cont / (1 + win.z)) if cont > 0 else float("nan"), fwhm=float(fw))


def _null_and_bump(win, grid, hbeta):
    """χ² of the model without broad components and the best broad candidate (dv, fwhm,
    beta, χ²), the nebular lines being emission in both: fluxes >= 0 (and, for a
    star-forming host, at most NEBULAR_MAX_HBETA × Hβ).  Returns (the window's state
    before, χ²₀, best); the window keeps the column set of the best."""
    _set_caps(win, hbeta)
    full = win.state()
    (_, chi2_0), _ = win.nonneg_fit(win.solve)
    win.restore(full)
    best, _ = win.nonneg_fit(lambda: win.search(DV_GRID, grid), beta_at=2)
    return full, chi2_0, best


def _set_caps(win, hbeta):
    """Upper limits on the nebular lines of a star-forming host: NEBULAR_MAX_HBETA × the
    narrow Hβ flux ``hbeta`` (None or not positive: no limits)."""
    if hbeta is not None and np.isfinite(hbeta) and hbeta > 0:
        win.caps = {n: f * hbeta for n, f in NEBULAR_MAX_HBETA.items() if n in win.fixed_names}


def _store(model, key, win, beta, dv, fw, base):
    """Model curves on the fitted pixels, for :func:`plot_wr`."""
    B = win.base_matrix()
    nc = CONTINUUM_ORDER + 1
    nb = win.broad_rest.size
    G = win.broad(np.array([dv]), np.array([fw]))[0]
    cont = B[:, :nc] @ beta[:nc] + (0.0 if base is None else base[win.idx])
    narrow = B[:, nc:] @ beta[nc:B.shape[1]] + sum((v * col for v, col in win.pinned.values()),
                                                   np.zeros(win.n))
    model[key] = {"wave": win.wave.copy(), "continuum": cont, "narrow": narrow,
                  "broad": G @ beta[-nb:], "broad_parts": G * beta[-nb:], "z": win.z}


# ============================================================================ plot
def plot_wr(spec: AnalysisSpectrum, z: float, result: WRResult, path=None):
    """Close-up of the WR region(s), in the style of Solarz et al. (2020) Fig. 4 (bottom):
    4550–4800 Å rest (and 5700–5900 Å when the red bump was measured) with the data, the
    continuum, continuum + narrow lines, the broad bump (filled) and the total model.
    Returns a :class:`matplotlib.figure.Figure`; writes a PNG when ``path`` is given."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    z = _check(spec, z)
    panels = [("blue", (4550.0, 4800.0))]
    if "red" in result.model:
        panels.append(("red", (5700.0, 5900.0)))
    fig = Figure(figsize=(5.0 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    marks = {"blue": [("N III/C III", L.rest_wavelength("NIII_4640")), ("[Fe III]", FEIII_4658),
                      ("He II", L.rest_wavelength("HeII_4686")), ("[Ar IV]+He I", ARIV_HEI_BLEND),
                      ("[Ar IV]", ARIV_4740)],
             "red": [("[N II]", L.rest_wavelength("NII_5755")), ("C IV", L.rest_wavelength("CIV_5808")),
                     ("He I", L.rest_wavelength("HeI_5876")), ("Na D", NAD_MEAN)]}
    for ax, (key, (lo, hi)) in zip(axes, panels):
        rest = spec.wave / (1 + z)
        m = spec.good & (rest >= lo) & (rest <= hi)
        ax.step(rest[m], spec.flux[m], where="mid", color="0.3", lw=0.8, label="data")
        ax.fill_between(rest[m], spec.flux[m] - spec.sigma[m], spec.flux[m] + spec.sigma[m], step="mid",
                        color="0.8", lw=0)
        mod = result.model.get(key)
        if mod is not None:
            r = mod["wave"] / (1 + z)
            k = (r >= lo) & (r <= hi)
            c = mod["continuum"][k]
            ax.plot(r[k], c, color="tab:blue", lw=1, ls="--", label="continuum")
            ax.plot(r[k], c + mod["narrow"][k], color="tab:green", lw=1, label="continuum + narrow lines")
            ax.fill_between(r[k], c, c + mod["broad"][k], color="tab:orange", alpha=0.45,
                            label="broad WR bump" if key == "blue" else "broad C IV")
            ax.plot(r[k], c + mod["narrow"][k] + mod["broad"][k], color="tab:red", lw=1.2, label="total model")
        for lab, wl in marks[key]:
            ax.axvline(wl, color="0.6", lw=0.5, ls=":")
            ax.text(wl, 1.0, lab, transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="right",
                    fontsize=7, color="0.35")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("rest-frame vacuum wavelength (Å)")
        if key == "blue":
            ax.set_ylabel("F$_\\lambda$ (erg s$^{-1}$ cm$^{-2}$ Å$^{-1}$)")
            ttl = (f"{result.spectrum}  z={z:.4f}  WR={'yes' if result.wr else 'no'}"
                   + (f"  {result.significance:.1f}σ  FWHM {result.fwhm_kms:.0f} km/s"
                      if np.isfinite(result.significance) else "  (not covered)"))
            ax.legend(fontsize=7, loc="upper left")
        else:
            ttl = (f"C IV 5808: {result.red_significance:.1f}σ" if np.isfinite(result.red_significance)
                   else "C IV 5808")
        ax.set_title(ttl, fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
