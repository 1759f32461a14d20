"""`inspect` on a simulated night: every frame classified as the truth says; the CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from astropy.table import Table

from specred.discover import discover, inspect_report

TRUTH_TO_TYPE = {"bias": "bias", "flat": "flat", "lamp_off_flat": "lamp_off_flat", "arc": "arc",
                 "flux_standard": "flux_standard", "telluric": "telluric_standard", "science": "science"}


def test_every_simulated_frame_is_classified_correctly(sim_night):
    truth = Table.read(sim_night.out / "truth" / "frames.ecsv")
    res = discover(sim_night.out / "raw")
    assert not res.problems
    by_name = {p.split("/")[-1]: f for f in res.frames for p in [str(f.path)]}
    assert len(by_name) == len(truth)
    for row in truth:
        f = by_name[row["file"]]
        assert f.instrument == row["instrument"], row["file"]
        assert f.frame_type == TRUTH_TO_TYPE[row["type"]], row["file"]
        if row["nod"]:
            assert f.nod == row["nod"], row["file"]
        assert np.isclose(f.exptime, row["exptime"], atol=0.01)
    sofi_sci = [f for f in res.frames if f.instrument == "SOFI" and f.frame_type == "science"]
    assert all(f.setup.startswith("GB") for f in sofi_sci)


def test_inspect_report_groups_and_warns_nothing_for_a_complete_night(sim_night):
    res = discover(sim_night.out / "raw")
    text = inspect_report(res)
    assert "EFOSC2" in text and "SOFI" in text
    assert "Gr#13" in text
    assert "Traceback" not in text
    assert not [w for w in res.warnings() if "no arc" in w or "no flat" in w]


def test_inspect_cli_reports_a_bad_file_in_one_line(sim_night, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(sim_night.out / "raw", raw)
    victim = sorted(raw.glob("EFOSC*.fits"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    (raw / "notes.fits").write_text("not a fits file")
    out = subprocess.run([sys.executable, "-m", "specred.cli", "inspect", str(raw)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if victim.name in ln and "truncated" in ln.lower()]
    assert len(lines) == 1
    assert any("notes.fits" in ln and "not a FITS" in ln for ln in out.stdout.splitlines())
    assert "Traceback" not in out.stdout + out.stderr


def test_inspect_cli_on_missing_folder_is_a_clean_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "specred.cli", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "specred: error:" in out.stderr
