"""Object classes from the measurements, one spectrum or a whole list, with the reason.

:func:`classify_spectrum` measures one 1D spectrum — automatic redshift
(:func:`~specred.analysis.find_redshift`), the narrow lines
(:func:`~specred.analysis.fit_lines`), the BPT diagrams (:mod:`.bpt`), the R23 abundance
(:mod:`.metallicity`), the Wolf-Rayet bump (:mod:`.wr`) and, for QSOs, the BAL troughs
(:mod:`.bal`) — and decides a class by this documented logic (Solarz et al. 2020, Sect. 3):

1. no redshift (no feature above the noise), or a redshift of quality 'low' (no single
   feature confirms it) in a spectrum of median S/N per pixel below ``min_snr`` = 5 ->
   ``unknown`` (the paper's "low signal-to-noise or featureless"); a redshift with
   |cz| < 300 km/s -> ``star`` (a Galactic source, like the paper's YSO); a near-IR spectrum
   (S/N >= ``min_snr``) whose redshift no single feature confirms and whose continuum is a
   dust-reddened photosphere plus hot dust (:mod:`.dusty`: F_λ rising as λ^β, β >= 2,
   steepest at the blue end) -> ``star`` with flag ``DUSTY_CONTINUUM`` (the paper's YSO
   J155603.92 has Paschen lines at ~2σ only; it was identified by its Gaia counterpart);
2. broad permitted lines (the redshift's QSO template wins, or the absorption template
   won with features as broad as it allows while the QSO template alone finds >= 2 broad
   lines at quality 'good': BAL troughs mimicking Ca II H&K, flag
   ``BROAD_TROUGHS_NOT_STELLAR``) -> ``QSO``; ``LoBAL QSO`` when Mg II or Al III troughs
   qualify, ``BAL QSO`` when only C IV / Si IV do; ``FE_RICH`` flag
   when the optical Fe II 4434–4684 Å to broad Hβ flux ratio R_FeII exceeds 1 (Boroson &
   Green 1992 eigenvector 1; typical QSOs have 0.2–0.6) or, where Hβ is out of the
   spectrum, when the UV Fe II 2200–3090 Å to Mg II ratio exceeds three times that of a
   typical (SDSS-composite) QSO;
3. absorption features (the absorption template wins, or its score at the same redshift is
   significant while the rest-frame Hα EW is below ``passive_ew_ha`` = 6 Å, the weak-line
   regime of retired/passive galaxies, Cid Fernandes et al. 2011) -> passive: ``S0`` when Hα
   (+[N II], comparable in early types) emission is detected at 3σ, ``E`` otherwise, as the
   paper does;
4. narrow emission lines -> the BPT class (``SF``, ``composite``, ``Seyfert 2``, ``LINER``,
   ``ambiguous``); when the diagrams cannot decide (lines missing or only limits),
   log([N II]/Hα) < -0.4 alone gives ``SF`` (Stasińska et al. 2006), otherwise
   ``emission-line galaxy`` — unless the emission redshift is of quality 'low' and rests
   on at most one weak feature (flag ``EMISSION_UNCONFIRMED``: one 3σ bump is what noise
   gives somewhere in a search over all z); then the absorption template at that redshift
   (±0.003(1+z)) or, failing that, anywhere, when its score reaches the redshift search's
   ``min_score`` (15), makes a passive galaxy as in 3., and otherwise the class is
   ``unknown``;
5. the ``WR`` flag (and ``wr_bump`` column) for galaxies with a Wolf-Rayet bump;
   metallicities for SF and composite galaxies.

Every decision is written to ``class_reason``; every failure (unreadable file, no flux
units, a measurement that raised) becomes a flag, never an exception, so a batch goes on.

:func:`classify_spectra` runs the list in parallel over processes, matches each spectrum to
a target list by position (or OBJECT name), combines the redshifts of the EFOSC2 and SofI
spectra of one target, and returns an astropy Table (one row per spectrum).
"""
from __future__ import annotations

import logging
import time
import warnings
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..errors import SpecredError
from . import lines as L
from .bpt import classify_bpt, line_fluxes_from_fit
from .fitting import fit_lines
from .metallicity import oxygen_abundance
from .redshift import ABSORPTION_SIGMA_MAX_KMS, QSO_COMPONENTS, find_redshift
from .spectrum import C_KMS, load_spectrum
from .wr import measure_wr_bump

log = logging.getLogger("specred")

#: the narrow lines measured for the BPT diagrams, the abundance and the classes
CLASS_LINES = ("OII_3726", "OII_3729", "NeIII_3869", "Hbeta", "OIII_4959", "OIII_5007", "OI_6300",
               "NII_6548", "Halpha", "NII_6584", "SII_6717", "SII_6731")
BPT_CLASS_NAMES = {"SF": "SF", "composite": "composite", "Seyfert": "Seyfert 2", "LINER": "LINER",
                   "AGN": "Seyfert 2", "ambiguous": "ambiguous"}
