"""Gaussian emission/absorption line fits with tied kinematics and honest errors.

The model of a fit is one vectorised function: in each wavelength window a polynomial
continuum plus pixel-integrated Gaussians (exact flux in every pixel, via the error
function), each Gaussian convolved with the instrumental line-spread function
(σ² = σ_intrinsic² + σ_LSF², in km/s).  Lines are organised in :class:`LineGroup` s; the
lines of a group share one velocity shift and one intrinsic width (tied kinematics), and
the doublets with ratios fixed by atomic physics share one flux parameter
(:data:`specred.analysis.lines.FIXED_RATIOS`).  Balmer lines can carry an underlying
stellar absorption Gaussian (centred on the emission, common width per fit).

How it is solved (variable projection, Golub & Pereyra 1973): for given shifts and widths
the model is linear in the continuum coefficients and line fluxes, so those are solved
exactly by weighted linear least squares; Levenberg-Marquardt (MINPACK, bounded as in
lmfit) optimises only the few non-linear parameters (shift and width per group), after a
coarse grid over the shift so that a line cannot lock onto its neighbour (Hα onto
[N II]).  The covariance of *all* parameters comes from the full Jacobian at the optimum
and is scaled by the reduced χ² (as lmfit does); ``mc=N`` instead repeats the fit on N
noise realisations drawn from the errors.  A line whose S/N is below ``detect_snr`` gets a
3σ upper limit from its flux error at fixed kinematics.

Results are frozen dataclasses (:class:`LineFit` per line, :class:`LineFitResult` per fit)
with ``to_row()`` / ``to_table()``.  Fluxes are in erg s⁻¹ cm⁻², equivalent widths in
rest-frame Å (positive for emission), FWHM in km/s corrected for the instrument.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import astropy.units as u
from scipy.linalg import cho_factor, cho_solve
from astropy.table import QTable, Table

from ..errors import SpectrumError
from . import lines as L
from .spectrum import C_KMS, FWHM_PER_SIGMA, AnalysisSpectrum, pixel_widths
from .stellar import StellarContinuum, fit_stellar_continuum

SQRT2 = np.sqrt(2.0)


@dataclass(frozen=True)
class LineGroup:
    """Lines fitted with one velocity shift and one intrinsic width.

    ``sigma_kms``: starting intrinsic σ; ``sigma_max_kms``: upper bound;
    ``max_shift_kms``: the shift is searched within ± this around the input redshift;
    ``absorption``: lines (Balmer) that also get an underlying absorption Gaussian.
    ``fix_shift`` / ``fix_sigma`` keep those parameters at their starting values.
    ``ratios``: extra fixed flux ratios for this group, ``((strong, weak, strong/weak), ...)``,
    on top of the atomic-physics doublets of :data:`specred.analysis.lines.FIXED_RATIOS`
    (e.g. an assumed [O II] 3729/3726 when the doublet is unresolved).
    """

    name: str
    lines: tuple
    sigma_kms: float = 100.0
    sigma_max_kms: float = 1500.0
    max_shift_kms: float = 600.0
    absorption: tuple = ()
    fix_shift: bool = False
    fix_sigma: bool = False
    shift_kms: float = 0.0
    ratios: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "lines", tuple(L.check_names(self.lines)))
        object.__setattr__(self, "absorption", tuple(L.check_names(self.absorption)))
        for t in self.ratios:
            if len(t) != 3 or not (np.isfinite(t[2]) and t[2] > 0):
                raise SpectrumError(f"group {self.name}: ratios need (strong, weak, ratio > 0), got {t!r}")
            L.check_names(t[:2])


def narrow_group(lines, name="narrow", **kw) -> LineGroup:
    return LineGroup(name, tuple(lines), **kw)


def broad_group(lines, name="broad", **kw) -> LineGroup:
    kw.setdefault("sigma_kms", 1800.0)
    kw.setdefault("sigma_max_kms", 8000.0)
    kw.setdefault("max_shift_kms", 3000.0)
    return LineGroup(name, tuple(lines), **kw)


@dataclass(frozen=True)
class LineFit:
    """The fit of one line.  Flux in erg s⁻¹ cm⁻², EW rest-frame Å (> 0 emission),
    FWHM intrinsic km/s; ``wave_obs`` in the medium of the input spectrum."""

    name: str
    group: str
    rest_vac: float
    wave_obs: float
    wave_obs_err: float
    medium: str
    z: float
    z_err: float
    flux: float
    flux_err: float
    snr: float
    detected: bool
    flux_upper_limit: float
    ew_rest: float
    ew_rest_err: float
    fwhm_kms: float
    fwhm_kms_err: float
    continuum: float
    covered: bool = True
    flags: str = ""

    def to_row(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


LINE_UNITS = {"rest_vac": u.AA, "wave_obs": u.AA, "wave_obs_err": u.AA, "flux": u.Unit("erg s-1 cm-2"),
              "flux_err": u.Unit("erg s-1 cm-2"), "flux_upper_limit": u.Unit("erg s-1 cm-2"),
              "ew_rest": u.AA, "ew_rest_err": u.AA, "fwhm_kms": u.km / u.s, "fwhm_kms_err": u.km / u.s,
              "continuum": u.Unit("erg s-1 cm-2 AA-1")}


@dataclass(frozen=True)
class LineFitResult:
    """All lines of one fit plus the fit statistics."""

    spectrum: str
    z_input: float
    lines: tuple
    groups: tuple
    group_z: dict
    group_z_err: dict
    group_sigma_kms: dict
    chi2: float
    dof: int
    redchi: float
    n_pix: int
    method: str
    absorption_sigma_kms: float = float("nan")
    flags: str = ""
    model: tuple = field(default=(), compare=False, repr=False)   # (wave_vac, model) of fitted pixels
    stellar: object = field(default=None, compare=False, repr=False)  # StellarContinuum subtracted, if any
    flux_cov: object = field(default=None, compare=False, repr=False)  # (n_lines, n_lines), order of ``lines``

    def sum_flux(self, names) -> tuple[float, float]:
        """Summed flux of ``names`` (e.g. the unresolved [O II] 3726+3729 doublet) and its
        error from the full flux covariance (the two halves of a blend anticorrelate, so
        adding their errors in quadrature would overstate it).  NaN if any is not covered."""
        idx = []
        for n in names:
            k = next((i for i, ln in enumerate(self.lines) if ln.name == n), None)
            if k is None or not self.lines[k].covered:
                return float("nan"), float("nan")
            idx.append(k)
        flux = float(sum(self.lines[k].flux for k in idx))
        if self.flux_cov is None:
            var = sum(self.lines[k].flux_err ** 2 for k in idx)
        else:
            var = float(np.sum(np.asarray(self.flux_cov)[np.ix_(idx, idx)]))
        return flux, float(np.sqrt(var)) if np.isfinite(var) and var >= 0 else float("nan")

    def __getitem__(self, name: str) -> LineFit:
        for ln in self.lines:
            if ln.name == name:
                return ln
        raise KeyError(name)

    def __contains__(self, name) -> bool:
        return any(ln.name == name for ln in self.lines)

    def to_table(self) -> QTable:
        """One row per line, quantities with units."""
        rows = [ln.to_row() for ln in self.lines]
        t = Table(rows=rows) if rows else Table(names=list(LineFit.__dataclass_fields__))
        q = QTable(t)
        for k, un in LINE_UNITS.items():
            if k in q.colnames:
                q[k] = np.asarray(t[k], float) * un
        q.meta.update({"spectrum": self.spectrum, "z_input": self.z_input, "chi2": self.chi2, "dof": self.dof,
                       "redchi": self.redchi, "method": self.method, "flags": self.flags,
                       "flux_unit": "erg s-1 cm-2", "ew": "rest frame, positive = emission",
                       "fwhm": "intrinsic (instrumental resolution removed), km/s"})
        sc = self.stellar
        q.meta["continuum"] = "local polynomial" if sc is None else "stellar population + local polynomial"
        if sc is not None:
            q.meta.update({"sigma_star_kms": sc.sigma_star_kms, "stellar_dv_kms": sc.dv_kms,
                           "stellar_age_gyr": sc.age_gyr, "stellar_redchi": sc.redchi})
        return q


# ============================================================================ the model
class _Model:
    """Design matrix of one fit; ``solve(theta)`` returns the projected residuals."""

    def __init__(self, spec: AnalysisSpectrum, z0: float, groups, *, continuum_order: int,
                 window_kms: float, edge_kms: float, wide_balmer: bool = False):
        self.spec, self.z0, self.groups = spec, float(z0), list(groups)
        self.flags: list[str] = []
        names, gidx, rest = [], [], []
        for gi, g in enumerate(self.groups):
            for n in g.lines:
                names.append(n)
                gidx.append(gi)
                rest.append(L.rest_wavelength(n))
        rest = np.array(rest, float)
        obs = rest * (1 + self.z0)
        good = spec.good
        wmin, wmax = spec.wave[good][0], spec.wave[good][-1]
        lsf = spec.lsf_sigma_at(obs)
        lsf = np.where(np.isfinite(lsf), lsf, 0.0)
        self.lsf_known = bool(np.all(np.isfinite(spec.lsf_sigma_kms)))
        sig0 = np.array([self.groups[g].sigma_kms for g in gidx])
        shift_max = np.array([self.groups[g].max_shift_kms for g in gidx])
        width_kms = np.sqrt(sig0 ** 2 + lsf ** 2)
        half = np.maximum(window_kms, 4.0 * width_kms + shift_max)
        # room for the wings of a stellar absorption trough (σ up to ~1500 km/s)
        has_abs = np.array([wide_balmer and names[i] in L.BALMER and self.groups[gidx[i]].sigma_kms < 1000
                            for i in range(len(names))], bool)
        half = np.where(has_abs, np.maximum(half, 6000.0), half)
        lo = obs * (1 - half / C_KMS)
        hi = obs * (1 + half / C_KMS)
        edge = obs * edge_kms / C_KMS + 2.0 * obs * width_kms / C_KMS
        covered = (obs - edge > wmin) & (obs + edge < wmax)
        # fraction of usable pixels within ±2 σ of the line
        for i in np.where(covered)[0]:
            s = np.abs(spec.wave - obs[i]) < 2 * obs[i] * width_kms[i] / C_KMS
            if s.sum() == 0 or spec.good[s].mean() < 0.5:
                covered[i] = False
        self.names = names
        self.covered = covered
        self.rest_all = rest
        self.gidx_all = np.array(gidx)
        keep = np.where(covered)[0]
        self.names_fit = [names[i] for i in keep]
        self.rest = rest[keep]
        self.gidx = self.gidx_all[keep]
        if keep.size == 0:
            self.n_lines = 0
            return
        self.n_lines = keep.size
        # ---- pixels: union of windows, split into segments with their own continuum
        sel = np.zeros(spec.wave.size, bool)
        for i in keep:
            sel |= (spec.wave >= lo[i]) & (spec.wave <= hi[i])
        sel &= good
        idx = np.where(sel)[0]
        w = spec.wave
        self.pix2_12 = pixel_widths(w)[idx] ** 2 / 12.0     # variance of the pixel box (full-grid edges)
        self.wave = w[idx]
        self.y = spec.flux[idx]
        self.w = 1.0 / spec.sigma[idx]
        self.lsf = np.where(np.isfinite(spec.lsf_sigma_kms[idx]), spec.lsf_sigma_kms[idx], 0.0)
        self.lsf_line = np.interp(self.rest * (1 + self.z0), self.wave, self.lsf)
        # segments: break where consecutive selected pixels are not neighbours
        brk = np.where(np.diff(idx) > 1)[0] + 1
        seg_of_pix = np.zeros(idx.size, int)
        for b in brk:
            seg_of_pix[b:] += 1
        self.n_seg = int(seg_of_pix[-1]) + 1 if idx.size else 0
        cols = []
        self.seg_of_pix = seg_of_pix
        self.seg_centre, self.seg_half = [], []
        for s in range(self.n_seg):
            m = seg_of_pix == s
            c = 0.5 * (self.wave[m][0] + self.wave[m][-1])
            h = max(0.5 * (self.wave[m][-1] - self.wave[m][0]), 1.0)
            self.seg_centre.append(c)
            self.seg_half.append(h)
            x = np.where(m, (self.wave - c) / h, 0.0)
            for k in range(continuum_order + 1):
                cols.append(np.where(m, x ** k, 0.0))
        self.n_cont = len(cols)
        self.cont_cols = np.array(cols).T if cols else np.zeros((idx.size, 0))
        # line flux parameters: tied doublets share one
        ties = L.ratio_ties(self.names_fit)
        fitted = set(self.names_fit)
        for g in self.groups:
            ties.update({weak: (strong, r) for strong, weak, r in g.ratios if strong in fitted and weak in fitted})
        self.amp_index = np.zeros(self.n_lines, int)
        self.amp_coef = np.ones(self.n_lines)
        amp_names = []
        for i, n in enumerate(self.names_fit):
            if n in ties:
                continue
            self.amp_index[i] = len(amp_names)
            amp_names.append(n)
        for i, n in enumerate(self.names_fit):
            if n in ties:
                strong, r = ties[n]
                self.amp_index[i] = amp_names.index(strong)
                self.amp_coef[i] = 1.0 / r
        self.amp_names = amp_names
        self.n_amp = len(amp_names)
        # absorption components
        absn = [i for i, n in enumerate(self.names_fit) if n in self.groups[self.gidx[i]].absorption]
        self.abs_lines = np.array(absn, int)
        self.n_abs = len(absn)
        self.n_lin = self.n_cont + self.n_amp + self.n_abs
        # non-linear parameters
        self.theta_names, self.theta0, self.lo, self.hi, self.vary = [], [], [], [], []
        for gi, g in enumerate(self.groups):
            if not np.any(self.gidx == gi):
                continue
            self.theta_names += [f"dv_{gi}", f"sig_{gi}"]
            self.theta0 += [g.shift_kms, g.sigma_kms]
            # width parameter q: sigma_total^2 = sigma_LSF^2 + q|q|.  q < 0 lets the line be
            # narrower than the nominal LSF (an LSF that is a few per cent too wide would
            # otherwise bias the fluxes high); the intrinsic sigma reported is max(q, 0).
            lsf_g = self.lsf_line[self.gidx == gi]
            self.lo += [g.shift_kms - g.max_shift_kms, -0.7 * float(np.min(lsf_g)) if lsf_g.size else 0.0]
            self.hi += [g.shift_kms + g.max_shift_kms, g.sigma_max_kms]
            self.vary += [not g.fix_shift, not g.fix_sigma]
        if self.n_abs:
            self.theta_names.append("sig_abs")
            self.theta0.append(900.0)
            # stellar Balmer troughs are broad (FWHM 20-40 Å in A/F-star light, σ ~ 600-1200
            # km/s); a narrower one would be degenerate with the emission it sits under and
            # could cancel it
            self.lo.append(600.0)
            self.hi.append(3000.0)
            self.vary.append(True)
        self.theta0 = np.array(self.theta0, float)
        self.group_slot = {int(n.split("_")[1]): k // 2 for k, n in enumerate(self.theta_names) if n.startswith("dv_")}
        if idx.size < self.n_lin + 3:
            self.flags.append("TOO_FEW_PIXELS")
        self.slots = np.array([self.group_slot[g] for g in self.gidx])
        self.amp_map = np.zeros((self.n_lines, self.n_amp))
        self.amp_map[np.arange(self.n_lines), self.amp_index] = self.amp_coef
        self.Wc = self.cont_cols * self.w[:, None]
        self.yw = self.y * self.w
        self.WcTWc = self.Wc.T @ self.Wc
        self.WcTy = self.Wc.T @ self.yw
        self._band_memo = {}          # the last single-point Gaussians, per kind (see _band)
        self._supports()

    #: Gaussians are evaluated only within this many σ of their allowed centres (exp(-K²/2)
    #: = 1e-22 of the peak: below double-precision rounding of any sum they enter)
    SUPPORT_SIGMA = 10.0

    def _supports(self):
        """The (pixel, column) pairs where a line (or absorption) Gaussian of any centre and
        width within the bounds can matter, for :meth:`_band`; None where most pairs can (a
        dense evaluation is then as cheap).  A model spans several windows far apart, so most
        Gaussians are zero on most of its pixels: this saves most of the exponentials."""
        lo, hi, th0 = np.array(self.lo, float), np.array(self.hi, float), self.theta0
        k_dv, k_q = 2 * self.slots, 2 * self.slots + 1
        mu0 = self.rest * (1 + self.z0)
        mu_lo = mu0 * (1 + np.minimum(lo[k_dv], th0[k_dv]) / C_KMS)
        mu_hi = mu0 * (1 + np.maximum(hi[k_dv], th0[k_dv]) / C_KMS)
        q = np.maximum(hi[k_q], th0[k_q])
        s_hi = mu_hi / C_KMS * np.sqrt(np.maximum(q * np.abs(q) + self.lsf_line ** 2, 1.0))
        self._support = {"lines": self._pairs(mu_lo, mu_hi, s_hi)}
        if self.n_abs:
            a = self.abs_lines
            sa = max(hi[-1], th0[-1])
            s_abs = mu_hi[a] / C_KMS * np.sqrt(sa ** 2 + self.lsf_line[a] ** 2)
            self._support["abs"] = self._pairs(mu_lo[a], mu_hi[a], s_abs)

    def _pairs(self, mu_lo, mu_hi, s_hi):
        reach = self.SUPPORT_SIGMA * np.sqrt(s_hi[None, :] ** 2 + self.pix2_12[:, None])
        w = self.wave[:, None]
        near = (w > mu_lo[None, :] - reach) & (w < mu_hi[None, :] + reach)
        if near.mean() > 0.5:
            return None
        pix, col = np.nonzero(near)
        return pix, col, pix * mu_lo.size + col, (mu_lo * (1 - 1e-9), mu_hi * (1 + 1e-9), s_hi * (1 + 1e-9))

    # ---------------------------------------------------------------- evaluation
    # Every evaluation takes theta of shape (..., n_theta): a leading batch axis evaluates a
    # grid of candidates in one vectorised pass.
    def _band(self, mu, s_aa, derivs=False, kind="lines"):
        """Unit-flux Gaussians averaged over each pixel, shape (..., n_pix, n).

        The pixel average of a Gaussian of σ is, to better than 0.1 % for σ >= 1 pixel, a
        Gaussian of σ² + Δλ²/12 sampled at the pixel centre (the variance of the box); that
        is ~10x cheaper than differences of error functions.  ``derivs``: also the
        derivatives with respect to the centre and to the total variance.  ``kind``: 'lines'
        or 'abs', whose support (:meth:`_supports`) is used when the centres and widths are
        within the bounds it was built for."""
        sup = self._support.get(kind)
        if sup is not None:
            mu_lo, mu_hi, s_hi = sup[3]             # with a 1e-9 relative margin
            if not ((mu >= mu_lo).all() and (mu <= mu_hi).all() and (s_aa <= s_hi).all()):
                sup = None
        if sup is None:
            se2 = s_aa[..., None, :] ** 2 + self.pix2_12[:, None]
            d = self.wave[:, None] - mu[..., None, :]
            g = np.exp(-0.5 * d * d / se2) / np.sqrt(2 * np.pi * se2)
            if not derivs:
                return g
            return g, g * d / se2, g * (0.5 * d * d / se2 - 0.5) / se2
        pix, col, flat = sup[:3]
        key = (kind, mu.tobytes(), s_aa.tobytes())
        memo = self._band_memo.get(kind)
        if memo is not None and memo[0] == key:
            se2, d, gp = memo[1]             # the Jacobian's point is the residual's: no new exp
        else:
            se2 = s_aa[..., col] ** 2 + self.pix2_12[pix]
            d = self.wave[pix] - mu[..., col]
            gp = np.exp(-0.5 * d * d / se2) / np.sqrt(2 * np.pi * se2)
            if mu.ndim == 1:
                self._band_memo[kind] = (key, (se2, d, gp))
        shape = mu.shape[:-1] + (self.wave.size, mu.shape[-1])

        def dense(vals):
            out = np.zeros(mu.shape[:-1] + (self.wave.size * mu.shape[-1],))
            out[..., flat] = vals
            return out.reshape(shape)

        if not derivs:
            return dense(gp)
        return dense(gp), dense(gp * d / se2), dense(gp * (0.5 * d * d / se2 - 0.5) / se2)

    def _centres(self, theta, derivs=False):
        """Observed centres and Gaussian σ (Å) of the fitted lines; ``derivs``: also dμ/ddv,
        dσ/ddv and dσ/dq."""
        th = np.asarray(theta, float)
        dv = th[..., 2 * self.slots]
        q = th[..., 2 * self.slots + 1]
        mu0 = self.rest * (1 + self.z0)
        mu = mu0 * (1 + dv / C_KMS)
        v2 = q * np.abs(q) + self.lsf_line ** 2
        root = np.sqrt(np.maximum(v2, 1.0))
        s_aa = mu / C_KMS * root
        if not derivs:
            return mu, s_aa
        dmu_ddv = mu0 / C_KMS
        ds_ddv = s_aa / mu * dmu_ddv
        ds_dq = np.where(v2 > 1.0, mu / C_KMS * np.abs(q) / root, 0.0)
        return mu, s_aa, dmu_ddv, ds_ddv, ds_dq

    def _abs_sigma(self, theta, mu):
        sa = np.asarray(theta, float)[..., -1:]
        m = mu[..., self.abs_lines]
        root = np.sqrt(sa ** 2 + self.lsf_line[self.abs_lines] ** 2)
        return m, m / C_KMS * root, m / C_KMS * sa / root

    def line_block(self, theta):
        """Columns of the line fluxes (doublets tied) and absorption components."""
        mu, s_aa = self._centres(theta)
        blk = self._band(mu, s_aa) @ self.amp_map
        if self.n_abs:
            m, sab, _ = self._abs_sigma(theta, mu)
            blk = np.concatenate([blk, -self._band(m, sab, kind="abs")], axis=-1)
        return blk

    def design(self, theta):
        return np.hstack([self.cont_cols, self.line_block(theta)])

    def _gauss_derivs(self, theta):
        """∂G/∂θ of every unit Gaussian (the lines, then the absorption components), shape
        (n_pix, n_gauss, n_theta), and the matrix mixing them into the design columns
        (n_gauss, n_amp + n_abs): analytic, exact to rounding."""
        theta = np.asarray(theta, float)
        nl, na = self.n_lines, self.n_abs
        mu, s_aa, dmu_ddv, ds_ddv, ds_dq = self._centres(theta, derivs=True)
        _, g_mu, g_v = self._band(mu, s_aa, derivs=True)
        out = np.zeros((self.wave.size, nl + na, theta.size))
        rows = np.arange(nl)
        out[:, rows, 2 * self.slots] = g_mu * dmu_ddv + g_v * 2 * s_aa * ds_ddv
        out[:, rows, 2 * self.slots + 1] = g_v * 2 * s_aa * ds_dq
        mix = np.zeros((nl + na, self.n_amp + na))
        mix[:nl, :self.n_amp] = self.amp_map
        if na:
            m, sab, dsab_dsa = self._abs_sigma(theta, mu)
            _, ga_mu, ga_v = self._band(m, sab, derivs=True, kind="abs")
            dm = dmu_ddv[self.abs_lines]
            out[:, nl + np.arange(na), 2 * self.slots[self.abs_lines]] = ga_mu * dm + ga_v * 2 * sab * (sab / m * dm)
            out[:, nl:, -1] = ga_v * 2 * sab * dsab_dsa
            mix[nl:, self.n_amp:] = -np.eye(na)
        return out, mix

    def model_derivs(self, theta, beta):
        """∂(A β)/∂θ at fixed linear parameters β, shape (n_pix, n_theta)."""
        dg, mix = self._gauss_derivs(theta)
        return np.einsum("pgk,g->pk", dg, mix @ beta[self.n_cont:])

    def solve(self, theta, y=None, jacobian=False):
        """(beta, weighted residual, Jacobian or None) for the non-linear parameters ``theta``.

        Variable projection: the linear parameters (continuum, fluxes) are solved exactly for
        each ``theta`` by normal equations scaled to unit diagonal (the columns differ by many
        orders of magnitude).  A leading batch axis on ``theta`` solves many candidates at
        once.  ``jacobian``: the exact Jacobian of the projected residual with respect to
        ``theta`` (Golub & Pereyra 1973; single theta only).  The last single-theta solution
        is remembered: the optimiser asks for the residual and then the Jacobian of one point."""
        theta = np.asarray(theta, float)
        single = theta.ndim == 1
        if single:
            key = (theta.tobytes(), None if y is None else np.asarray(y).tobytes())
            memo = getattr(self, "_memo", None)
            if memo is not None and memo[0] == key:
                if jacobian and memo[2] is None:
                    memo[2] = self._jacobian(theta, *memo[1])
                return memo[1][0], memo[1][1], (memo[2] if jacobian else None)
        Gw = self.line_block(theta) * self.w[:, None]
        yw = self.yw if y is None else y * self.w
        batch = theta.shape[:-1]
        n, nc = self.n_lin, self.n_cont
        # normal equations by blocks: the continuum block is the same for every theta
        GwT = np.swapaxes(Gw, -1, -2)
        N = np.empty(batch + (n, n))
        N[..., :nc, :nc] = self.WcTWc
        cross = self.Wc.T @ Gw
        N[..., :nc, nc:] = cross
        N[..., nc:, :nc] = np.swapaxes(cross, -1, -2)
        N[..., nc:, nc:] = GwT @ Gw
        rhs = np.empty(batch + (n,))
        rhs[..., :nc] = self.WcTy if y is None else self.Wc.T @ yw
        rhs[..., nc:] = GwT @ yw
        d = np.sqrt(np.einsum("...ii->...i", N))
        d[d == 0] = 1.0
        Ns = N / (d[..., :, None] * d[..., None, :])
        rhs /= d
        cho = None
        if single:
            # one point: its Cholesky factor also serves the Jacobian at the same point
            cho = _cholesky(Ns)
        if cho is not None:
            beta = cho_solve(cho, rhs, check_finite=False) / d
        else:
            try:
                beta = np.linalg.solve(Ns, rhs[..., None])[..., 0] / d
            except np.linalg.LinAlgError:
                beta = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in
                                 zip(Ns.reshape(-1, n, n), rhs.reshape(-1, n))]).reshape(batch + (n,)) / d
        r = yw - beta[..., :nc] @ self.Wc.T - (Gw @ beta[..., nc:, None])[..., 0]
        if not single:
            return beta, r, None
        state = (beta, r, Gw, Ns, d, cho)
        J = self._jacobian(theta, *state) if jacobian else None
        self._memo = [key, state, J]
        return beta, r, J

    def _jacobian(self, theta, beta, r, Gw, Ns, d, cho=None):
        """Golub & Pereyra (1973): dr/dθ_k = -P⊥ (∂A_k β) - (A⁺)ᵀ (∂A_k)ᵀ r, all weighted."""
        nc = self.n_cont
        Aw = np.hstack([self.Wc, Gw])
        dg, mix = self._gauss_derivs(theta)
        Dw = np.einsum("pgk,g->pk", dg, mix @ beta[nc:]) * self.w[:, None]
        v = np.zeros((self.n_lin, theta.size))
        v[nc:] = mix.T @ np.einsum("pgk,p->gk", dg, r * self.w)
        rhs = (Aw.T @ Dw - v) / d[:, None]
        if cho is not None:
            x = cho_solve(cho, rhs, check_finite=False) / d[:, None]
        else:
            x = np.linalg.lstsq(Ns, rhs, rcond=None)[0] / d[:, None]
        return Aw @ x - Dw

    def chi2_grid(self, thetas):
        r = self.solve(np.asarray(thetas, float))[1]
        return np.einsum("...i,...i->...", r, r)


# ============================================================================ fitting
def _fit_theta(model: _Model, theta0, y=None, grid=True):
    """Optimise the non-linear parameters (bounded Levenberg-Marquardt); returns theta."""
    theta = np.array(theta0, float)
    vary = np.array(model.vary, bool)
    if grid and y is None:
        # coarse grid of each group's shift: no locking onto a neighbouring line
        for gi, slot in model.group_slot.items():
            k = 2 * slot
            if not vary[k]:
                continue
            lsf = np.median(model.lsf_line[model.gidx == gi]) if np.any(model.gidx == gi) else 0.0
            step = max(0.5 * np.hypot(theta[k + 1], lsf), 20.0)
            n = int(min(61, 2 * np.ceil((model.hi[k] - model.lo[k]) / 2 / step) + 1))
            dvs = np.linspace(model.lo[k], model.hi[k], max(n, 3))
            cands = np.repeat(theta[None, :], dvs.size, axis=0)
            cands[:, k] = dvs
            theta[k] = dvs[int(np.argmin(model.chi2_grid(cands)))]
            if vary[k + 1]:
                # and its width at that shift: the optimiser then starts within a step or two
                # (not at q = 0 exactly, where dσ/dq = 0 would keep it there)
                qs = np.unique(np.clip(np.array([-0.5, 0.2, 0.5, 1.0, 2.0, 4.0]) * max(abs(theta[k + 1]), 50.0),
                                       model.lo[k + 1], model.hi[k + 1]))
                cands = np.repeat(theta[None, :], qs.size, axis=0)
                cands[:, k + 1] = qs
                theta[k + 1] = qs[int(np.argmin(model.chi2_grid(cands)))]
        if model.n_abs and vary[-1]:
            # the absorption width too: from a single start the optimiser can slide into a
            # broad trough that mimics the continuum instead of the stellar line
            sigs = np.geomspace(model.lo[-1], model.hi[-1], 9)
            cands = np.repeat(theta[None, :], sigs.size, axis=0)
            cands[:, -1] = sigs
            theta[-1] = sigs[int(np.argmin(model.chi2_grid(cands)))]
    if not np.any(vary):
        return theta
    order = np.where(vary)[0]
    # start just inside the bounds: at a bound the bounded transform has zero gradient and
    # the optimiser could never leave it
    lo, hi = np.asarray(model.lo, float), np.asarray(model.hi, float)
    inset = 0.01 * (hi - lo)
    start = np.clip(theta, lo + inset, hi - inset)

    def full(x):
        th = theta.copy()
        th[order] = x
        return th

    # tolerances: a relative χ² change of 1e-6 is ~1e-4 in absolute χ², far below the
    # Δχ² = 1 that sets the errors
    x = _bounded_leastsq(lambda x: model.solve(full(x), y)[1],
                         lambda x: model.solve(full(x), y, jacobian=True)[2][:, order],
                         start[order], lo[order], hi[order], xtol=1e-5, ftol=1e-6, max_nfev=400)
    return full(x)


class _Stop(Exception):
    """Raised inside the optimiser's callback when its evaluation budget is spent."""


