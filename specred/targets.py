"""Target lists: read a user's list (or the programme's) and match spectra to it by position.

A target list is an ECSV or CSV table with at least the columns ``id``, ``ra`` and ``dec``
(decimal degrees, ICRS/J2000, or sexagesimal strings ``hh:mm:ss.s`` / ``±dd:mm:ss``);
optional ``z`` (catalogue redshift) and ``classification`` are carried into the products and
the report.  The default is the programme's list, ``examples/targets.ecsv`` (the 36 targets
of Solarz et al. 2020, Table 2, with their published redshifts).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from ._resources import example_path
from .errors import SpecredError

__all__ = ["TargetList", "Match", "load_targets", "DEFAULT_RADIUS_ARCSEC"]

#: Pointing of the NTT (acquisition on a faint target) is good to a few arcsec; the
#: programme's targets are isolated AllWISE sources, so 10" is safe and unambiguous.
DEFAULT_RADIUS_ARCSEC = 10.0


@dataclass(frozen=True)
class Match:
    id: str
    sep_arcsec: float
    z: float = float("nan")
    classification: str = ""


class TargetList:
    """Positions (and optional redshifts) of the targets; :meth:`match` finds the nearest."""

    def __init__(self, table: Table, source: str = "", radius_arcsec: float = DEFAULT_RADIUS_ARCSEC):
        cols = {c.lower(): c for c in table.colnames}
        missing = [c for c in ("id", "ra", "dec") if c not in cols]
        if missing:
            raise SpecredError(f"target list {source or ''} lacks column(s) {', '.join(missing)}; "
                               f"needs id, ra, dec (found: {', '.join(table.colnames)})")
        self.source = source
        self.radius = float(radius_arcsec)
        self.ids = np.array([str(v).strip() for v in table[cols["id"]]])
        if len(self.ids) == 0:
            raise SpecredError(f"target list {source} is empty")
        ra, dec = table[cols["ra"]], table[cols["dec"]]
        try:
            if ra.dtype.kind in "fiu" and dec.dtype.kind in "fiu":
                self.coords = SkyCoord(np.asarray(ra, float) * u.deg, np.asarray(dec, float) * u.deg)
            else:
                self.coords = SkyCoord([str(a) for a in ra], [str(d) for d in dec], unit=(u.hourangle, u.deg))
        except (ValueError, TypeError) as exc:
            raise SpecredError(f"target list {source}: cannot read the coordinates ({exc})") from exc
        self.z = np.asarray(table[cols["z"]], float) if "z" in cols else np.full(len(self.ids), np.nan)
        self.cls = (np.array([str(v) for v in table[cols["classification"]]]) if "classification" in cols
                    else np.full(len(self.ids), ""))

    def __len__(self) -> int:
        return len(self.ids)

    def match(self, ra: float | None, dec: float | None) -> Match | None:
        """The nearest target within the matching radius of (ra, dec) in degrees, or None."""
        if ra is None or dec is None or not (np.isfinite(ra) and np.isfinite(dec)):
            return None
        c = SkyCoord(float(ra) * u.deg, float(dec) * u.deg)
        sep = c.separation(self.coords).arcsec
        i = int(np.argmin(sep))
        if sep[i] > self.radius:
            return None
        return Match(str(self.ids[i]), float(sep[i]), float(self.z[i]), str(self.cls[i]))

    def fingerprint(self) -> str:
        """Short text that changes when the list (ids, positions, radius) changes."""
        import hashlib

        h = hashlib.sha256()
        h.update(f"{self.radius:.3f}".encode())
        for i, c, z in zip(self.ids, self.coords, self.z):
            h.update(f"{i}|{c.ra.deg:.6f}|{c.dec.deg:.6f}|{z:.5f}".encode())
        return h.hexdigest()[:16]


def load_targets(path: str | Path | None = None, *, radius_arcsec: float = DEFAULT_RADIUS_ARCSEC) -> TargetList:
    """Read a target list (ECSV or CSV; default: the programme's ``examples/targets.ecsv``)."""
    p = example_path("targets.ecsv") if path is None else Path(path)
    if not p.exists():
        raise SpecredError(f"target list {p} does not exist")
    fmt = "ascii.ecsv" if p.suffix.lower() == ".ecsv" else ("ascii.csv" if p.suffix.lower() == ".csv" else None)
    try:
        t = Table.read(p, format=fmt) if fmt else Table.read(p)
    except Exception as exc:  # astropy raises many kinds for unreadable tables
        raise SpecredError(f"target list {p}: cannot read it as ECSV/CSV ({exc})") from exc
    return TargetList(t, source=str(p), radius_arcsec=radius_arcsec)