#: the paper's (Solarz et al. 2020, Table 2) class names -> ours, for comparisons
PAPER_CLASS = {"Broadline QSO": "QSO", "BAL QSO": "BAL", "Fe rich QSO": "QSO", "Seyfert 2": "Seyfert 2",
               "SF": "SF", "S0": "S0", "E": "E", "YSO": "star", "Unknown": "unknown"}

#: an emission redshift of quality 'low' resting on at most this many weak features, with no
#: BPT class, is unconfirmed (rule 4 of the module docstring)
UNCONFIRMED_MAX_FEATURES = 1
#: the absorption template's score (summed Δχ², :func:`~specred.analysis.find_redshift`)
#: that replaces an unconfirmed emission redshift: its ``min_score``, the level any redshift
#: must reach
ABSORPTION_FALLBACK_SCORE = 15.0
#: an absorption redshift within this × (1 + z) of another is the same redshift
ABSORPTION_MATCH_DZ = 0.003

#: UV Fe II / Mg II index (this module's windows) of a typical QSO: the median over 67
#: simulated QSOs (S/N >= 10) whose Fe II blends and Mg II carry the SDSS-composite
#: equivalent widths (Vanden Berk et al. 2001): 1.16 (16-84 %: 0.81-1.56); ten simulated
#: Fe-rich QSOs (Fe II x3) gave 4.5-11.7.  To be checked on real Fe-rich QSOs.
FE_UV_TYPICAL = 1.16

COLUMNS = ("target_id", "file", "instrument", "ra", "dec", "z", "z_err", "z_quality", "template", "n_lines",
           "lines", "class", "class_reason", "bpt_nii", "bpt_sii", "bpt_oi", "bpt_class", "bpt_prob",
           "log_nii_ha", "log_oiii_hb", "log_sii_ha", "log_oi_ha", "log_nii_oii", "oh12", "oh12_err",
           "r23_branch", "ebv", "wr_bump", "wr_significance", "wr_flux", "bal", "lobal", "balnicity_index",
           "balnicity_index_err", "absorption_index", "absorption_index_err", "fe_ratio", "snr", "seconds",
           "flags")


@dataclass(frozen=True)
class Classification:
    """The class of one spectrum with everything it rests on.  ``cls`` is the class name
    (``class`` in tables); ``redshift``, ``lines``, ``bpt``, ``metallicity``, ``wr`` and
    ``bal`` hold the full measurement objects (None where not measured)."""

    file: str
    cls: str
    class_reason: str
    z: float = float("nan")
    z_err: float = float("nan")
    snr: float = float("nan")
    flags: tuple = ()
    target_id: str = ""
    instrument: str = ""
    ra: float = float("nan")
    dec: float = float("nan")
    fe_ratio: float = float("nan")
    seconds: float = float("nan")
    redshift: object = field(default=None, compare=False, repr=False)
    lines: object = field(default=None, compare=False, repr=False)
    bpt: object = field(default=None, compare=False, repr=False)
    metallicity: object = field(default=None, compare=False, repr=False)
    wr: object = field(default=None, compare=False, repr=False)
    bal: object = field(default=None, compare=False, repr=False)
    dusty: object = field(default=None, compare=False, repr=False)

    def to_row(self) -> dict:
        """One flat row with the columns of :data:`COLUMNS` (NaN / '' where not measured)."""
        nan = float("nan")
        zr = self.redshift
        row = {"target_id": self.target_id, "file": self.file, "instrument": self.instrument, "ra": self.ra,
               "dec": self.dec, "z": self.z, "z_err": self.z_err,
               "z_quality": zr.quality if zr is not None else "none",
               "template": zr.template if zr is not None else "",
               "n_lines": int(zr.n_lines) if zr is not None else 0,
               "lines": ",".join(zr.lines) if zr is not None else "",
               "class": self.cls, "class_reason": self.class_reason}
        b = self.bpt.to_row() if self.bpt is not None else {}
        for k in ("bpt_nii", "bpt_sii", "bpt_oi", "bpt_class"):
            row[k] = b.get(k, "")
        for k in ("bpt_prob", "log_nii_ha", "log_oiii_hb", "log_sii_ha", "log_oi_ha"):
            row[k] = float(b.get(k, nan))
        m = self.metallicity
        row.update({"log_nii_oii": m.log_nii_oii if m is not None else nan,
                    "oh12": m.oh12 if m is not None else nan, "oh12_err": m.oh12_err if m is not None else nan,
                    "r23_branch": m.branch if m is not None else "", "ebv": m.ebv if m is not None else nan})
        w = self.wr
        row.update({"wr_bump": bool(w.wr) if w is not None else False,
                    "wr_significance": float(w.significance) if w is not None else nan,
                    "wr_flux": float(w.flux) if w is not None else nan})
        q = self.bal.to_row() if self.bal is not None else {}
        row.update({"bal": bool(q.get("bal", False)), "lobal": bool(q.get("lobal", False))})
        for k in ("balnicity_index", "balnicity_index_err", "absorption_index", "absorption_index_err"):
            row[k] = float(q.get(k, nan))
        row.update({"fe_ratio": self.fe_ratio, "snr": self.snr, "seconds": self.seconds,
                    "flags": ",".join(self.flags)})
        return row