def _bounded_leastsq(fun, jac, x0, lo, hi, *, xtol, ftol, max_nfev):
    """Levenberg-Marquardt (MINPACK ``lmder`` through :func:`scipy.optimize.leastsq`) within
    finite bounds by the Minuit transform x = lo + (sin u + 1)(hi − lo)/2, as lmfit's
    ``leastsq`` does (James 1994, MINUIT manual), without its per-call parameter objects:
    the fits here are small and many, and that bookkeeping cost as much as the model.
    Returns x at the optimum (the best point found when ``max_nfev`` runs out)."""
    from scipy.optimize import leastsq
    half = (hi - lo) / 2.0
    u0 = np.arcsin(np.clip((x0 - lo) / half - 1.0, -1.0, 1.0))
    best = [np.inf, np.array(x0, float)]
    nfev = [0]

    def to_x(u):
        return lo + (np.sin(u) + 1.0) * half

    def f(u):
        nfev[0] += 1
        if nfev[0] > max_nfev:
            raise _Stop
        x = to_x(u)
        r = fun(x)
        if not np.all(np.isfinite(r)):
            raise ValueError("the line model gave non-finite residuals (check the spectrum's errors)")
        c = float(r @ r)
        if c < best[0]:
            best[0], best[1] = c, x
        return r

    def df(u):
        return jac(to_x(u)) * (np.cos(u) * half)

    try:
        u = leastsq(f, u0, Dfun=df, full_output=False, col_deriv=0, ftol=ftol, xtol=xtol, gtol=0.0,
                    maxfev=2 * max_nfev, factor=100)[0]
    except _Stop:
        return best[1]
    return to_x(u)


