"""BPT (Baldwin, Phillips & Terlevich 1981) emission-line classification with upper limits.

Three diagrams share the y axis log([O III] 5007/Hβ):

* the [N II] diagram, x = log([N II] 6584/Hα),
* the [S II] diagram, x = log([S II] 6717+6731/Hα),
* the [O I] diagram,  x = log([O I] 6300/Hα).

Demarcations (x, y are the decimal logarithms of the ratios above):

* Kauffmann et al. (2003, MNRAS 346, 1055, eq. 1), empirical lower envelope of the AGN
  branch in SDSS ("Ka03"):  y = 0.61 / (x − 0.05) + 1.30;
* Kewley et al. (2001, ApJ 556, 121, eqs. 5–7), theoretical maximum starburst line
  ("Ke01"; repeated as eqs. 1–3 of Kewley et al. 2006):
  [N II]: y = 0.61 / (x − 0.47) + 1.19;  [S II]: y = 0.72 / (x − 0.32) + 1.30;
  [O I]:  y = 0.73 / (x + 0.59) + 1.33;
* Kewley, Groves, Kauffmann & Heckman (2006, MNRAS 372, 961, Sect. 4; "Ke06"),
  Seyfert/LINER lines:  [S II]: y = 1.89 x + 0.76;  [O I]: y = 1.18 x + 1.30.

The hyperbolae only bound a region to the *left* of their vertical asymptote (x = 0.05,
0.47, 0.32, −0.59): a point on or right of the asymptote counts as above the curve, so the
star-forming region is bounded to the lower left in every diagram.

Per-diagram classes
-------------------
[N II]: ``'SF'`` below Ka03 and below Ke01, ``'AGN'`` above Ke01, ``'composite'`` otherwise
(between the two curves).  (Far to the left, x < −1.28, Ke01 runs below Ka03; a point
between them there is above the maximum-starburst line and is called AGN.)
[S II] and [O I]: ``'SF'`` below Ke01; above Ke01 ``'Seyfert'`` above the Ke06 line and
``'LINER'`` below it.  ``'unavailable'``: a line of the diagram is missing (not covered);
``'undetermined'``: upper limits leave more than one class possible.

Upper limits
------------
An undetected line is an upper limit on its flux (normally 3σ).  A ratio with an
undetected numerator is an upper limit, with an undetected denominator a lower limit, with
both undetected unconstrained.  The true point then lies in a rectangle of the diagram
(a half-line, a quadrant or a strip), and a class is assigned only if every point of that
rectangle has the same class.  Because the SF region is a "lower-left" set (moving a point
left or down never takes it out) and the region above Ke01 an "upper-right" set, this is
decided exactly by the corners of the rectangle: e.g. an [N II] upper limit whose limit
already lies in the SF region gives ``'SF'``; if the limit lies in the composite region the
true point could be either, and the diagram is ``'undetermined'``.  (For the [N II] diagram
the classes between the two extreme corners are all counted as possible, a slightly
conservative choice; for Seyfert/LINER the Ke06 line is tested at the corners that
maximise/minimise y − a x.)

Combined class (Kewley et al. 2006, Sect. 4)
---------------------------------------------
Using the diagrams that are available (each with its own decided class):

* ``'SF'``: SF in the [N II] diagram and SF in every available [S II]/[O I] diagram;
* ``'composite'``: composite in the [N II] diagram (Ke06 define composites on that diagram
  alone; the [S II]/[O I] classes are reported in the reason);
* ``'Seyfert'`` / ``'LINER'``: AGN in the [N II] diagram (or [N II] unavailable) and the
  available [S II]/[O I] diagrams agree on Seyfert, resp. LINER;
* ``'AGN'``: AGN in the [N II] diagram but neither [S II] nor [O I] available to split
  Seyfert from LINER (an addition to the Ke06 scheme);
* ``'ambiguous'``: the diagrams disagree (e.g. SF in [N II] but Seyfert in [S II], or
  Seyfert in [S II] but LINER in [O I]) — Ke06's ambiguous class;
* ``'undetermined'``: upper limits leave several combined classes possible, or the
  [N II] diagram is unavailable while the others say SF (the [N II] diagram is required
  to separate SF from composite);
* ``'unavailable'``: no diagram can be built (Hα or Hβ or [O III] missing, ...).

With limits, every combination of the classes still possible in each diagram is run through
these rules; a combined class is assigned when all give the same answer.

Monte Carlo
-----------
Detected fluxes are drawn from independent Gaussians (flux, err); upper limits stay upper
limits at their value.  A draw of a detected line that comes out non-positive is treated
like a non-detection in that draw (an upper limit at 3 err), i.e. it goes through the same
limit logic as the data.  Every draw is classified exactly as the data are; the fraction of
draws in each class is its probability (``'undetermined'`` included, so they sum to 1).
The reported class is the one of the measured values; its probability is the fraction of
draws that agree with it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from ..errors import SpectrumError

__all__ = ["LineFlux", "BPTResult", "FLUX_KEYS", "line_fluxes_from_fit", "validate_fluxes",
           "kauffmann03_nii", "kewley01_nii", "kewley01_sii", "kewley01_oi", "kewley06_sii",
           "kewley06_oi", "classify_nii", "classify_sii", "classify_oi", "combine_classes",
           "classify_bpt", "plot_bpt", "NII_CLASSES", "SII_CLASSES", "OI_CLASSES", "COMBINED_CLASSES"]

#: the keys of a flux dictionary (``'SII'`` = 6717+6731, ``'OII_3727'`` = 3726+3729)
FLUX_KEYS = ("Hbeta", "OIII_4959", "OIII_5007", "OI_6300", "Halpha", "NII_6584", "SII", "OII_3727")
#: blends summed with their covariance by :func:`line_fluxes_from_fit`
BLENDS = {"SII": ("SII_6717", "SII_6731"), "OII_3727": ("OII_3726", "OII_3729")}
#: detection threshold (S/N) and the size of an upper limit in units of the flux error
DETECT_SNR = 3.0
LIMIT_SIGMA = 3.0

NII_CLASSES = ("SF", "composite", "AGN")
SII_CLASSES = ("SF", "Seyfert", "LINER")
OI_CLASSES = ("SF", "Seyfert", "LINER")
COMBINED_CLASSES = ("SF", "composite", "Seyfert", "LINER", "AGN", "ambiguous", "undetermined", "unavailable")
DIAGRAMS = ("nii", "sii", "oi")
_CLASSES = {"nii": NII_CLASSES, "sii": SII_CLASSES, "oi": OI_CLASSES}
_X_LINE = {"nii": "NII_6584", "sii": "SII", "oi": "OI_6300"}
_X_COL = {"nii": "log_nii_ha", "sii": "log_sii_ha", "oi": "log_oi_ha"}
_LABEL = {"nii": "[N II]", "sii": "[S II]", "oi": "[O I]"}

# (a, x0, c) of y = a / (x - x0) + c; references in the module docstring
_KA03_NII = (0.61, 0.05, 1.30)      # Kauffmann et al. 2003, eq. 1
_KE01_NII = (0.61, 0.47, 1.19)      # Kewley et al. 2001, eq. 5
_KE01_SII = (0.72, 0.32, 1.30)      # Kewley et al. 2001, eq. 6
_KE01_OI = (0.73, -0.59, 1.33)      # Kewley et al. 2001, eq. 7
# (slope, intercept) of the Seyfert/LINER lines, Kewley et al. 2006, Sect. 4
_KE06_SII = (1.89, 0.76)
_KE06_OI = (1.18, 1.30)
_KE01 = {"nii": _KE01_NII, "sii": _KE01_SII, "oi": _KE01_OI}
_KE06 = {"sii": _KE06_SII, "oi": _KE06_OI}


# --------------------------------------------------------------------------- fluxes
@dataclass(frozen=True)
class LineFlux:
    """A line (or blend) flux in erg s⁻¹ cm⁻².

    ``upper_limit=True``: the line is undetected and ``flux`` is an upper limit (3σ by
    convention); ``err`` is then the 1σ flux error (may be NaN)."""

    flux: float
    err: float = float("nan")
    upper_limit: bool = False

    @property
    def detected(self) -> bool:
        return not self.upper_limit


def _from_single(ln) -> LineFlux | None:
    if not getattr(ln, "covered", True):
        return None
    f, e = float(ln.flux), float(ln.flux_err)
    if ln.detected and np.isfinite(f) and f > 0:
        return LineFlux(f, e, False)
    ul = float(getattr(ln, "flux_upper_limit", np.nan))
    if not (np.isfinite(ul) and ul > 0):
        ul = LIMIT_SIGMA * e
    if not (np.isfinite(ul) and ul > 0):
        return None                         # neither a flux nor a usable limit
    return LineFlux(ul, e, True)


def _from_blend(result, names) -> LineFlux | None:
    if not all(n in result for n in names):
        return None
    f, e = result.sum_flux(names)
    if not np.isfinite(f):
        return None                         # a component not covered
    snr = f / e if (np.isfinite(e) and e > 0) else (np.inf if f > 0 else np.nan)
    if snr >= DETECT_SNR:                   # False for NaN
        return LineFlux(float(f), float(e), False)
    ul = LIMIT_SIGMA * e
    return LineFlux(float(ul), float(e), True) if np.isfinite(ul) and ul > 0 else None


def line_fluxes_from_fit(result) -> dict[str, LineFlux]:
    """The BPT / abundance fluxes of a :class:`~specred.analysis.LineFitResult`.

    Keys (see :data:`FLUX_KEYS`): 'Hbeta', 'OIII_4959', 'OIII_5007', 'OI_6300', 'Halpha',
    'NII_6584', 'SII' (6717+6731) and 'OII_3727' (3726+3729); blends are summed with
    ``result.sum_flux`` (flux covariance included).  A line with S/N < 3 (``detected``
    False) becomes an upper limit: its ``flux_upper_limit`` when finite, else 3 ``flux_err``;
    a blend is detected when its summed S/N >= 3, else an upper limit of 3σ.  A line that
    was not fitted or is not covered by the spectrum (or has neither a flux nor a usable
    limit) is absent from the dictionary.
    """
    out: dict[str, LineFlux] = {}
    for key in FLUX_KEYS:
        if key in BLENDS:
            lf = _from_blend(result, BLENDS[key])
        else:
            lf = _from_single(result[key]) if key in result else None
        if lf is not None:
            out[key] = lf
    return out


def validate_fluxes(fluxes) -> dict[str, LineFlux]:
    """Check a flux dictionary and return it as ``{key: LineFlux}``.

    Values may be :class:`LineFlux` or tuples ``(flux, err[, upper_limit])``; ``None``
    means absent.  Raises :class:`~specred.errors.SpectrumError` for an unknown key, a
    non-finite flux, a detected flux <= 0 (pass an undetected line as an upper limit), a
    non-finite or negative error of a detection, or an upper limit <= 0."""
    if not isinstance(fluxes, Mapping):
        raise SpectrumError(f"line fluxes must be a mapping {{line: LineFlux}}, not {type(fluxes).__name__}")
    out = {}
    for key, v in fluxes.items():
        if key not in FLUX_KEYS:
            raise SpectrumError(f"unknown line key {key!r}; expected some of {', '.join(FLUX_KEYS)}")
        if v is None:
            continue
        if not isinstance(v, LineFlux):
            try:
                v = LineFlux(*v)
            except TypeError as exc:
                raise SpectrumError(f"{key}: expected a LineFlux or (flux, err[, upper_limit]), got {v!r}") from exc
        try:
            f, e, ul = float(v.flux), float(v.err), bool(v.upper_limit)
        except (TypeError, ValueError) as exc:
            raise SpectrumError(f"{key}: flux and error must be numbers, got {v!r}") from exc
        if not np.isfinite(f):
            raise SpectrumError(f"{key}: flux is {f}; leave a line that is not measured out of the dictionary")
        if ul:
            if f <= 0:
                raise SpectrumError(f"{key}: an upper limit must be > 0, got {f:g}")
        else:
            if f <= 0:
                raise SpectrumError(f"{key}: detected flux {f:g} is not positive; pass an undetected line as an "
                                    "upper limit, LineFlux(3*err, err, upper_limit=True)")
            if not (np.isfinite(e) and e >= 0):
                raise SpectrumError(f"{key}: the flux error of a detection must be finite and >= 0, got {e}")
        out[key] = LineFlux(f, e, ul)
    return out


# --------------------------------------------------------------------------- demarcations
def _hyperbola(x, coef):
    a, x0, c = coef
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / (np.asarray(x, dtype=float) - x0) + c


def _curve_out(x, coef):
    """The curve left of its asymptote, NaN on or right of it."""
    xa = np.asarray(x, dtype=float)
    y = np.where(xa < coef[1], _hyperbola(xa, coef), np.nan)
    return float(y) if y.ndim == 0 else y


def kauffmann03_nii(x):
    """Kauffmann et al. (2003, eq. 1): log([O III]/Hβ) = 0.61/(log([N II]/Hα) − 0.05) + 1.30.

    Vectorised; NaN for x >= 0.05 (right of the asymptote every point is above)."""
    return _curve_out(x, _KA03_NII)


def kewley01_nii(x):
    """Kewley et al. (2001, eq. 5) maximum starburst, [N II]: 0.61/(x − 0.47) + 1.19 (NaN for x >= 0.47)."""
    return _curve_out(x, _KE01_NII)


def kewley01_sii(x):
    """Kewley et al. (2001, eq. 6) maximum starburst, [S II]: 0.72/(x − 0.32) + 1.30 (NaN for x >= 0.32)."""
    return _curve_out(x, _KE01_SII)


def kewley01_oi(x):
    """Kewley et al. (2001, eq. 7) maximum starburst, [O I]: 0.73/(x + 0.59) + 1.33 (NaN for x >= −0.59)."""
    return _curve_out(x, _KE01_OI)


def kewley06_sii(x):
    """Kewley et al. (2006, Sect. 4) Seyfert/LINER line, [S II]: y = 1.89 x + 0.76 (Seyfert above)."""
    y = _KE06_SII[0] * np.asarray(x, dtype=float) + _KE06_SII[1]
    return float(y) if y.ndim == 0 else y


def kewley06_oi(x):
    """Kewley et al. (2006, Sect. 4) Seyfert/LINER line, [O I]: y = 1.18 x + 1.30 (Seyfert above)."""
    y = _KE06_OI[0] * np.asarray(x, dtype=float) + _KE06_OI[1]
    return float(y) if y.ndim == 0 else y


def _above(x, y, coef):
    """Above a hyperbola: right of (or on) its asymptote, or above the curve.  Works with ±inf."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    with np.errstate(invalid="ignore"):
        return (x >= coef[1]) | (y > _hyperbola(x, coef))