# ============================================================================ one spectrum
def _header_info(path) -> dict:
    """OBJECT, INSTRUME, RA, DEC (deg) from a FITS file's headers (SDSS: PLUG_RA/PLUG_DEC);
    for a file the reader rejected (the loaded spectrum carries them in its ``meta``)."""
    out = {"object": "", "instrument": "", "ra": np.nan, "dec": np.nan}
    try:
        with fits.open(path, memmap=False) as hdul:
            for h in hdul[:2]:
                out = _meta_info(h.header, out)
    except (OSError, ValueError):
        pass
    return out


def _meta_info(meta, out=None) -> dict:
    """OBJECT, INSTRUME, RA, DEC (deg) from a header or a spectrum's ``meta`` (filling what
    ``out`` does not have yet)."""
    out = dict(out) if out is not None else {"object": "", "instrument": "", "ra": np.nan, "dec": np.nan}
    meta = meta or {}
    out["object"] = out["object"] or str(meta.get("OBJECT", "")).strip()
    out["instrument"] = out["instrument"] or str(meta.get("INSTRUME", "")).strip()
    for key, kk in (("ra", ("RA", "PLUG_RA")), ("dec", ("DEC", "PLUG_DEC"))):
        for k in kk:
            v = meta.get(k)
            if np.isfinite(out[key]):
                break
            if isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v):
                out[key] = float(v)
    return out


def _snr(spec) -> float:
    g = spec.good
    return float(np.median(spec.flux[g] / spec.sigma[g])) if np.any(g) else float("nan")


def _fe_ratio(spec, z) -> float:
    """Fe II strength of a QSO: optical Fe II (4434–4684 Å) over broad Hβ when covered
    (R_FeII, Boroson & Green 1992), else the UV Fe II (2200–3090 Å) over Mg II in units of
    three times its typical value :data:`FE_UV_TYPICAL` (so that 1 is the threshold in both
    cases).  Flux above a straight continuum through
    the line-free windows on either side; NaN if not covered."""
    w = spec.wave / (1 + z)
    g = spec.good
    f = spec.flux

    def above(lo, hi, c1, c2):
        m1 = g & (w > c1[0]) & (w < c1[1])
        m2 = g & (w > c2[0]) & (w < c2[1])
        m = g & (w > lo) & (w < hi)
        if m1.sum() < 3 or m2.sum() < 3 or m.sum() < 5:
            return np.nan
        x1, y1 = np.median(w[m1]), np.median(f[m1])
        x2, y2 = np.median(w[m2]), np.median(f[m2])
        cont = y1 + (y2 - y1) * (w[m] - x1) / (x2 - x1)
        dl = np.gradient(spec.wave)[m] / (1 + z)
        return float(np.sum((f[m] - cont) * dl))

    fe_opt = above(4434.0, 4684.0, (4200.0, 4230.0), (5080.0, 5120.0))
    hb = above(4800.0, 4930.0, (4750.0, 4790.0), (5080.0, 5120.0))
    if np.isfinite(fe_opt) and np.isfinite(hb) and hb > 0:
        return fe_opt / hb
    fe_uv = above(2200.0, 2700.0, (2150.0, 2190.0), (3090.0, 3130.0)) + above(2880.0, 3090.0, (2150.0, 2190.0),
                                                                               (3090.0, 3130.0))
    mg = above(2740.0, 2860.0, (2150.0, 2190.0), (3090.0, 3130.0))
    if np.isfinite(fe_uv) and np.isfinite(mg) and mg > 0:
        return fe_uv / mg / (3.0 * FE_UV_TYPICAL)
    return float("nan")