def _cholesky(m, min_pivot=1e-6):
    """scipy's Cholesky factor of the unit-diagonal normal matrix ``m``, or None when it
    is numerically singular (a pivot below ``min_pivot``: condition number above ~1e12),
    where the callers fall back to LU / SVD."""
    try:
        c = cho_factor(m, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(c[0])) or np.min(np.abs(np.diag(c[0]))) < min_pivot:
        return None
    return c


def _normalised_inverse(m):
    d = np.sqrt(np.diag(m))
    d = np.where(d > 0, d, 1.0)
    sub = m / np.outer(d, d)
    try:
        inv = np.linalg.inv(sub)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(sub)
    return inv / np.outer(d, d)


def _covariance(model: _Model, theta, beta, A, redchi):
    """Covariance of (theta_free, beta) from the full Jacobian; scaled by redchi."""
    w = model.w
    free = []
    for k, (name, v) in enumerate(zip(model.theta_names, theta)):
        if not model.vary[k]:
            continue
        span = model.hi[k] - model.lo[k]
        at_bound = (v - model.lo[k] < 1e-3 * span) or (model.hi[k] - v < 1e-3 * span)
        if at_bound:
            continue
        free.append(k)
    D = model.model_derivs(theta, beta)
    cols = [D[:, k] * w for k in free]
    J = np.column_stack(cols + [A * w[:, None]]) if cols else A * w[:, None]
    # invert the normalised matrix (columns differ by ~1e30 in scale: km/s vs erg/s/cm2)
    JTJ = J.T @ J
    d = np.sqrt(np.diag(JTJ))
    keep = d > 0
    cov = np.full(JTJ.shape, np.nan)
    dk = d[keep]
    sub = JTJ[np.ix_(keep, keep)] / np.outer(dk, dk)
    try:
        inv = np.linalg.inv(sub)
        if not np.all(np.isfinite(inv)) or np.any(np.diag(inv) < 0):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(sub)
    inv = inv / np.outer(dk, dk)
    cov[np.ix_(keep, keep)] = inv * redchi
    return free, cov