def _nii_rank(x, y):
    agn = _above(x, y, _KE01_NII)
    sf = ~_above(x, y, _KA03_NII) & ~agn
    return np.where(agn, 2, np.where(sf, 0, 1))


def _mask_nii(xlo, xhi, ylo, yhi):
    """Bit mask of the [N II] classes possible in the rectangle (bit k = NII_CLASSES[k]); 0 = unavailable."""
    ok = ~(np.isnan(xlo) | np.isnan(xhi) | np.isnan(ylo) | np.isnan(yhi))
    rmin = _nii_rank(xlo, ylo)              # the class rank never decreases to the upper right
    rmax = _nii_rank(xhi, yhi)
    mask = np.zeros(np.shape(ok), dtype=int)
    for k in range(3):
        mask |= np.where((rmin <= k) & (k <= rmax), 1 << k, 0)
    return np.where(ok, mask, 0)


def _mask_sii_oi(xlo, xhi, ylo, yhi, ke01, ke06):
    """Bit mask of the SF/Seyfert/LINER classes possible in the rectangle; 0 = unavailable."""
    ok = ~(np.isnan(xlo) | np.isnan(xhi) | np.isnan(ylo) | np.isnan(yhi))
    sf = ~_above(xlo, ylo, ke01)            # the SF region is a lower-left set
    agn = _above(xhi, yhi, ke01)            # the region above Ke01 an upper-right set
    slope, icpt = ke06
    with np.errstate(invalid="ignore"):
        smax = yhi - slope * xlo - icpt     # y - a x is largest at the upper-left corner
        smin = ylo - slope * xhi - icpt
    sey = agn & (smax > 0)
    lin = agn & (smin <= 0)
    mask = sf.astype(int) | (sey.astype(int) << 1) | (lin.astype(int) << 2)
    return np.where(ok, mask, 0)