def classify_spectrum(path_or_spec, *, target_id: str = "", z: float | None = None, n_mc: int = 200,
                      seed: int = 0, passive_ew_ha: float = 6.0, min_snr: float = 5.0,
                      stellar_continuum=False) -> Classification:
    """Measure and classify one spectrum (a path or an AnalysisSpectrum); never raises for a
    bad spectrum: the class is then ``unknown`` and the flags say why.  ``z``: use this
    redshift instead of the automatic one.  ``n_mc``: Monte-Carlo draws of the BPT,
    abundance and BAL errors.  ``min_snr``: below this median S/N per pixel a spectrum
    whose redshift no single feature confirms is ``unknown`` ('too low S/N')."""
    t0 = time.perf_counter()
    flags: list[str] = []
    info = {"object": "", "instrument": "", "ra": np.nan, "dec": np.nan}
    name = getattr(path_or_spec, "name", "") or ""
    if isinstance(path_or_spec, (str, Path)):
        name = str(path_or_spec)
        try:
            spec = load_spectrum(path_or_spec)
        except Exception as exc:  # noqa: BLE001 - any reader failure is reported, the batch goes on
            info = _header_info(path_or_spec)     # whatever the headers still say about the target
            why = (f"spectrum not usable: {exc}" if isinstance(exc, SpecredError)
                   else f"spectrum not readable: {type(exc).__name__}: {exc}")
            return Classification(name, "unknown", why, flags=("UNREADABLE",),
                                  target_id=target_id or info["object"], instrument=info["instrument"],
                                  ra=info["ra"], dec=info["dec"], seconds=time.perf_counter() - t0)
    else:
        spec = path_or_spec
    info = _meta_info(getattr(spec, "meta", None))
    base = dict(target_id=target_id or info["object"], instrument=info["instrument"], ra=info["ra"],
                dec=info["dec"])
    snr = _snr(spec)

    def done(cls, reason, **kw):
        return Classification(name, cls, reason, snr=snr, flags=tuple(flags), seconds=time.perf_counter() - t0,
                              **base, **kw)

    # ---- 1. redshift
    try:
        zr = find_redshift(spec)
    except Exception as exc:  # noqa: BLE001
        flags.append(f"REDSHIFT_FAILED:{type(exc).__name__}")
        return done("unknown", f"the redshift search failed ({exc})")
    if z is None and zr.template == "absorption":
        zr = _bal_instead_of_absorption(spec, zr, flags)
    if z is None and (not np.isfinite(zr.z) or zr.quality == "low") and np.isfinite(snr) and snr >= min_snr:
        dusty = _dusty_source(spec, flags)
        if dusty is not None:
            unconfirmed = (f"the best redshift (z = {zr.z:.4f}, {zr.template}) is confirmed by no single feature"
                           if np.isfinite(zr.z) else "no redshift")
            # no redshift row entries: the unconfirmed extragalactic solution is only quoted
            return done("star", f"a Galactic dusty source (YSO/AGB candidate): {dusty.describe()}; "
                                f"{unconfirmed}", dusty=dusty)
    if z is not None:
        zval, zerr = float(z), float("nan")
    else:
        zval, zerr = zr.z, zr.z_err
    if zr.flags:
        flags += [f for f in zr.flags.split(",") if f]
    if not np.isfinite(zval):
        why = "too low S/N" if np.isfinite(snr) and snr < min_snr else "no spectral feature above the noise"
        return done("unknown", f"{why}: no redshift ({zr.flags or 'no candidate'})", redshift=zr)
    kw = dict(z=float(zval), z_err=float(zerr), redshift=zr)
    if zr.quality == "low" and z is None:
        if not (np.isfinite(snr) and snr >= min_snr):
            return done("unknown", f"too low S/N ({snr:.1f} per pixel) for a redshift that no single feature "
                                   f"confirms (z = {zval:.4f}, {zr.flags or 'weak features'})", **kw)
        flags.append("LOW_Z_QUALITY")
    if abs(zval) * C_KMS < 300.0:
        return done("star", f"features at z = {zval:.5f} (|cz| < 300 km/s): a Galactic source "
                            f"({', '.join(zr.lines)})", **kw)

    # ---- 2. QSOs
    if zr.template == "qso":
        from .bal import measure_bal
        bal = None
        try:
            bal = measure_bal(spec, zval, n_mc=n_mc, seed=seed)
        except Exception as exc:  # noqa: BLE001
            flags.append(f"BAL_FAILED:{type(exc).__name__}")
        fe = _fe_ratio(spec, zval)
        if np.isfinite(fe) and fe > 1.0:
            flags.append("FE_RICH")
        lines_used = ", ".join(zr.lines)
        if bal is not None and bal.lobal:
            cls, why = "LoBAL QSO", f"broad lines ({lines_used}); low-ionisation troughs ({bal.reason})"
        elif bal is not None and bal.bal:
            cls, why = "BAL QSO", f"broad lines ({lines_used}); high-ionisation troughs ({bal.reason})"
        else:
            cls, why = "QSO", f"broad permitted lines ({lines_used})"
        if "FE_RICH" in flags:
            why += f"; strong Fe II (ratio {fe:.2f} of the threshold)"
        return done(cls, why, bal=bal, fe_ratio=fe, **kw)

    # ---- 3./4. galaxies: narrow lines
    try:
        if (z is None and zr.template == "emission" and zr.fit is not None and stellar_continuum is False
                and all(n in zr.fit for n in CLASS_LINES)):
            fit = zr.fit       # the redshift's own tied fit of these lines (with the Balmer troughs)
        else:
            fit = fit_lines(spec, zval, CLASS_LINES, balmer_absorption=True, stellar_continuum=stellar_continuum)
    except Exception as exc:  # noqa: BLE001
        flags.append(f"LINE_FIT_FAILED:{type(exc).__name__}")
        return done("unknown", f"redshift {zval:.4f} but the line fit failed ({exc})", **kw)
    ha = fit["Halpha"] if "Halpha" in fit else None
    ew_ha = float(ha.ew_rest) if ha is not None and ha.covered else float("nan")
    abs_score = max((s for t, zc, s in zr.candidates
                     if t == "absorption" and abs(zc - zval) < ABSORPTION_MATCH_DZ * (1 + zval)),
                    default=-np.inf)
    o3 = fit["OIII_5007"] if "OIII_5007" in fit else None
    strong_o3 = bool(o3 is not None and o3.covered and o3.detected and o3.snr > 5)
    passive = zr.template == "absorption" or (
        abs_score > 40.0 and not strong_o3 and (not np.isfinite(ew_ha) or ew_ha < passive_ew_ha))
    fl = line_fluxes_from_fit(fit)
    bpt = classify_bpt(fl, n_mc=n_mc, seed=seed)       # also for passive hosts: their weak emission

    def passive_class(zp, fitp, bptp, score, note="", **kwp):
        # weak LINER-like emission of early types: Hα and [N II] together (comparable in
        # strength there), fitted without the Balmer absorption term that would absorb it
        sn = np.nan
        try:
            fx = fit_lines(spec, zp, ("NII_6548", "Halpha", "NII_6584"))
            fsum, esum = fx.sum_flux(("Halpha", "NII_6584"))
            sn = fsum / esum if np.isfinite(esum) and esum > 0 else np.nan
        except SpecredError:
            pass
        if np.isfinite(sn) and sn >= 3.0:
            return done("S0", f"{note}absorption features (score {score:.0f}) with Hα+[N II] emission "
                              f"(S/N {sn:.1f}; BPT of that emission: {bptp.bpt_class})", lines=fitp, bpt=bptp, **kwp)
        return done("E", f"{note}absorption features only" + ("" if not np.isfinite(sn) else
                                                                f" (Hα+[N II] S/N {sn:.1f} < 3)"),
                    lines=fitp, bpt=bptp, **kwp)

    if passive:
        return passive_class(zval, fit, bpt, abs_score, **kw)
    cls = BPT_CLASS_NAMES.get(bpt.bpt_class)
    if cls is not None:
        why = f"narrow emission lines; BPT {bpt.bpt_class} (p = {bpt.bpt_prob:.2f}): {bpt.reason}"
    elif np.isfinite(bpt.log_nii_ha) and bpt.log_nii_ha_limit in ("", "upper") and bpt.log_nii_ha < -0.4:
        cls = "SF"
        why = (f"narrow emission lines; log([N II]/Hα) = {bpt.log_nii_ha:.2f} < -0.4 alone (Stasińska et al. "
               f"2006; BPT {bpt.bpt_class}: {bpt.reason})")
    elif z is None and zr.quality == "low" and len(zr.lines) <= UNCONFIRMED_MAX_FEATURES:
        # neither a BPT class nor more than one weak feature: the emission identification
        # is unconfirmed (one 3σ line somewhere is expected from noise in a search over all
        # z).  Absorption features at that same redshift (an early type with weak Hα), else
        # the absorption template's best redshift anywhere, when significant; else 'unknown'
        note = (f"emission redshift {zval:.4f} unconfirmed ({len(zr.lines)} weak feature(s): "
                f"{', '.join(zr.lines) or 'none'}); ")
        flags.append("EMISSION_UNCONFIRMED")
        d = ABSORPTION_MATCH_DZ * (1 + zval)
        za = _absorption_redshift(spec, z_min=max(0.0, zval - d), z_max=zval + d)
        if za is not None:
            note += f"absorption at the same redshift (score {za.score:.0f}); "
        elif max((c[2] for c in zr.candidates if c[0] == "absorption"), default=-np.inf) >= ABSORPTION_FALLBACK_SCORE:
            za = _absorption_redshift(spec)
        fa = None
        if za is not None:
            try:
                fa = fit_lines(spec, za.z, CLASS_LINES, balmer_absorption=True, stellar_continuum=stellar_continuum)
            except SpecredError:
                fa = None
        if fa is not None:
            return passive_class(za.z, fa, classify_bpt(line_fluxes_from_fit(fa), n_mc=n_mc, seed=seed),
                                 za.score, note=note, z=float(za.z), z_err=float(za.z_err), redshift=za)
        return done("unknown", note + f"no significant absorption solution either (score < "
                                      f"{ABSORPTION_FALLBACK_SCORE:g} at that redshift and elsewhere)",
                    lines=fit, bpt=bpt, **kw)
    else:
        cls = "emission-line galaxy"
        why = f"narrow emission lines; BPT cannot decide ({bpt.bpt_class}: {bpt.reason})"
    met = wr = None
    if cls in ("SF", "composite"):
        try:
            met = oxygen_abundance(fl, n_mc=max(n_mc, 200), seed=seed)
        except SpecredError as exc:
            flags.append(f"METALLICITY_FAILED:{exc}")
    try:
        # a star-forming host's nebular He II / [Fe III] cannot be strong (wr.NEBULAR_MAX_HBETA)
        wr = measure_wr_bump(spec, zval, lines=fit, star_forming=cls in ("SF", "composite"))
        if wr.wr:
            flags.append("WR")
            why += f"; Wolf-Rayet bump ({wr.reason})"
    except Exception as exc:  # noqa: BLE001
        flags.append(f"WR_FAILED:{type(exc).__name__}")
    return done(cls, why, lines=fit, bpt=bpt, metallicity=met, wr=wr, **kw)


