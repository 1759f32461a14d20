"""Shared fixtures: paths to the reference data and simulated nights (made once per session)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NTT_REF = SHARED / "ntt-reference"
REAL_SPECTRA = SHARED / "real-spectra"


def need_shared(path: Path = SHARED) -> Path:
    """Skip the calling test with a clear reason when the reference data are absent."""
    if not path.exists():
        pytest.skip(f"reference data not available: {path} is absent (CI provides ../shared)")
    return path


@pytest.fixture(scope="session")
def ntt_ref() -> Path:
    return need_shared(NTT_REF)


@pytest.fixture(scope="session")
def sim_night(tmp_path_factory):
    """The demo night (EFOSC2 2018-12-05 + nearest SofI night), seed 0."""
    from specred.simulate import simulate_night

    out = tmp_path_factory.mktemp("night_seed0")
    return simulate_night(out, night="2018-12-05", instrument="both", seed=0)


@pytest.fixture(scope="session")
def sim_spectra(tmp_path_factory):
    from specred.simulate import simulate_spectra

    out = tmp_path_factory.mktemp("spectra")
    return simulate_spectra(out, 40, seed=3, instrument="efosc2")