def _prepare(spec, z, lines, groups):
    if not isinstance(spec, AnalysisSpectrum):
        raise SpectrumError("fit_lines needs an AnalysisSpectrum (use specred.analysis.load_spectrum)")
    if z is None or not np.isfinite(z) or z < -0.01:
        raise SpectrumError(f"{spec.name}: redshift must be a finite number >= 0 (got {z!r})")
    if groups is None:
        if lines is None:
            lines = L.BPT_LINES
        groups = [narrow_group(lines)]
    elif isinstance(groups, LineGroup):
        groups = [groups]
    return list(groups)


def fit_lines(spec: AnalysisSpectrum, z: float, lines=None, *, groups=None, continuum_order: int = 1,
              window_kms: float = 3000.0, edge_kms: float = 0.0, detect_snr: float = 3.0,
              mc: int = 0, seed: int | None = 0, balmer_absorption: bool | str = False,
              stellar_continuum=False, start_grid: bool = True) -> LineFitResult:
    """Fit emission lines of ``spec`` at redshift ``z``.

    ``lines``: catalogue names fitted as one narrow group (default: the BPT lines);
    or ``groups``: a list of :class:`LineGroup` (e.g. a narrow and a broad group).
    ``continuum_order``: polynomial order of the local continuum of each window.
    ``balmer_absorption``: True adds an absorption Gaussian under every Balmer line of the
    narrow groups; 'auto' keeps it only if it improves χ² by more than 11.8 (the 3σ level
    for its two extra parameters).
    ``stellar_continuum``: True fits a stellar-population continuum
    (:func:`~specred.analysis.stellar.fit_stellar_continuum`) and fits the lines on the
    spectrum minus that model (the local polynomial then only absorbs the mismatch, EWs are
    relative to stars + polynomial, and no Balmer absorption Gaussian is needed); 'auto' does
    so when the templates beat a smooth continuum significantly (absorption features seen)
    and the redshift puts the spectrum in their range; a
    :class:`~specred.analysis.stellar.StellarContinuum` is used as given.
    ``mc``: number of Monte-Carlo noise realisations for the errors (0: covariance).
    ``start_grid``: before optimising, search a coarse grid of each group's shift (and
    width) so that the optimiser cannot lock onto a neighbouring line; False starts from the
    groups' ``shift_kms``/``sigma_kms`` as given (when they come from a previous fit of the
    same lines, the grid only costs time).
    Lines outside the spectrum (or in masked gaps) are reported with ``covered=False``.
    """
    groups = _prepare(spec, z, lines, groups)
    sc = _stellar(spec, z, stellar_continuum)
    if sc is not None:
        base = np.where(np.isfinite(sc.model), sc.model, 0.0)
        sub = replace(spec, flux=spec.flux - base)
        res = _fit(sub, z, groups, continuum_order, window_kms, edge_kms, detect_snr, mc, seed, base=base,
                   start_grid=start_grid)
        return replace(res, stellar=sc)
    if balmer_absorption:
        with_abs = [replace(g, absorption=tuple(n for n in g.lines if n in L.BALMER)) if g.sigma_kms < 1000 else g
                    for g in groups]
        args = (continuum_order, window_kms, edge_kms, detect_snr)
        if balmer_absorption == "auto" and any(g.absorption for g in with_abs):
            # both models on the same pixels (windows wide enough for the absorption wings)
            plain = _fit(spec, z, groups, *args, 0, seed, wide_balmer=True, start_grid=start_grid)
            absfit = _fit(spec, z, with_abs, *args, 0, seed, wide_balmer=True, start_grid=start_grid)
            use_abs = plain.dof > 0 and plain.chi2 - absfit.chi2 > 11.8
            if mc:
                return _fit(spec, z, with_abs if use_abs else groups, *args, mc, seed, wide_balmer=True,
                            start_grid=start_grid)
            return absfit if use_abs else plain
        if balmer_absorption != "auto":
            return _fit(spec, z, with_abs, *args, mc, seed, wide_balmer=True, start_grid=start_grid)
    return _fit(spec, z, groups, continuum_order, window_kms, edge_kms, detect_snr, mc, seed, start_grid=start_grid)


