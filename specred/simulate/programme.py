"""The programme's target list and observing log (Solarz et al. 2020, A&A 642, A103),
shipped with the package for the simulator and the demo."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from astropy.table import Table


def _read(name: str) -> Table:
    with resources.as_file(resources.files("specred.simulate") / "data" / name) as p:
        return Table.read(p, format="ascii.ecsv")


@lru_cache(maxsize=None)
def programme_targets() -> Table:
    """36 targets: object_id, ra, dec (deg), classification, z, z_err, wolf_rayet,
    log_nii_oii, oh12 (Tables 2 and 3 of the paper)."""
    return _read("programme_targets.ecsv")


@lru_cache(maxsize=None)
def programme_obslog() -> Table:
    """Observing log: object_id, instrument (EFOSC2/SOFI), ut_start, exptime, airmass_start/end."""
    return _read("programme_obslog.ecsv")