def _mask_to_class(mask: int, classes) -> str:
    if mask == 0:
        return "unavailable"
    possible = [c for k, c in enumerate(classes) if mask & (1 << k)]
    return possible[0] if len(possible) == 1 else "undetermined"


def _possible(mask: int, classes) -> list[str]:
    return [c for k, c in enumerate(classes) if mask & (1 << k)]


def _point_bounds(x, y, x_limit="", y_limit=""):
    def one(v, lim):
        v = np.asarray(v, dtype=float)
        lim = np.broadcast_to(np.asarray(lim, dtype=object), v.shape)
        lo = np.where(lim == "upper", -np.inf, v)
        hi = np.where(lim == "lower", np.inf, v)
        lo = np.where(lim == "unconstrained", -np.inf, lo)
        hi = np.where(lim == "unconstrained", np.inf, hi)
        return lo, hi
    xlo, xhi = one(x, x_limit)
    ylo, yhi = one(y, y_limit)
    return xlo, xhi, ylo, yhi


def classify_nii(x, y, x_limit="", y_limit=""):
    """[N II]-diagram class(es) of log([N II]/Hα) = x, log([O III]/Hβ) = y.

    ``x_limit``/``y_limit``: '' (measured), 'upper', 'lower' or 'unconstrained'.  Returns
    'SF', 'composite', 'AGN', 'undetermined' (the limits allow more than one) or
    'unavailable' (NaN); a string for scalars, an object array otherwise."""
    m = _mask_nii(*_point_bounds(x, y, x_limit, y_limit))
    out = np.array([_mask_to_class(int(v), NII_CLASSES) for v in np.ravel(m)], dtype=object).reshape(np.shape(m))
    return str(out) if out.ndim == 0 else out


