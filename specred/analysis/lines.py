"""The rest-frame line catalogue as the analysis uses it.

Wavelengths come from ``calib/emission_lines.ecsv`` (vacuum and air, with a citation per
line; see :func:`specred.calib.emission_lines`).  This module adds what a fit needs on top:
which lines are tied by atomic physics and line sets used again and again.

Fixed doublet ratios (emissivity ratios set by the transition probabilities, independent
of the physical conditions): [O III] 5007/4959 = 2.98 and [N II] 6584/6548 = 3.05
(Storey & Zeippen 2000, MNRAS 312, 813), [O I] 6300/6364 = 3.05 (same source; used only
when both lines are fitted).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .. import calib
from ..errors import SpectrumError

#: (strong, weak) -> strong/weak flux ratio fixed by atomic physics (Storey & Zeippen 2000)
FIXED_RATIOS = {
    ("OIII_5007", "OIII_4959"): 2.98,
    ("NII_6584", "NII_6548"): 3.05,
    ("OI_6300", "OI_6364"): 3.05,
}

#: the BPT line set (Baldwin, Phillips & Terlevich 1981; Kewley et al. 2006)
BPT_LINES = ("Hbeta", "OIII_4959", "OIII_5007", "OI_6300", "NII_6548", "Halpha", "NII_6584",
             "SII_6717", "SII_6731")

#: narrow emission lines of H II regions and narrow-line regions used for galaxy redshifts
NARROW_EMISSION = ("OII_3726", "OII_3729", "NeIII_3869", "Hdelta", "Hgamma", "Hbeta", "OIII_4959",
                   "OIII_5007", "HeI_5876", "OI_6300", "NII_6548", "Halpha", "NII_6584", "SII_6717",
                   "SII_6731", "ArIII_7136", "SIII_9069", "SIII_9531", "HeI_10830", "Pagamma",
                   "Pabeta", "FeII_12570", "FeII_16440", "Paalpha")

#: broad permitted lines of type-1 AGN / QSOs
BROAD_EMISSION = ("Lya", "NV_1240", "SiIV_1400", "CIV_1549", "HeII_1640", "AlIII_1857", "CIII_1909",
                  "MgII_2800", "Hdelta", "Hgamma", "Hbeta", "Halpha", "Pagamma", "Pabeta", "Paalpha")

#: Balmer / Paschen lines that old stellar populations also show in absorption
BALMER = ("Hdelta", "Hgamma", "Hbeta", "Halpha", "Hepsilon", "H8")


@lru_cache(maxsize=1)
def _catalogue():
    t = calib.emission_lines()
    return {str(r["name"]): (float(r["wave_vac"]), float(r["wave_air"]), str(r["label"]), str(r["kind"]),
                             bool(r["broad"]), str(r["group"])) for r in t}


def line_names() -> list[str]:
    """All line names of the catalogue."""
    return list(_catalogue())


def rest_wavelength(name: str, medium: str = "vacuum") -> float:
    """Rest wavelength (Å) of a catalogue line in 'vacuum' or 'air'."""
    cat = _catalogue()
    if name not in cat:
        raise SpectrumError(f"unknown line {name!r}; known lines: {', '.join(cat)}")
    if medium not in ("vacuum", "air"):
        raise SpectrumError(f"medium must be 'vacuum' or 'air', not {medium!r}")
    return cat[name][0] if medium == "vacuum" else cat[name][1]


def emission_rest_vac() -> np.ndarray:
    """Vacuum rest wavelengths (Å) of every catalogue line that can appear in emission."""
    return np.array([v[0] for v in _catalogue().values() if v[3] in ("emission", "both")])


def rest_vac(names) -> np.ndarray:
    return np.array([rest_wavelength(n) for n in names])


def kind(name: str) -> str:
    """'emission', 'absorption' or 'both' (the catalogue's kind column)."""
    return _catalogue()[name][3] if name in _catalogue() else "emission"


def label(name: str) -> str:
    return _catalogue()[name][2] if name in _catalogue() else name


@lru_cache(maxsize=1)
def _lower_names() -> dict:
    return {k.lower(): k for k in _catalogue()}


def check_names(names) -> list[str]:
    """Validate line names; accept case-insensitive names."""
    cat = _catalogue()
    low = _lower_names()
    out = []
    for n in names:
        key = low.get(str(n).lower())
        if key is None:
            raise SpectrumError(f"unknown line {n!r}; known lines: {', '.join(cat)}")
        out.append(key)
    return out


def ratio_ties(names) -> dict[str, tuple[str, float]]:
    """{weak: (strong, strong/weak ratio)} for the fixed doublets present in ``names``."""
    s = set(names)
    return {weak: (strong, r) for (strong, weak), r in FIXED_RATIOS.items() if strong in s and weak in s}