def _absorption_redshift(spec, **kw):
    """The absorption template's redshift (find_redshift keywords ``kw``, e.g. a z range)
    when its score reaches ABSORPTION_FALLBACK_SCORE, else None."""
    try:
        za = find_redshift(spec, templates=("absorption",), min_score=ABSORPTION_FALLBACK_SCORE, **kw)
    except Exception:  # noqa: BLE001 - the fallback is optional; the class reason says what happened
        return None
    return za if np.isfinite(za.z) else None


def _dusty_source(spec, flags):
    """The :mod:`.dusty` fit when it says 'Galactic dusty source' (flag ``DUSTY_CONTINUUM``), else None."""
    from .dusty import fit_dusty_continuum
    try:
        fit = fit_dusty_continuum(spec)
    except Exception as exc:  # noqa: BLE001 - a failed side test must not stop the classification
        flags.append(f"DUSTY_FIT_FAILED:{type(exc).__name__}")
        return None
    if fit is None or not fit.accepted:
        return None
    flags.append("DUSTY_CONTINUUM")
    return fit


def _bal_instead_of_absorption(spec, zr, flags):
    """The redshift of a BAL QSO whose troughs won as 'stellar absorption', else ``zr``.

    Saturated troughs thousands of km/s wide (C IV, Si IV, Al III, Mg II) fit the absorption
    template's Ca II H&K or Mg b better than the trough-eaten emission lines fit the QSO
    template (seen on simulated LoBALs at S/N 8-15).  Stellar features are narrow, so when
    the absorption fit needs the widest features it allows (σ >= 0.9 ×
    ABSORPTION_SIGMA_MAX_KMS), the QSO template is searched on its own; a solution of
    quality 'good' with >= 2 *broad* QSO lines (two broad emission lines at S/N >= 5 at one
    redshift: no passive galaxy shows that) replaces the absorption redshift."""
    sig = zr.fit.group_sigma_kms.get("absorption", np.nan) if zr.fit is not None else np.nan
    if not sig >= 0.9 * ABSORPTION_SIGMA_MAX_KMS:
        return zr
    try:
        zq = find_redshift(spec, templates=("qso",))
    except Exception:  # noqa: BLE001 - the check is optional; the absorption answer stands
        return zr
    broad = {n for feat in zq.lines for n in feat.split("+")} & QSO_BROAD_LINES
    if zq.quality == "good" and len(broad) >= 2:
        flags.append("BROAD_TROUGHS_NOT_STELLAR")
        return zq
    return zr