def _stellar(spec, z, how):
    """The stellar continuum to subtract (None: none) for the ``stellar_continuum`` option."""
    if how is None or how is False:
        return None
    if isinstance(how, StellarContinuum):
        if how.model.shape != spec.wave.shape:
            raise SpectrumError("stellar_continuum: the model was fitted to a different spectrum")
        return how
    if how not in (True, "auto"):
        raise SpectrumError(f"stellar_continuum must be True, False, 'auto' or a StellarContinuum, not {how!r}")
    try:
        sc = fit_stellar_continuum(spec, z)
    except SpectrumError:
        if how == "auto":
            return None
        raise
    return sc if (how is True or sc.significant) else None


def _fit(spec, z, groups, continuum_order, window_kms, edge_kms, detect_snr, mc, seed,
         wide_balmer=False, base=None, start_grid=True) -> LineFitResult:
    model = _Model(spec, z, groups, continuum_order=continuum_order, window_kms=window_kms, edge_kms=edge_kms,
                   wide_balmer=wide_balmer)
    if model.n_lines == 0:
        lines = tuple(_uncovered(spec, n, groups[g].name, z) for n, g in zip(model.names, model.gidx_all))
        return LineFitResult(spec.name, float(z), lines, tuple(g.name for g in groups), {}, {}, {}, np.nan, 0,
                             np.nan, 0, "none", flags="NO_LINE_COVERED")
    if "TOO_FEW_PIXELS" in model.flags:
        raise SpectrumError(f"{spec.name}: too few usable pixels around the lines for the fit")
    theta = _fit_theta(model, model.theta0, grid=start_grid)
    beta, r, _ = model.solve(theta)
    A = model.design(theta)
    chi2 = float(r @ r)
    n_free_theta = int(np.sum(model.vary))
    dof = int(model.wave.size - model.n_lin - n_free_theta)
    redchi = chi2 / dof if dof > 0 else np.nan
    free, cov = _covariance(model, theta, beta, A, redchi if np.isfinite(redchi) else 1.0)
    nf = len(free)
    # covariance of the linear parameters alone (kinematics fixed): for upper limits
    Aw = A * model.w[:, None]
    cov_lin = _normalised_inverse(Aw.T @ Aw) * (redchi if np.isfinite(redchi) else 1.0)
    method = "covariance"
    theta_err = np.full(theta.size, np.nan)
    for j, k in enumerate(free):
        theta_err[k] = np.sqrt(cov[j, j]) if cov[j, j] >= 0 else np.nan
    beta_cov = cov[nf:, nf:]
    # where a line's own pixels fit worse than the spectrum as a whole (a profile that is
    # not quite Gaussian, a sky residual), the global χ² scaling understates its errors
    f_line, f_slot = _local_inflation(model, theta, r, redchi if np.isfinite(redchi) else 1.0)
    for slot, f in f_slot.items():
        theta_err[2 * slot:2 * slot + 2] *= f
    fb = np.ones(model.n_lin)
    for i in range(model.n_lines):
        fb[model.n_cont + model.amp_index[i]] = max(fb[model.n_cont + model.amp_index[i]], f_line[i])
    beta_cov = beta_cov * np.outer(fb, fb)
    cov_lin = cov_lin * np.outer(fb, fb)
    if mc and mc > 1:
        rng = np.random.default_rng(seed)
        sig = 1.0 / model.w
        th_s, be_s = [], []
        for _ in range(int(mc)):
            yy = model.y + rng.standard_normal(model.y.size) * sig
            t = _fit_theta(model, theta, y=yy, grid=False)
            b, _, _ = model.solve(t, yy)
            th_s.append(t)
            be_s.append(b)
        th_s, be_s = np.array(th_s), np.array(be_s)
        theta_err = np.where(np.array(model.vary), np.std(th_s, axis=0, ddof=1), np.nan)
        beta_cov = np.cov(be_s.T)
        method = f"mc{int(mc)}"
    return _collect(spec, model, groups, z, theta, theta_err, beta, beta_cov, cov_lin, A, chi2, dof,
                    redchi, method, detect_snr, base)