def _classify_so(x, y, x_limit, y_limit, d):
    m = _mask_sii_oi(*_point_bounds(x, y, x_limit, y_limit), _KE01[d], _KE06[d])
    out = np.array([_mask_to_class(int(v), _CLASSES[d]) for v in np.ravel(m)], dtype=object).reshape(np.shape(m))
    return str(out) if out.ndim == 0 else out


def classify_sii(x, y, x_limit="", y_limit=""):
    """[S II]-diagram class: 'SF' (below Ke01), 'Seyfert'/'LINER' (above Ke01, above/below Ke06),
    'undetermined' or 'unavailable'.  Limits as in :func:`classify_nii`."""
    return _classify_so(x, y, x_limit, y_limit, "sii")


def classify_oi(x, y, x_limit="", y_limit=""):
    """[O I]-diagram class: 'SF', 'Seyfert', 'LINER', 'undetermined' or 'unavailable' (see :func:`classify_sii`)."""
    return _classify_so(x, y, x_limit, y_limit, "oi")


# --------------------------------------------------------------------------- combined class
def combine_classes(nii: str | None, sii: str | None = None, oi: str | None = None) -> str:
    """Combined class from decided per-diagram classes (None or 'unavailable' = diagram not available).

    Rules in the module docstring (Kewley et al. 2006, Sect. 4, plus 'AGN'/'undetermined'/
    'unavailable').  'undetermined' per-diagram inputs are not accepted here (the MC and
    :func:`classify_bpt` expand them into the classes still possible)."""
    def norm(c):
        return None if c in (None, "unavailable") else c
    n, others = norm(nii), [c for c in (norm(sii), norm(oi)) if c is not None]
    for c in [n, *others]:
        if c == "undetermined":
            raise SpectrumError("combine_classes needs decided per-diagram classes, not 'undetermined'")
    if n is None:
        if not others:
            return "unavailable"
        if all(c == "SF" for c in others):
            return "undetermined"           # SF vs composite needs the [N II] diagram
        return others[0] if len(set(others)) == 1 else "ambiguous"
    if n == "SF":
        return "SF" if all(c == "SF" for c in others) else "ambiguous"
    if n == "composite":
        return "composite"
    if n != "AGN":
        raise SpectrumError(f"unknown [N II] class {nii!r}")
    if not others:
        return "AGN"
    if len(set(others)) == 1 and others[0] != "SF":
        return others[0]
    return "ambiguous"