#: the broad emission lines of the QSO template (the narrow [O III] etc. excluded)
QSO_BROAD_LINES = frozenset(n for _, comp, _ in QSO_COMPONENTS for n, _ in comp)


# ============================================================================ many spectra
_BLAS_LIMIT = None


def _one_blas_thread():
    """Worker initialiser: one BLAS thread per process.  The fits multiply small matrices,
    where BLAS threads only contend with the other workers (measured 10.7 -> 13 spectra/s
    on 2 cores)."""
    global _BLAS_LIMIT
    from threadpoolctl import threadpool_limits
    _BLAS_LIMIT = threadpool_limits(limits=1, user_api="blas")


def _one(args):
    path, target_id, opts = args
    try:
        c = classify_spectrum(path, target_id=target_id, **opts)
        return c.to_row(), c
    except Exception as exc:  # noqa: BLE001 - a bug must not stop a survey; it is reported
        name = getattr(path, "name", "") or str(path)         # a path or an AnalysisSpectrum
        log.error("%s: %s", name, traceback.format_exc())
        c = Classification(name, "unknown",
                           f"internal error: {type(exc).__name__}: {exc}", flags=("INTERNAL_ERROR",),
                           target_id=target_id)
        return c.to_row(), c


def _match_target(targets, ra, dec, obj) -> str:
    """The id in ``targets`` of a spectrum at (ra, dec) deg with OBJECT ``obj``: the position
    match, else the one target whose id and OBJECT contain each other; '' if none."""
    m = targets.match(ra, dec)
    if m is not None:
        return m.id
    if obj:
        hits = [i for i in targets.ids if i and (i in obj or obj in i)]
        if len(hits) == 1:
            return hits[0]
    return ""


def _one_row(args):
    return _one(args)[0], None