def _local_inflation(model: _Model, theta, r, redchi, p_tail=0.05):
    """Error inflation per line and per kinematic group from the residuals near the lines.

    For the pixels within ±2.5σ of a line (of any line of a group) the χ² is compared with
    the global reduced χ² the covariance was scaled by; where it is significantly larger
    (its χ² tail probability below ``p_tail``) the errors are scaled by sqrt(local/global).
    Returns (factor per fitted line, {group slot: factor})."""
    from scipy.special import chdtrc       # χ² survival function, as a plain ufunc
    mu, s_aa = model._centres(theta)
    near = np.abs(model.wave[:, None] - mu[None, :]) < 2.5 * s_aa[None, :]
    r2 = r * r

    def factor(pix):
        n = int(pix.sum())
        if n < 3:
            return 1.0
        c = float(r2[pix].sum())
        if chdtrc(n, c / redchi) > p_tail:
            return 1.0
        return float(np.sqrt(max(c / n / redchi, 1.0)))

    f_line = np.array([factor(near[:, i]) for i in range(model.n_lines)])
    f_slot = {slot: factor(np.any(near[:, model.gidx == gi], axis=1)) for gi, slot in model.group_slot.items()}
    return f_line, f_slot


def _uncovered(spec, name, group, z):
    rest = L.rest_wavelength(name)
    obs = float(spec.to_input_medium(rest * (1 + z)))
    nan = float("nan")
    return LineFit(name, group, rest, obs, nan, spec.medium_in, nan, nan, nan, nan, nan, False, nan, nan, nan,
                   nan, nan, nan, covered=False, flags="NOT_COVERED")