def _combine_strict(mn: int, ms: int, mo: int) -> str:
    opts_n = _possible(mn, NII_CLASSES) or [None]
    opts_s = _possible(ms, SII_CLASSES) or [None]
    opts_o = _possible(mo, OI_CLASSES) or [None]
    outcomes = {combine_classes(a, b, c) for a, b, c in product(opts_n, opts_s, opts_o)}
    return outcomes.pop() if len(outcomes) == 1 else "undetermined"


def _combine_masks(mn: int, ms: int, mo: int) -> str:
    """Combined class from the per-diagram masks of possible classes: decided when every
    combination of the possibilities gives one class; otherwise a [S II] or [O I] diagram
    that its limits leave undecided (e.g. an [O I] upper limit, the weakest line) is left
    out rather than vetoing what the decided diagrams agree on."""
    out = _combine_strict(mn, ms, mo)
    if out != "undetermined":
        return out
    ms2 = ms if len(_possible(ms, SII_CLASSES)) <= 1 else 0
    mo2 = mo if len(_possible(mo, OI_CLASSES)) <= 1 else 0
    if (ms2, mo2) != (ms, mo):
        return _combine_strict(mn, ms2, mo2)
    return out


#: combined class code for every (nii mask, sii mask, oi mask)
_COMBINE_TABLE = np.array([[[COMBINED_CLASSES.index(_combine_masks(a, b, c)) for c in range(8)]
                            for b in range(8)] for a in range(8)], dtype=int)


# --------------------------------------------------------------------------- result
@dataclass(frozen=True)
class BPTResult:
    """BPT classification of one object (see the module docstring for every rule).

    ``log_*``: log10 line ratios from the measured fluxes or limits (NaN if unavailable or
    unconstrained), ``*_err`` their 1σ errors (NaN unless both lines are detected),
    ``*_limit``: '' (measured), 'upper', 'lower', 'unconstrained' or 'unavailable'.
    ``bpt_nii``/``bpt_sii``/``bpt_oi``: per-diagram classes; ``prob_*``: MC probabilities
    {class: fraction}, 'undetermined' included (empty when the diagram is unavailable or
    n_mc = 0).  ``bpt_class`` the combined class, ``bpt_prob`` the MC fraction that agrees
    with it, ``class_probs`` the MC fractions of all combined classes.  Dict fields make the
    result unhashable (it is still immutable)."""

    log_nii_ha: float
    log_nii_ha_err: float
    log_nii_ha_limit: str
    log_sii_ha: float
    log_sii_ha_err: float
    log_sii_ha_limit: str
    log_oi_ha: float
    log_oi_ha_err: float
    log_oi_ha_limit: str
    log_oiii_hb: float
    log_oiii_hb_err: float
    log_oiii_hb_limit: str
    bpt_nii: str
    bpt_sii: str
    bpt_oi: str
    prob_nii: dict = field(default_factory=dict)
    prob_sii: dict = field(default_factory=dict)
    prob_oi: dict = field(default_factory=dict)
    bpt_class: str = "unavailable"
    bpt_prob: float = float("nan")
    class_probs: dict = field(default_factory=dict)
    reason: str = ""
    n_mc: int = 0
    seed: int = 0

    def diagram(self, d: str) -> tuple[float, float, float, float, str, str, str]:
        """(x, x_err, y, y_err, x_limit, y_limit, class) of diagram 'nii', 'sii' or 'oi'."""
        if d not in DIAGRAMS:
            raise SpectrumError(f"unknown BPT diagram {d!r}; use one of {', '.join(DIAGRAMS)}")
        c = _X_COL[d]
        return (getattr(self, c), getattr(self, c + "_err"), self.log_oiii_hb, self.log_oiii_hb_err,
                getattr(self, c + "_limit"), self.log_oiii_hb_limit, getattr(self, "bpt_" + d))

    def to_row(self) -> dict:
        """Flat row: the ratios (+ _err, _limit), bpt_nii/bpt_sii/bpt_oi with bpt_*_prob (MC
        fraction of the assigned class), bpt_class, bpt_prob, bpt_p_<class> for every
        combined class and bpt_reason."""
        row = {}
        for c in ("log_nii_ha", "log_sii_ha", "log_oi_ha", "log_oiii_hb"):
            row[c] = getattr(self, c)
            row[c + "_err"] = getattr(self, c + "_err")
            row[c + "_limit"] = getattr(self, c + "_limit")
        for d in DIAGRAMS:
            cls = getattr(self, "bpt_" + d)
            probs = getattr(self, "prob_" + d)
            row["bpt_" + d] = cls
            row["bpt_" + d + "_prob"] = float(probs.get(cls, np.nan)) if probs else float("nan")
        row["bpt_class"] = self.bpt_class
        row["bpt_prob"] = self.bpt_prob
        for c in COMBINED_CLASSES:
            row["bpt_p_" + c] = float(self.class_probs.get(c, np.nan)) if self.class_probs else float("nan")
        row["bpt_reason"] = self.reason
        return row