def redshift_groups(target_ids, z, z_err):
    """How the redshifts of one target's spectra (EFOSC2 + SofI) combine, from three columns.

    Returns ``(combined, disagree)``: ``combined`` a list of ``(rows, z, z_err)`` — the
    spectra of a target that agree within 0.01(1+z) of its most precise one get the
    error-weighted mean redshift, its error including their scatter (mean absolute
    deviation, as the paper) — and ``disagree`` a list of row-index arrays of targets whose
    spectra do not agree.  Rows without a target id or a usable z/z_err take no part."""
    z_all, e_all = np.asarray(z, float), np.asarray(z_err, float)
    usable = np.isfinite(z_all) & np.isfinite(e_all) & (e_all > 0)
    groups: dict[str, list[int]] = {}
    for i, tid in enumerate(np.asarray(target_ids, str)):   # one pass: batches are large
        if tid and usable[i]:
            groups.setdefault(tid, []).append(i)
    combined, disagree = [], []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        idx = np.asarray(idx)
        zs, es = z_all[idx], e_all[idx]
        zb = zs[int(np.argmin(es))]
        keep = idx[np.abs(zs - zb) < 0.01 * (1 + zb)]
        if len(keep) < 2:
            disagree.append(idx)
            continue
        zk, ek = z_all[keep], e_all[keep]
        w = 1 / ek ** 2
        zbar = float(np.sum(w * zk) / np.sum(w))
        combined.append((keep, zbar, float(np.hypot(1 / np.sqrt(np.sum(w)), np.mean(np.abs(zk - zbar))))))
    return combined, disagree


def _add_flag(flags: str, flag: str) -> str:
    return ",".join(f for f in (flags, flag) if f)


def _combine_redshifts(tab: Table) -> None:
    """Spectra of one target (EFOSC2 + SofI): the combined redshift of :func:`redshift_groups`
    goes to every row that agrees, the lines are merged; the per-spectrum values stay in
    ``z_spectrum`` / ``z_err_spectrum``."""
    for col in ("flags", "lines"):            # room to append without truncation
        tab[col] = np.array([str(v) for v in tab[col]], dtype=f"U{max(64, 2 * max(len(str(v)) for v in tab[col]) + 64)}")
    tab["z_spectrum"] = tab["z"].copy()
    tab["z_err_spectrum"] = tab["z_err"].copy()
    combined, disagree = redshift_groups(tab["target_id"], tab["z"], tab["z_err"])
    for idx in disagree:
        for i in idx:
            tab["flags"][i] = _add_flag(tab["flags"][i], "Z_DISAGREES_BETWEEN_SPECTRA")
    for keep, zbar, err in combined:
        merged = sorted({x for i in keep for x in str(tab["lines"][i]).split(",") if x})
        for i in keep:
            tab["z"][i], tab["z_err"][i] = zbar, err
            tab["lines"][i] = ",".join(merged)
            tab["n_lines"][i] = len(merged)
            tab["flags"][i] = _add_flag(tab["flags"][i], f"Z_COMBINED_{len(keep)}")