def _collect(spec, model, groups, z, theta, theta_err, beta, beta_cov, cov_lin, A, chi2, dof, redchi,
             method, detect_snr, base=None):
    nc = model.n_cont
    out = []
    group_z, group_zerr, group_sig = {}, {}, {}
    slot_err = {}
    for gi, slot in model.group_slot.items():
        dv, sig = theta[2 * slot], theta[2 * slot + 1]
        dv_err, sig_err = theta_err[2 * slot], theta_err[2 * slot + 1]
        zz = (1 + z) * (1 + dv / C_KMS) - 1
        group_z[groups[gi].name] = float(zz)
        group_zerr[groups[gi].name] = float((1 + z) * dv_err / C_KMS)
        group_sig[groups[gi].name] = float(max(sig, 0.0))
        slot_err[gi] = (dv, sig, dv_err, sig_err)
    fit_i = {n: i for i, n in enumerate(model.names_fit)}
    for n_all, g_all in zip(model.names, model.gidx_all):
        gname = groups[g_all].name
        if n_all not in fit_i:
            out.append(_uncovered(spec, n_all, gname, z))
            continue
        i = fit_i[n_all]
        dv, sig, dv_err, sig_err = slot_err[g_all]
        flags = []
        a = model.amp_index[i]
        coef = model.amp_coef[i]
        flux = float(beta[nc + a] * coef)
        fvar = beta_cov[nc + a, nc + a] * coef ** 2
        flux_err = float(np.sqrt(fvar)) if np.isfinite(fvar) and fvar >= 0 else np.nan
        flux_err_fixed = float(np.sqrt(cov_lin[nc + a, nc + a]) * coef)
        mu = model.rest[i] * (1 + z) * (1 + dv / C_KMS)
        mu_err = model.rest[i] * (1 + z) * dv_err / C_KMS
        # continuum at the line centre (its segment's polynomial) and its variance
        pix = int(np.argmin(np.abs(model.wave - mu)))
        seg = model.seg_of_pix[pix]
        order = nc // model.n_seg
        x = (mu - model.seg_centre[seg]) / model.seg_half[seg]
        vec = np.zeros(beta.size)
        vec[seg * order:(seg + 1) * order] = x ** np.arange(order)
        cont = float(vec @ beta)
        if base is not None:                     # stars subtracted before the fit
            cont += float(np.interp(mu, spec.wave, base))
        gvec = np.zeros(beta.size)
        gvec[nc + a] = coef
        cvar = float(vec @ beta_cov @ vec)
        fcv = float(vec @ beta_cov @ gvec)
        if cont > 0:
            ew_obs = flux / cont
            ew_var = ew_obs ** 2 * (fvar / flux ** 2 + cvar / cont ** 2 - 2 * fcv / (flux * cont)) if flux != 0 else fvar / cont ** 2
            ew = ew_obs / (1 + z)
            ew_err = float(np.sqrt(max(ew_var, 0.0))) / (1 + z)
        else:
            ew, ew_err = np.nan, np.nan
            flags.append("CONTINUUM_NOT_POSITIVE")
        snr = flux / flux_err if flux_err and np.isfinite(flux_err) and flux_err > 0 else np.nan
        detected = bool(np.isfinite(snr) and snr >= detect_snr)
        ul = np.nan if detected else 3.0 * flux_err_fixed
        if not model.lsf_known:
            flags.append("LSF_UNKNOWN")
        if np.isfinite(dv_err) is False and model.vary[2 * model.group_slot[g_all]]:
            flags.append("SHIFT_AT_BOUND")
        if sig <= 0:
            flags.append("UNRESOLVED")
        zz = (1 + z) * (1 + dv / C_KMS) - 1
        out.append(LineFit(
            name=n_all, group=gname, rest_vac=float(model.rest[i]),
            wave_obs=float(spec.to_input_medium(mu)), wave_obs_err=float(mu_err), medium=spec.medium_in,
            z=float(zz), z_err=float((1 + z) * dv_err / C_KMS), flux=flux, flux_err=flux_err, snr=float(snr),
            detected=detected, flux_upper_limit=float(ul), ew_rest=float(ew), ew_rest_err=float(ew_err),
            fwhm_kms=float(FWHM_PER_SIGMA * max(sig, 0.0)),
            fwhm_kms_err=float(FWHM_PER_SIGMA * sig_err) if sig > 0 else float("nan"),
            continuum=cont, covered=True, flags=",".join(flags)))
    abs_sig = float(theta[-1]) if model.n_abs else float("nan")
    # flux covariance in the order of ``out`` (tied doublets share one parameter)
    k_of = np.array([nc + model.amp_index[fit_i[ln.name]] if ln.name in fit_i else -1 for ln in out])
    c_of = np.array([model.amp_coef[fit_i[ln.name]] if ln.name in fit_i else np.nan for ln in out])
    flux_cov = np.where(np.outer(k_of >= 0, k_of >= 0), beta_cov[np.ix_(k_of, k_of)] * np.outer(c_of, c_of), np.nan)
    return LineFitResult(spec.name, float(z), tuple(out), tuple(g.name for g in groups), group_z, group_zerr,
                         group_sig, chi2, dof, float(redchi), int(model.wave.size), method, abs_sig,
                         ",".join(model.flags),
                         (model.wave.copy(), A @ beta + (0.0 if base is None else np.interp(model.wave, spec.wave, base))),
                         flux_cov=flux_cov)
