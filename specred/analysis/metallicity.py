"""Gas-phase oxygen abundance from the R23 strong-line method (Pilyugin & Thuan 2005).

Following Solarz et al. (2020, Sect. 4, eqs. 1–3):

* R23 = ([O II] 3727 + [O III] 4959 + [O III] 5007) / Hβ  (Pagel et al. 1979; PT05 eq. 2:
  R23 = R2 + R3 with R2 = I([O II] 3727+3729)/I(Hβ), R3 = I([O III] 4959+5007)/I(Hβ));
* excitation parameter P = ([O III] 4959 + [O III] 5007) / Hβ / R23 = R3 / R23
  (Pilyugin 2000/2001; PT05);
* upper branch, valid for 12+log(O/H) > 8.25 (Pilyugin & Thuan 2005, ApJ 631, 231, eq. 22)::

      12+log(O/H) = (R23 + 726.1 + 842.2 P + 337.5 P²) / (85.96 + 82.76 P + 43.98 P² + 1.793 R23)

* lower branch, valid for 12+log(O/H) < 8.0 (PT05 eq. 24)::

      12+log(O/H) = (R23 + 106.4 + 106.8 P − 3.40 P²) / (17.72 + 6.60 P + 6.95 P² − 0.302 R23)

  (the same coefficients as Solarz et al. 2020, eqs. 2 and 3);
* the branch is chosen with log([N II] 6584 / [O II] 3727) (dereddened): upper at or above
  the bifurcation −1.2, lower below it (Kewley & Ellison 2008, ApJ 681, 1183, as used by
  Solarz et al. 2020).

Reddening: E(B−V) from the Balmer decrement, E(B−V) = 2.5 / (k(Hβ) − k(Hα)) ·
log10[(Hα/Hβ)_obs / 2.86] (case B, T = 10⁴ K, Osterbrock & Ferland 2006), with k(λ) the
CCM89/O'Donnell (1994) curve of :func:`specred.dust.ccm89_k`, R_V = 3.1; a line ratio is
corrected as I1/I2 = F1/F2 · 10^{0.4 E(B−V) [k(λ1) − k(λ2)]}.  A negative E(B−V) (Hα/Hβ
below 2.86, from noise or Balmer absorption) is clipped to 0 — no correction rather than an
unphysical "de-correction" — and flagged ``EBV_CLIPPED``.  Wavelengths are the vacuum rest
wavelengths of :func:`specred.analysis.lines.rest_wavelength`; [O II] 3727 uses the mean of
the 3726 and 3729 components (the k difference across the doublet is < 0.01).

Errors: a Monte Carlo over the flux errors (independent Gaussians, the Balmer decrement and
hence E(B−V) redrawn each time, clipped at 0 per draw).  Draws in which a detected line
comes out non-positive are discarded (flag ``MC_NONPOSITIVE`` when more than 1 % are).
``oh12_err`` is half the 16–84 % range of the draws evaluated on the chosen branch; the
fraction of draws whose log([N II]/[O II]) falls on the other side of the bifurcation is
``frac_other_branch`` (``BRANCH_UNCERTAIN`` when > 16 %).

Input handling (documented contract of :func:`oxygen_abundance`):

* malformed input (unknown key, non-finite flux, detected flux <= 0, bad error) raises
  :class:`~specred.errors.SpectrumError`;
* a missing or undetected line needed by R23 gives a result with ``oh12 = NaN`` and a flag
  (``NO_HBETA``, ``HB_UNDETECTED``, ``NO_OII``, ``OII_UNDETECTED``, ``NO_OIII``,
  ``OIII_UNDETECTED``) — as in the paper, no Hβ means no metallicity;
* [O III] 4959 missing or undetected: I(4959) = I(5007)/2.98 on the dereddened intensities
  (Storey & Zeippen 2000), flag ``OIII_4959_FROM_5007``;
* Hα missing or undetected: no reddening correction, flag ``NO_REDDENING``;
* [N II] 6584 missing: upper branch by default, flag ``NO_NII``; undetected: the ratio is an
  upper limit (flag ``NII_UPPER_LIMIT``); below the bifurcation it selects the lower branch,
  otherwise the upper branch is taken by default with ``BRANCH_UNCERTAIN``;
* ``TRANSITION_ZONE``: 8.0 <= oh12 <= 8.25, between the validity ranges of the two branches;
  ``BRANCH_INCONSISTENT``: the chosen branch gives a value outside even that zone's far side
  (upper branch < 8.0 or lower branch > 8.25).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dust import BALMER_HA_HB, ccm89_k
from ..errors import SpectrumError
from .bpt import LineFlux, check_n_mc, validate_fluxes
from .lines import FIXED_RATIOS, rest_wavelength

__all__ = ["Metallicity", "balmer_ebv", "deredden_ratio", "pt05_upper", "pt05_lower", "r23_branch",
           "oxygen_abundance", "line_wavelength", "BIFURCATION", "UPPER_VALID", "LOWER_VALID"]

#: log([N II]/[O II]) where the R23 branches separate (Kewley & Ellison 2008)
BIFURCATION = -1.2
#: validity of the PT05 branches: upper for 12+log(O/H) > 8.25, lower for < 8.0
UPPER_VALID = 8.25
LOWER_VALID = 8.0
#: [O III] 5007/4959 (Storey & Zeippen 2000, via specred.analysis.lines)
OIII_RATIO = FIXED_RATIOS[("OIII_5007", "OIII_4959")]
#: MC fraction across the bifurcation above which the branch is flagged uncertain (1σ tail)
BRANCH_TAIL = 0.16


def line_wavelength(name: str) -> float:
    """Vacuum rest wavelength (Å) of a flux key; 'OII_3727' is the mean of the doublet, 'SII' of 6717/6731."""
    if name == "OII_3727":
        return 0.5 * (rest_wavelength("OII_3726") + rest_wavelength("OII_3729"))
    if name == "SII":
        return 0.5 * (rest_wavelength("SII_6717") + rest_wavelength("SII_6731"))
    return rest_wavelength(name)


def _wave(w) -> float:
    return line_wavelength(w) if isinstance(w, str) else float(w)


def _out(v):
    v = np.asarray(v, dtype=float)
    return float(v) if v.ndim == 0 else v


def _balmer_k(r_v: float) -> tuple[float, float]:
    k_hb, k_ha = ccm89_k(np.array([line_wavelength("Hbeta"), line_wavelength("Halpha")]), r_v)
    return float(k_hb), float(k_ha)


def balmer_ebv(ha, hb, ha_err=None, hb_err=None, *, intrinsic: float = BALMER_HA_HB, r_v: float = 3.1):
    """E(B−V) from the Balmer decrement, with its error: ``(ebv, ebv_err, clipped)``.

    E(B−V) = 2.5 / (k(Hβ) − k(Hα)) · log10[(Hα/Hβ) / intrinsic], k = CCM89/O'Donnell 1994
    (:func:`specred.dust.ccm89_k`), intrinsic Hα/Hβ = 2.86 (case B, Osterbrock & Ferland
    2006).  ``ha``/``hb``: fluxes (scalars or arrays) or :class:`~specred.analysis.bpt.LineFlux`
    (their errors are then used).  The error is the first-order propagation
    2.5/(k(Hβ) − k(Hα))/ln10 · sqrt((σ_Hα/Hα)² + (σ_Hβ/Hβ)²) (NaN without errors).
    Negative E(B−V) is clipped to 0 and ``clipped`` is True there (the error is kept: it
    says how far from 0 the measurement may be).  Raises SpectrumError for non-positive
    fluxes or upper limits."""
    def unpack(v, e, name):
        if isinstance(v, LineFlux):
            if v.upper_limit:
                raise SpectrumError(f"balmer_ebv: {name} is an upper limit; E(B-V) needs detected Balmer lines")
            return np.asarray(v.flux, float), np.asarray(v.err if e is None else e, float)
        return np.asarray(v, float), np.asarray(np.nan if e is None else e, float)
    ha, ha_err = unpack(ha, ha_err, "Halpha")
    hb, hb_err = unpack(hb, hb_err, "Hbeta")
    if np.any(~np.isfinite(ha)) or np.any(~np.isfinite(hb)) or np.any(ha <= 0) or np.any(hb <= 0):
        raise SpectrumError("balmer_ebv: Hα and Hβ fluxes must be finite and > 0")
    k_hb, k_ha = _balmer_k(r_v)
    coef = 2.5 / (k_hb - k_ha)
    raw = coef * np.log10(ha / hb / intrinsic)
    err = coef / np.log(10.0) * np.hypot(ha_err / ha, hb_err / hb)
    clipped = raw < 0
    ebv = np.where(clipped, 0.0, raw)
    if ebv.ndim == 0:
        return float(ebv), float(err), bool(clipped)
    return ebv, err, clipped


def deredden_ratio(ratio, num, den, ebv, *, r_v: float = 3.1):
    """Reddening-corrected line ratio I(num)/I(den) = ratio · 10^{0.4 E(B−V) [k(num) − k(den)]}.

    ``num``/``den``: flux keys / line names (e.g. 'NII_6584', 'OII_3727') or wavelengths in
    Å (vacuum); k from :func:`specred.dust.ccm89_k` (CCM89 with O'Donnell 1994).  Negative
    E(B−V) is clipped to 0 (no correction) — :func:`balmer_ebv` reports when that happens."""
    k1, k2 = ccm89_k(np.array([_wave(num), _wave(den)]), r_v)
    e = np.clip(np.asarray(ebv, dtype=float), 0.0, None)
    return _out(np.asarray(ratio, dtype=float) * 10.0 ** (0.4 * e * (k1 - k2)))


def pt05_upper(r23, p):
    """Upper-branch 12+log(O/H) of Pilyugin & Thuan (2005, ApJ 631, 231, eq. 22), valid > 8.25:
    (R23 + 726.1 + 842.2 P + 337.5 P²) / (85.96 + 82.76 P + 43.98 P² + 1.793 R23); R23 linear.
    Also Solarz et al. (2020) eq. 2.  Vectorised."""
    r = np.asarray(r23, dtype=float)
    q = np.asarray(p, dtype=float)
    num = 726.1 + q * (842.2 + 337.5 * q) + r
    den = 85.96 + q * (82.76 + 43.98 * q) + 1.793 * r
    return _out(num / den)


def pt05_lower(r23, p):
    """Lower-branch 12+log(O/H) of Pilyugin & Thuan (2005, eq. 24), valid < 8.0:
    (R23 + 106.4 + 106.8 P − 3.40 P²) / (17.72 + 6.60 P + 6.95 P² − 0.302 R23).
    Also Solarz et al. (2020) eq. 3.  Vectorised."""
    r = np.asarray(r23, dtype=float)
    q = np.asarray(p, dtype=float)
    num = 106.4 + q * (106.8 - 3.40 * q) + r
    den = 17.72 + q * (6.60 + 6.95 * q) - 0.302 * r
    return _out(num / den)


def r23_branch(log_nii_oii, bifurcation: float = BIFURCATION):
    """'upper' where log([N II] 6584/[O II] 3727) >= bifurcation, 'lower' below, 'unknown' for NaN
    (Kewley & Ellison 2008).  A string for a scalar, an object array otherwise."""
    v = np.asarray(log_nii_oii, dtype=float)
    out = np.where(np.isnan(v), "unknown", np.where(v >= bifurcation, "upper", "lower")).astype(object)
    return str(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class Metallicity:
    """12+log(O/H) of one object (rules in the module docstring).

    ``ebv``/``ebv_err``: Balmer-decrement E(B−V) (clipped at 0; NaN without Hα);
    ``r23``, ``p``: dereddened R23 and excitation P (``*_err`` from the MC);
    ``log_nii_oii``: dereddened log([N II] 6584/[O II] 3727) (an upper limit with
    NII_UPPER_LIMIT); ``oh12``/``oh12_err``: abundance on ``branch`` ('upper'/'lower');
    ``frac_other_branch``: MC fraction of draws across the bifurcation; ``flags``: tuple of
    flag names; ``reason``: a sentence on how the value was obtained or why it is NaN."""

    oh12: float
    oh12_err: float
    branch: str
    r23: float
    r23_err: float
    p: float
    p_err: float
    log_nii_oii: float
    log_nii_oii_err: float
    ebv: float
    ebv_err: float
    frac_other_branch: float
    flags: tuple = ()
    reason: str = ""
    n_mc: int = 0
    n_valid: int = 0

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.oh12))

    def to_row(self) -> dict:
        """Flat row: oh12, oh12_err, oh12_branch, oh12_frac_other_branch, r23, r23_err,
        p_excitation, p_excitation_err, log_nii_oii, log_nii_oii_err, ebv, ebv_err,
        oh12_flags (comma-separated) and oh12_reason."""
        return {"oh12": self.oh12, "oh12_err": self.oh12_err, "oh12_branch": self.branch,
                "oh12_frac_other_branch": self.frac_other_branch, "r23": self.r23, "r23_err": self.r23_err,
                "p_excitation": self.p, "p_excitation_err": self.p_err, "log_nii_oii": self.log_nii_oii,
                "log_nii_oii_err": self.log_nii_oii_err, "ebv": self.ebv, "ebv_err": self.ebv_err,
                "oh12_flags": ",".join(self.flags), "oh12_reason": self.reason}


def _compute(F: dict, use_red: bool, r_v: float, intrinsic: float) -> dict:
    """Vectorised core: ebv (raw and clipped), dereddened R23, P, log([N II]/[O II]), both branches."""
    hb = F["Hbeta"]
    out = {}
    if use_red:
        k_hb, k_ha = _balmer_k(r_v)
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = 2.5 / (k_hb - k_ha) * np.log10(F["Halpha"] / hb / intrinsic)
        ebv = np.clip(raw, 0.0, None)
    else:
        raw = ebv = np.zeros_like(hb)
    out["ebv_raw"], out["ebv"] = raw, ebv

    def corr(key):                          # dereddened flux relative to Hβ
        k1, k2 = ccm89_k(np.array([line_wavelength(key), line_wavelength("Hbeta")]), r_v)
        return F[key] / hb * 10.0 ** (0.4 * ebv * (k1 - k2))
    if "OII_3727" in F and "OIII_5007" in F:
        r2 = corr("OII_3727")
        r5007 = corr("OIII_5007")
        # without 4959: the intrinsic (dereddened) ratio is fixed, I(4959) = I(5007)/2.98
        r3 = r5007 + (corr("OIII_4959") if "OIII_4959" in F else r5007 / OIII_RATIO)
        out["r23"] = r2 + r3
        out["p"] = r3 / out["r23"]
        out["upper"] = np.asarray(pt05_upper(out["r23"], out["p"]), dtype=float)
        out["lower"] = np.asarray(pt05_lower(out["r23"], out["p"]), dtype=float)
    if "OII_3727" in F and "NII_6584" in F:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["log_nii_oii"] = np.log10(corr("NII_6584") / corr("OII_3727"))
    return out


def _half_range(v) -> float:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return float("nan")
    p16, p84 = np.percentile(v, [15.865, 84.135])
    return float(0.5 * (p84 - p16))


def oxygen_abundance(fluxes, n_mc: int = 1000, seed: int = 0, bifurcation: float = BIFURCATION, *,
                     r_v: float = 3.1, intrinsic: float = BALMER_HA_HB) -> Metallicity:
    """12+log(O/H) from R23 with the Pilyugin & Thuan (2005) calibrations (module docstring).

    ``fluxes``: {key: LineFlux} (observed, not dereddened) as from
    :func:`specred.analysis.bpt.line_fluxes_from_fit`; needs 'Hbeta', 'OIII_5007',
    'OII_3727' (and uses 'OIII_4959', 'Halpha', 'NII_6584').  ``n_mc`` Monte-Carlo draws
    (0: no errors), ``seed``, ``bifurcation`` in log([N II]/[O II]).  Malformed input raises
    SpectrumError; missing/undetected lines give a flagged NaN result (see the module
    docstring)."""
    fl = validate_fluxes(fluxes)
    n_mc = check_n_mc(n_mc)
    if not np.isfinite(bifurcation):
        raise SpectrumError(f"bifurcation must be a finite log([N II]/[O II]), got {bifurcation}")
    flags: list[str] = []
    notes: list[str] = []
    nan = float("nan")

    def usable(key, missing_flag, ul_flag):
        if key not in fl:
            flags.append(missing_flag)
            return False
        if fl[key].upper_limit:
            flags.append(ul_flag)
            return False
        return True

    ok_hb = usable("Hbeta", "NO_HBETA", "HB_UNDETECTED")
    ok_oii = usable("OII_3727", "NO_OII", "OII_UNDETECTED")
    ok_o3 = usable("OIII_5007", "NO_OIII", "OIII_UNDETECTED")
    use_red = ok_hb and "Halpha" in fl and not fl["Halpha"].upper_limit
    if not use_red:
        flags.append("NO_REDDENING")
        if "Halpha" not in fl:
            why = "Hα missing"
        elif fl["Halpha"].upper_limit:
            why = "Hα undetected"
        else:
            why = "no usable Hβ"
        notes.append(f"no reddening correction ({why})")

    # central values and draws of the lines in use
    lines = {}
    for key in ("Hbeta", "OIII_5007", "OIII_4959", "OII_3727", "Halpha", "NII_6584"):
        if key in fl and (not fl[key].upper_limit or key == "NII_6584"):
            lines[key] = fl[key]
    if ok_o3 and ("OIII_4959" not in lines):
        flags.append("OIII_4959_FROM_5007")
        notes.append(f"[O III] 4959 = 5007/{OIII_RATIO}")
    nii_ul = "NII_6584" in lines and lines["NII_6584"].upper_limit

    ebv = ebv_err = nan
    if use_red:
        ebv, ebv_err, clipped = balmer_ebv(fl["Halpha"], fl["Hbeta"], intrinsic=intrinsic, r_v=r_v)
        if clipped:
            flags.append("EBV_CLIPPED")
            notes.append("Hα/Hβ below the case-B 2.86: E(B-V) clipped to 0")
    if not ok_hb:
        reason = "Hβ " + ("missing" if "Hbeta" not in fl else "undetected") + ": R23 needs Hβ, no abundance"
        return Metallicity(nan, nan, "", nan, nan, nan, nan, nan, nan, nan, nan, nan, tuple(flags), reason,
                           n_mc, 0)

    nominal = _compute({k: np.array([v.flux]) for k, v in lines.items()}, use_red, r_v, intrinsic)
    log_no = float(nominal["log_nii_oii"][0]) if "log_nii_oii" in nominal else nan

    # branch
    branch_notes = []
    if "NII_6584" not in lines:
        flags.append("NO_NII")
        branch = "upper"
        branch_notes.append("[N II] 6584 missing: upper branch assumed")
    elif not ok_oii:
        branch = "upper"
        branch_notes.append("[O II] unusable: branch cannot be tested, upper assumed")
    elif nii_ul:
        flags.append("NII_UPPER_LIMIT")
        if log_no < bifurcation:
            branch = "lower"
            branch_notes.append(f"log([N II]/[O II]) < {log_no:.2f} (upper limit) is below {bifurcation}: lower branch")
        else:
            branch = "upper"
            flags.append("BRANCH_UNCERTAIN")
            branch_notes.append(f"log([N II]/[O II]) < {log_no:.2f} (upper limit) does not decide the branch: "
                                "upper assumed")
    else:
        branch = str(r23_branch(log_no, bifurcation))
        branch_notes.append(f"log([N II]/[O II]) = {log_no:.2f} {'>=' if branch == 'upper' else '<'} "
                            f"{bifurcation}: {branch} branch")

    r23 = float(nominal["r23"][0]) if "r23" in nominal else nan
    p = float(nominal["p"][0]) if "p" in nominal else nan
    oh12 = float(nominal[branch][0]) if (ok_oii and ok_o3) else nan

    # Monte Carlo
    oh12_err = r23_err = p_err = log_no_err = frac_other = nan
    n_valid = 0
    if n_mc > 0:
        rng = np.random.default_rng(seed)
        draws = {}
        for key in ("Hbeta", "OIII_5007", "OIII_4959", "OII_3727", "Halpha", "NII_6584"):
            z = rng.standard_normal(n_mc)   # fixed order: draws independent of the lines present
            if key in lines:
                lf = lines[key]
                draws[key] = np.full(n_mc, lf.flux) if lf.upper_limit else lf.flux + max(lf.err, 0.0) * z
        good = np.all([v > 0 for v in draws.values()], axis=0)
        n_valid = int(good.sum())
        if n_valid < 0.99 * n_mc:
            flags.append("MC_NONPOSITIVE")
            notes.append(f"{n_mc - n_valid} of {n_mc} MC draws had a non-positive flux and were dropped")
        mc = _compute({k: v[good] for k, v in draws.items()}, use_red, r_v, intrinsic)
        if "r23" in mc:
            r23_err, p_err = _half_range(mc["r23"]), _half_range(mc["p"])
            if ok_oii and ok_o3:
                oh12_err = _half_range(mc[branch])
        if "log_nii_oii" in mc:
            lno = mc["log_nii_oii"]
            if not nii_ul:
                log_no_err = _half_range(lno)
            if ok_oii and n_valid:
                frac_other = float(np.mean(lno < bifurcation) if branch == "upper" else np.mean(lno >= bifurcation))
                if nii_ul and branch == "upper":
                    frac_other = nan        # the limit does not locate the draws
                if np.isfinite(frac_other) and frac_other > BRANCH_TAIL and "BRANCH_UNCERTAIN" not in flags:
                    flags.append("BRANCH_UNCERTAIN")
                    branch_notes.append(f"{100 * frac_other:.0f}% of MC draws fall on the other branch")

    if not (ok_oii and ok_o3):
        missing = [f for f in flags if f in ("NO_OII", "OII_UNDETECTED", "NO_OIII", "OIII_UNDETECTED")]
        reason = "no abundance: " + ", ".join(missing) + " (R23 needs [O II] 3727 and [O III] 5007 detected)"
        return Metallicity(nan, nan, "", r23, r23_err, p, p_err, log_no, log_no_err, ebv, ebv_err, nan,
                           tuple(flags), reason + ("; " + "; ".join(notes) if notes else ""), n_mc, n_valid)

    if LOWER_VALID <= oh12 <= UPPER_VALID:
        flags.append("TRANSITION_ZONE")
        notes.append(f"{oh12:.2f} lies between the validity ranges of the branches (8.0-8.25)")
    elif (branch == "upper" and oh12 < LOWER_VALID) or (branch == "lower" and oh12 > UPPER_VALID):
        flags.append("BRANCH_INCONSISTENT")
        notes.append(f"the {branch} branch gives {oh12:.2f}, outside its validity range")
    reason = (f"PT05 {branch} branch (eq. {22 if branch == 'upper' else 24}): R23 = {r23:.2f}, P = {p:.2f}"
              + (f", E(B-V) = {ebv:.2f}" if np.isfinite(ebv) else "") + "; " + "; ".join(branch_notes)
              + ("; " + "; ".join(notes) if notes else ""))
    return Metallicity(oh12, oh12_err, branch, r23, r23_err, p, p_err, log_no, log_no_err, ebv, ebv_err,
                       frac_other, tuple(flags), reason, n_mc, n_valid)