def classify_spectra(paths, *, targets=None, workers: int = 1, n_mc: int = 200, seed: int = 0,
                     progress=None, keep_objects: bool = False, **opts):
    """Classify many spectra; returns (Table, list of Classification or None).

    ``targets``: a :class:`specred.targets.TargetList` to name each spectrum by position
    (else the OBJECT header).  ``workers``: processes (1: in this process).  ``progress``:
    a wrapper like :func:`specred.progress.progress`.  ``keep_objects``: also return the
    full :class:`Classification` objects (for plots)."""
    paths = [Path(p) for p in paths]
    jobs = [(p, "", dict(n_mc=n_mc, seed=seed, **opts)) for p in paths]
    rows, objs = [], []
    wrap = progress or (lambda it, **k: it)
    if workers <= 1 or len(jobs) < 2:
        for j in wrap(jobs, desc="classify", unit="spectrum", total=len(jobs)):
            r, c = _one(j)
            rows.append(r)
            objs.append(c if keep_objects else None)
    else:
        chunk = max(1, min(64, len(jobs) // (8 * workers)))
        # the full measurement objects only come back when asked for: pickling them (line
        # fits, models) kept the parent busy on a quarter of a core
        fn = _one if keep_objects else _one_row
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_blas_thread) as ex:
            for r, c in wrap(ex.map(fn, jobs, chunksize=chunk), desc="classify", unit="spectrum",
                             total=len(jobs)):
                rows.append(r)
                objs.append(c if keep_objects else None)
    if targets is not None:
        # name each spectrum by the target list (position, else OBJECT), from the header
        # values the workers read with the spectrum (no second pass over the files)
        for i, r in enumerate(rows):
            tid = _match_target(targets, r["ra"], r["dec"], r["target_id"]) or r["target_id"]
            r["target_id"] = tid
            if objs[i] is not None:
                objs[i] = replace(objs[i], target_id=tid)
    tab = Table(rows=rows, names=list(COLUMNS)) if rows else Table(names=list(COLUMNS))
    for r in rows:
        if "UNREADABLE" in r["flags"] or "INTERNAL_ERROR" in r["flags"]:
            log.warning("%s: %s", r["file"], r["class_reason"])
    if len(tab):
        _combine_redshifts(tab)
    tab.meta["description"] = ("specred classify: one row per spectrum; class decision logic in "
                               "specred.analysis.classify; z combined over the spectra of one target")
    tab.meta["class_logic"] = __doc__.split("\n\n")[1].replace("\n", " ")
    return tab, objs


def rest_frame_stack(objs, wave_rest=None, norm=(3000.0, 3100.0)):
    """Median rest-frame stack of QSO spectra (paper Fig. 11): each spectrum is shifted to
    its rest frame, normalised by its median in ``norm`` (Å, rest) and interpolated on
    ``wave_rest``; returns (wave_rest, median, n per pixel)."""
    if wave_rest is None:
        wave_rest = np.arange(1100.0, 7000.0, 2.0)
    stack = []
    for c in objs:
        if c is None or not np.isfinite(c.z) or "QSO" not in c.cls:
            continue
        spec = load_spectrum(c.file)
        w = spec.wave / (1 + c.z)
        m = spec.good & (w > norm[0]) & (w < norm[1])
        if m.sum() < 3:
            continue
        f = np.where(spec.good, spec.flux, np.nan) / np.median(spec.flux[m])
        row = np.interp(wave_rest, w, f, left=np.nan, right=np.nan)
        stack.append(row)
    if not stack:
        return wave_rest, np.full(wave_rest.size, np.nan), np.zeros(wave_rest.size, int)
    a = np.array(stack)
    n = np.sum(np.isfinite(a), axis=0)
    with warnings.catch_warnings():          # all-NaN columns: outside every spectrum
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(a, axis=0)
    return wave_rest, np.where(n > 0, med, np.nan), n


def write_plots(tab: Table, objs, outdir) -> list[Path]:
    """BPT diagrams of every classified galaxy (Fig. 7), WR zooms (Fig. 4), BAL troughs
    (Fig. 9) and the rest-frame QSO stack (Fig. 11) into ``outdir``; returns the files."""
    from matplotlib.figure import Figure

    from .bal import plot_bal
    from .bpt import plot_bpt
    from .wr import plot_wr
    from ..io import safe_name

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    gal = [(c.bpt, c.target_id or Path(c.file).stem) for c in objs if c is not None and c.bpt is not None]
    if gal:
        p = out / "bpt.png"
        plot_bpt([g for g, _ in gal], labels=[n for _, n in gal], path=p)
        files.append(p)
    for c in objs:
        if c is None:
            continue
        stem = safe_name(c.target_id or Path(c.file).stem)
        if c.wr is not None and c.wr.wr:
            p = out / f"wr_{stem}.png"
            plot_wr(load_spectrum(c.file), c.z, c.wr, path=p)
            files.append(p)
        if c.bal is not None and (c.bal.bal or c.bal.lobal):
            p = out / f"bal_{stem}.png"
            plot_bal(load_spectrum(c.file), c.z, c.bal, path=p)
            files.append(p)
    wq, med, n = rest_frame_stack(objs)
    if np.any(n > 0):
        fig = Figure(figsize=(10, 4))
        ax = fig.add_subplot(111)
        ax.plot(wq, med, lw=0.8, color="k")
        for nm in ("Lya", "SiIV_1400", "CIV_1549", "CIII_1909", "MgII_2800", "Hbeta", "OIII_5007", "Halpha"):
            lam = L.rest_wavelength(nm)
            if wq[0] < lam < wq[-1]:
                ax.axvline(lam, color="0.6", lw=0.5, ls=":")
                ax.text(lam, 1.02, L.label(nm), rotation=90, fontsize=7, transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom")
        ax.set_xlabel("rest-frame vacuum wavelength [Å]")
        ax.set_ylabel("median f_λ (normalised at 3000–3100 Å)")
        ax.set_title(f"rest-frame stack of {int(n.max())} QSO spectra")
        p = out / "qso_stack.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        files.append(p)
    return files


def compare_with_paper(tab: Table, truth: Table) -> dict:
    """Agreement of ``tab`` classes with a truth table (columns object_id / target_id and
    classification, the paper's names): {'n', 'agree', 'fraction', 'rows'}.  Targets the
    truth calls Unknown are left out ('targets with a class')."""
    key = "object_id" if "object_id" in truth.colnames else "target_id"
    want = {str(r[key]): str(r["classification"]) for r in truth}
    rows, n, agree = [], 0, 0
    for r in tab:
        tid = str(r["target_id"])
        if tid not in want or want[tid] == "Unknown":
            continue
        ours = str(r["class"])
        exp = PAPER_CLASS.get(want[tid], want[tid])
        ok = (ours == exp or (exp == "BAL" and ours in ("BAL QSO", "LoBAL QSO"))
              or (want[tid] == "Fe rich QSO" and ours == "QSO" and "FE_RICH" in str(r["flags"])))
        if want[tid] == "Fe rich QSO" and "FE_RICH" not in str(r["flags"]):
            ok = False
        n += 1
        agree += ok
        rows.append((tid, want[tid], ours, ok))
    return {"n": n, "agree": agree, "fraction": agree / n if n else float("nan"), "rows": rows}


__all__ = ["Classification", "classify_spectrum", "classify_spectra", "write_plots", "rest_frame_stack",
           "compare_with_paper", "COLUMNS", "PAPER_CLASS"]