def _ratio_bounds(num, num_ul, den, den_ul):
    """(value, lo, hi) of log10(num/den) given flux values and upper-limit flags (arrays)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log10(num / den)
    lo = np.where(num_ul, -np.inf, r)
    hi = np.where(den_ul, np.inf, r)
    return r, lo, hi


def _limit_kind(num: LineFlux | None, den: LineFlux | None) -> str:
    if num is None or den is None:
        return "unavailable"
    if num.upper_limit and den.upper_limit:
        return "unconstrained"
    if num.upper_limit:
        return "upper"
    if den.upper_limit:
        return "lower"
    return ""


def _log_err(num: LineFlux, den: LineFlux) -> float:
    if num.upper_limit or den.upper_limit:
        return float("nan")
    return float(np.hypot(num.err / num.flux, den.err / den.flux) / np.log(10.0))


_DIAGRAM_LINES = {"nii": ("NII_6584", "Halpha"), "sii": ("SII", "Halpha"), "oi": ("OI_6300", "Halpha")}
_Y_LINES = ("OIII_5007", "Hbeta")


def _masks(vals: dict, uls: dict) -> dict:
    """Per-diagram class masks from arrays of flux values / upper-limit flags (missing key = absent)."""
    def bounds(a, b):
        if a not in vals or b not in vals:
            n = len(next(iter(vals.values()))) if vals else 1
            nan = np.full(n, np.nan)
            return nan, nan, nan
        return _ratio_bounds(vals[a], uls[a], vals[b], uls[b])
    _, ylo, yhi = bounds(*_Y_LINES)
    out = {}
    for d in DIAGRAMS:
        _, xlo, xhi = bounds(*_DIAGRAM_LINES[d])
        out[d] = _mask_nii(xlo, xhi, ylo, yhi) if d == "nii" else _mask_sii_oi(xlo, xhi, ylo, yhi, _KE01[d], _KE06[d])
    return out


def _mc_draws(fl: dict[str, LineFlux], n_mc: int, seed: int):
    """Draws of every line: detected ~ N(flux, err) (non-positive -> limit 3 err), limits fixed."""
    rng = np.random.default_rng(seed)
    vals, uls = {}, {}
    for key in FLUX_KEYS:                   # fixed order: a line's draws do not depend on the others
        z = rng.standard_normal(n_mc)
        if key not in fl:
            continue
        lf = fl[key]
        if lf.upper_limit:
            vals[key], uls[key] = np.full(n_mc, lf.flux), np.ones(n_mc, bool)
            continue
        err = lf.err if lf.err > 0 else 0.0
        v = lf.flux + err * z
        bad = v <= 0
        vals[key] = np.where(bad, LIMIT_SIGMA * err, v)   # err > 0 whenever a draw is <= 0
        uls[key] = bad
    return vals, uls


def _explain(n: str, s: str, o: str, combined: str, missing: dict) -> str:
    parts = []
    for d, c in (("nii", n), ("sii", s), ("oi", o)):
        txt = f"{_LABEL[d]}: {c}"
        if c == "unavailable" and missing.get(d):
            txt += f" ({', '.join(missing[d])} missing)"
        parts.append(txt)
    head = "; ".join(parts)
    others = [c for c in (s, o) if c not in ("unavailable",)]
    if combined == "SF":
        why = "SF in [N II] and in every other available diagram"
    elif combined == "composite":
        why = "between Ka03 and Ke01 in [N II] (Ke06 define composites on the [N II] diagram alone)"
        if any(c in ("Seyfert", "LINER") for c in others):
            agn_in = [_LABEL[d] for d, c in (("sii", s), ("oi", o)) if c in ("Seyfert", "LINER")]
            why += "; note: above Ke01 in " + ", ".join(agn_in)
    elif combined in ("Seyfert", "LINER"):
        why = (f"above Ke01 and on the {combined} side of the Ke06 line in the available [S II]/[O I] diagrams"
               + ("" if n == "AGN" else "; [N II] diagram not used (" + n + ")"))
    elif combined == "AGN":
        why = "above Ke01 in [N II]; no [S II]/[O I] diagram to separate Seyfert from LINER"
    elif combined == "ambiguous":
        why = "the diagrams disagree (Kewley et al. 2006 'ambiguous')"
    elif combined == "undetermined":
        if n == "unavailable" and all(c in ("SF", "unavailable") for c in (s, o)):
            why = "SF vs composite cannot be decided without the [N II] diagram"
        else:
            why = "upper limits leave several classes possible"
    else:
        why = "no diagram available (needs Hβ, [O III] 5007, Hα and one of [N II], [S II], [O I])"
    return f"{combined}: {why}. {head}"


def check_n_mc(n_mc) -> int:
    """The number of Monte-Carlo draws as an int >= 0, or a SpectrumError."""
    try:
        n = int(n_mc)
    except (TypeError, ValueError) as exc:
        raise SpectrumError(f"n_mc must be an integer >= 0, got {n_mc!r}") from exc
    if n < 0:
        raise SpectrumError(f"n_mc must be an integer >= 0, got {n}")
    return n


def classify_bpt(fluxes, n_mc: int = 500, seed: int = 0) -> BPTResult:
    """BPT classification of one object from a flux dictionary (:func:`line_fluxes_from_fit`).

    ``fluxes``: {key: LineFlux} with keys from :data:`FLUX_KEYS` (absent = not covered);
    ``n_mc`` Monte-Carlo draws (0: no probabilities), ``seed`` of the generator.
    Raises :class:`~specred.errors.SpectrumError` for malformed fluxes (see
    :func:`validate_fluxes`).  All rules (limits, combined class, MC) are in the module
    docstring."""
    fl = validate_fluxes(fluxes)
    n_mc = check_n_mc(n_mc)

    # measured point (ratios of the fluxes or limits)
    vals = {k: np.array([v.flux]) for k, v in fl.items()}
    uls = {k: np.array([v.upper_limit]) for k, v in fl.items()}
    masks = _masks(vals, uls)
    classes = {d: _mask_to_class(int(masks[d][0]), _CLASSES[d]) for d in DIAGRAMS}
    combined = COMBINED_CLASSES[_COMBINE_TABLE[masks["nii"][0], masks["sii"][0], masks["oi"][0]]]

    ratios = {}
    for col, (a, b) in (("log_nii_ha", _DIAGRAM_LINES["nii"]), ("log_sii_ha", _DIAGRAM_LINES["sii"]),
                        ("log_oi_ha", _DIAGRAM_LINES["oi"]), ("log_oiii_hb", _Y_LINES)):
        na, nb = fl.get(a), fl.get(b)
        kind = _limit_kind(na, nb)
        if kind in ("unavailable", "unconstrained"):
            ratios[col] = (float("nan"), float("nan"), kind)
        else:
            ratios[col] = (float(np.log10(na.flux / nb.flux)), _log_err(na, nb), kind)

    # Monte Carlo
    probs = {d: {} for d in DIAGRAMS}
    class_probs: dict = {}
    bpt_prob = float("nan")
    if n_mc > 0 and fl:
        mv, mu = _mc_draws(fl, n_mc, seed)
        mm = _masks(mv, mu)
        for d in DIAGRAMS:
            if classes[d] == "unavailable":
                continue
            names = [_mask_to_class(k, _CLASSES[d]) for k in range(8)]
            lab = np.array(names, dtype=object)[mm[d]]
            probs[d] = {c: float(np.mean(lab == c)) for c in (*_CLASSES[d], "undetermined")}
        codes = _COMBINE_TABLE[mm["nii"], mm["sii"], mm["oi"]]
        class_probs = {c: float(np.mean(codes == i)) for i, c in enumerate(COMBINED_CLASSES)}
        bpt_prob = class_probs[combined] if combined != "unavailable" else float("nan")

    # reason
    missing = {d: [k for k in (*_DIAGRAM_LINES[d], *_Y_LINES) if k not in fl] for d in DIAGRAMS}
    reason = _explain(classes["nii"], classes["sii"], classes["oi"], combined, missing)
    notes = []
    for d in DIAGRAMS:
        if classes[d] == "undetermined":
            notes.append(f"{_LABEL[d]} could be {' or '.join(_possible(int(masks[d][0]), _CLASSES[d]))}")
    for col, (_, _, kind) in ratios.items():
        if kind in ("upper", "lower", "unconstrained"):
            a, b = {"log_nii_ha": _DIAGRAM_LINES["nii"], "log_sii_ha": _DIAGRAM_LINES["sii"],
                    "log_oi_ha": _DIAGRAM_LINES["oi"], "log_oiii_hb": _Y_LINES}[col]
            und = [k for k in (a, b) if fl[k].upper_limit]
            what = {"unconstrained": "unconstrained", "upper": "an upper limit", "lower": "a lower limit"}[kind]
            notes.append(f"{'/'.join(und)} undetected: {col} is {what}")
    if notes:
        reason += " (" + "; ".join(notes) + ")"

    return BPTResult(
        log_nii_ha=ratios["log_nii_ha"][0], log_nii_ha_err=ratios["log_nii_ha"][1],
        log_nii_ha_limit=ratios["log_nii_ha"][2],
        log_sii_ha=ratios["log_sii_ha"][0], log_sii_ha_err=ratios["log_sii_ha"][1],
        log_sii_ha_limit=ratios["log_sii_ha"][2],
        log_oi_ha=ratios["log_oi_ha"][0], log_oi_ha_err=ratios["log_oi_ha"][1],
        log_oi_ha_limit=ratios["log_oi_ha"][2],
        log_oiii_hb=ratios["log_oiii_hb"][0], log_oiii_hb_err=ratios["log_oiii_hb"][1],
        log_oiii_hb_limit=ratios["log_oiii_hb"][2],
        bpt_nii=classes["nii"], bpt_sii=classes["sii"], bpt_oi=classes["oi"],
        prob_nii=probs["nii"], prob_sii=probs["sii"], prob_oi=probs["oi"],
        bpt_class=combined, bpt_prob=bpt_prob, class_probs=class_probs, reason=reason,
        n_mc=n_mc, seed=int(seed))


# --------------------------------------------------------------------------- plot
_XRANGE = {"nii": (-2.0, 0.8), "sii": (-1.4, 0.8), "oi": (-2.4, 0.2)}
_YRANGE = (-1.3, 1.6)
_XLABEL = {"nii": r"log([N II] 6584 / H$\alpha$)", "sii": r"log([S II] 6717+6731 / H$\alpha$)",
           "oi": r"log([O I] 6300 / H$\alpha$)"}


def _seyfert_liner_start(d: str) -> float:
    """x where the Ke06 line meets the left branch of Ke01 (the Ke06 line is drawn from there on)."""
    a, x0, c = _KE01[d]
    m, b = _KE06[d]
    # (m x + b - c)(x - x0) = a  ->  m x^2 + (b - c - m x0) x - (b - c) x0 - a = 0
    roots = np.roots([m, b - c - m * x0, -(b - c) * x0 - a])
    roots = roots[np.isreal(roots)].real
    left = roots[roots < x0]
    return float(left.max()) if left.size else _XRANGE[d][0]


def _draw_lines(ax, d: str, xlim):
    if d == "nii":
        x = np.linspace(xlim[0], _KA03_NII[1] - 1e-3, 400)
        ax.plot(x, kauffmann03_nii(x), "k-", lw=1.2, label="Kauffmann+03")
        x = np.linspace(xlim[0], _KE01_NII[1] - 1e-3, 400)
        ax.plot(x, kewley01_nii(x), "k--", lw=1.2, label="Kewley+01")
        return
    coef = _KE01[d]
    x = np.linspace(xlim[0], coef[1] - 1e-3, 400)
    ax.plot(x, _curve_out(x, coef), "k-", lw=1.2, label="Kewley+01")
    x = np.linspace(max(xlim[0], _seyfert_liner_start(d)), xlim[1], 50)
    f = kewley06_sii if d == "sii" else kewley06_oi
    ax.plot(x, f(x), "k--", lw=1.2, label="Kewley+06 Seyfert/LINER")


_ARROW = {"upper": -1.0, "lower": 1.0}


def plot_bpt(results, labels=None, ax=None, path=None, title: str | None = None):
    """The three BPT diagrams (Solarz et al. 2020, Fig. 7 style) with the objects on them.

    ``results``: a :class:`BPTResult` or a sequence of them; ``labels``: one legend label
    per result; ``ax``: three matplotlib Axes to draw into (default: a new 1×3 Figure on
    an Agg canvas, no pyplot); ``path``: save the figure there (PNG, PDF, ... by suffix).
    Lines: [N II] panel Ka03 solid, Ke01 dashed; [S II] and [O I] panels Ke01 solid, Ke06
    Seyfert/LINER dashed.  Points carry 1σ error bars; a limit is drawn as an arrow in the
    direction of the allowed values; a ratio that is unavailable or unconstrained keeps the
    object off that panel.  Returns the Figure."""
    from matplotlib.figure import Figure

    if isinstance(results, BPTResult):
        results = [results]
    results = list(results)
    for r in results:
        if not isinstance(r, BPTResult):
            raise SpectrumError(f"plot_bpt needs BPTResult objects, got {type(r).__name__}")
    if labels is None:
        labels = [f"object {i + 1}" for i in range(len(results))]
    labels = list(labels)
    if len(labels) != len(results):
        raise SpectrumError(f"plot_bpt: {len(labels)} labels for {len(results)} results")
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        fig = Figure(figsize=(15.0, 5.0))
        FigureCanvasAgg(fig)
        axes = list(fig.subplots(1, 3, sharey=True))
    else:
        axes = list(ax)
        if len(axes) != 3:
            raise SpectrumError(f"plot_bpt needs 3 Axes ([N II], [S II], [O I]), got {len(axes)}")
        fig = axes[0].figure

    colours = [f"C{i % 10}" for i in range(len(results))]
    y_all = [r.log_oiii_hb for r in results if np.isfinite(r.log_oiii_hb)]
    ylim = (min([_YRANGE[0], *[v - 0.3 for v in y_all]]), max([_YRANGE[1], *[v + 0.3 for v in y_all]]))
    for i, d in enumerate(DIAGRAMS):
        a = axes[i]
        xs = [r.diagram(d)[0] for r in results if np.isfinite(r.diagram(d)[0])]
        xlim = (min([_XRANGE[d][0], *[v - 0.3 for v in xs]]), max([_XRANGE[d][1], *[v + 0.3 for v in xs]]))
        _draw_lines(a, d, xlim)
        for r, lab, col in zip(results, labels, colours):
            x, xe, y, ye, xl, yl, cls = r.diagram(d)
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            a.errorbar(x, y, xerr=xe if np.isfinite(xe) else None, yerr=ye if np.isfinite(ye) else None,
                       fmt="o", color=col, ms=6, capsize=2, label=f"{lab} ({cls})")
            for kind, dx, dy in ((xl, 0.25, 0.0), (yl, 0.0, 0.25)):
                if kind in _ARROW:
                    s = _ARROW[kind]
                    a.annotate("", xy=(x + s * dx, y + s * dy), xytext=(x, y),
                               arrowprops=dict(arrowstyle="->", color=col, lw=1.5))
        a.set_xlim(*xlim)
        a.set_ylim(*ylim)
        a.set_xlabel(_XLABEL[d])
        a.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel(r"log([O III] 5007 / H$\beta$)")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(Path(path), dpi=110, bbox_inches="tight")
    return fig
