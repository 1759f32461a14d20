"""`specred reduce` as users meet it: raw files untouched, reruns reuse up-to-date products,
a killed run finishes identically when started again, clear errors for empty, unwritable or
full output, target-list naming."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from specred.cli import main
from specred.io import sha256
from specred.pipeline import reduce_night
from specred.simulate import simulate_night


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust")
    simulate_night(out, night="2018-12-05", instrument="efosc2", seed=7)
    return out


@pytest.fixture(scope="module")
def reference(night, tmp_path_factory):
    """An uninterrupted run, and the raw hashes before it."""
    before = {p.name: sha256(p) for p in (night / "raw").iterdir()}
    out = tmp_path_factory.mktemp("ref") / "red"
    res = reduce_night(night / "raw", out, report=False)
    return out, res, before


def _digests(out: Path) -> dict:
    files = [*sorted((out / "spectra").glob("*.fits")), *sorted((out / "calibrations").glob("*")), out / "night.ecsv"]
    return {str(p.relative_to(out)): sha256(p) for p in files}


def test_raw_files_are_never_modified(night, reference):
    _, _, before = reference
    after = {p.name: sha256(p) for p in (night / "raw").iterdir()}
    assert after == before


def test_products_are_named_after_the_target_list(reference, tmp_path, night):
    out, res, _ = reference
    tab = res.table
    sci = tab[tab["kind"] == "science"]
    assert len(sci) and all(sci["match_id"] == sci["target"])          # programme ids
    assert np.all(sci["match_sep_arcsec"] < 10) and np.all(np.isfinite(sci["z_cat"]))
    hdr = fits.getheader(out / sci["file"][0])
    assert hdr["HIERARCH SPECRED CATID"] == sci["target"][0]
    # a user list that renames one target by its position; the others stay unmatched
    first = sci["target"][0]
    ra, dec = hdr["RA"], hdr["DEC"]
    Table({"id": ["MyFavourite"], "ra": [ra], "dec": [dec]}).write(tmp_path / "mine.csv", format="ascii.csv")
    res2 = reduce_night(night / "raw", tmp_path / "red", targets=tmp_path / "mine.csv", report=False)
    names = set(res2.table["target"][res2.table["kind"] == "science"])
    assert "MyFavourite" in names and first not in names
    assert (tmp_path / "red" / "spectra" / "MyFavourite_EFOSC2.fits").exists()
    assert len(names) == len(sci)                                       # unmatched: OBJECT names


def test_rerun_reuses_up_to_date_products_and_force_redoes_them(night, reference, tmp_path):
    out = tmp_path / "red"
    shutil.copytree(reference[0], out)
    res = reduce_night(night / "raw", out, report=False)
    assert "cosmics" not in res.timings and "wavecal" not in res.timings     # nothing recomputed
    assert _digests(out) == _digests(reference[0])
    assert "reused" in (out / "specred.log").read_text()
    res = reduce_night(night / "raw", out, report=False, force=True)
    assert "cosmics" in res.timings
    assert _digests(out) == _digests(reference[0])                         # deterministic
    # a changed parameter invalidates the products
    res = reduce_night(night / "raw", out, report=False, config={"extract": {"nsigma": 6.0}})
    assert "extract" in res.timings


def test_killed_run_finishes_identically_when_started_again(night, reference, tmp_path):
    out = tmp_path / "red"
    cmd = [sys.executable, "-m", "specred", "reduce", str(night / "raw"), "--out", str(out), "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    # kill it in the middle: once some, not all, science spectra are written
    while time.time() - t0 < 120 and proc.poll() is None:
        if len(list((out / "spectra").glob("*.fits"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "night.ecsv").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _digests(out) == _digests(reference[0])
    assert not list(out.glob("**/.*.part"))


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    assert main(["reduce", str(tmp_path / "raw"), "--out", str(tmp_path / "red")]) != 0
    err = capsys.readouterr().err
    assert "no FITS files found" in err and "Traceback" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_output_is_a_clear_error(night, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["reduce", str(night / "raw"), "--out", str(ro / "red")]) != 0
    finally:
        ro.chmod(0o700)
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_output_inside_a_file_is_a_clear_error(night, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["reduce", str(night / "raw"), "--out", str(tmp_path / "afile" / "red")]) != 0
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_disk_full_while_writing_leaves_no_partial_product(night, tmp_path, capsys, monkeypatch):
    real = fits.HDUList.writeto
    calls = {"n": 0}

    def full(self, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 3:            # the first products fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)

    monkeypatch.setattr(fits.HDUList, "writeto", full)
    out = tmp_path / "red"
    assert main(["reduce", str(night / "raw"), "--out", str(out), "--no-report"]) != 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not list(out.glob("**/.*.part"))
    for f in out.glob("**/*.fits"):                  # what exists is complete
        with fits.open(f) as h:
            h.verify("exception")


def test_saturated_standard_is_not_used_and_the_night_still_reduces(night, tmp_path):
    from specred.simulate.evaluate import Truth

    truth = Truth(night)
    raw = tmp_path / "raw"
    shutil.copytree(night / "raw", raw)
    std = truth.frames[truth.frames["type"] == "flux_standard"][0]
    exp = truth.expected(std["file"])
    with fits.open(raw / std["file"], mode="update") as h:
        d = h[0].data
        rows = np.flatnonzero(np.isfinite(exp["x_centre"]))
        rows = rows[: int(0.6 * rows.size)]                       # 60 % of the rows burnt out
        for dx in (-1, 0, 1):
            d[rows, np.round(exp["x_centre"][rows]).astype(int) + dx] = 65535
    res = reduce_night(raw, tmp_path / "red", report=False)
    assert any(std["file"] in p and "saturated" in p for p in res.problems), res.problems
    tab = res.table
    srow = tab[tab["kind"] == "flux_standard"][0]
    assert "SATURATED" in srow["flags"]
    sci = tab[tab["kind"] == "science"]
    assert len(sci) == len(set(truth.frames["object"][truth.frames["type"] == "science"]))
    assert all("NO_STANDARD" in f for f in sci["flags"])          # nominal sensitivity, said so


def test_science_frame_without_a_trace_is_one_line_and_the_rest_reduces(night, tmp_path):
    frames = Table.read(night / "truth" / "frames.ecsv")
    raw = tmp_path / "raw"
    shutil.copytree(night / "raw", raw)
    sci = frames[frames["type"] == "science"]
    bias = frames[frames["type"] == "bias"][0]
    victim = sci[0]
    with fits.open(raw / victim["file"], mode="update") as h:      # an empty slit: bias only
        h[0].data = fits.getdata(raw / bias["file"])
    res = reduce_night(raw, tmp_path / "red", report=False)
    failed = [r for r in res.table if r["flags"].startswith("FAILED")]
    assert len(failed) == 1 and failed[0]["target"] == victim["object"] and failed[0]["kind"] == "science"
    assert victim["file"] in failed[0]["flags"] and "no object" in failed[0]["flags"]
    ok = {r["target"] for r in res.table if r["kind"] == "science" and not r["flags"].startswith("FAILED")}
    assert ok == set(sci["object"]) - {victim["object"]}
    frames_tab = Table.read(tmp_path / "red" / "frames.ecsv")
    assert len(frames_tab) == len(frames)


def test_frame_with_missing_keywords_is_one_line_and_the_rest_reduces(night, tmp_path):
    frames = Table.read(night / "truth" / "frames.ecsv")
    raw = tmp_path / "raw"
    shutil.copytree(night / "raw", raw)
    sci = frames[frames["type"] == "science"]
    victim = sci[-1]
    with fits.open(raw / victim["file"], mode="update") as h:
        del h[0].header["DATE-OBS"]
    res = reduce_night(raw, tmp_path / "red", report=True)
    lines = [p for p in res.problems if victim["file"] in p]
    assert len(lines) == 1 and "DATE-OBS" in lines[0], res.problems
    ft = Table.read(tmp_path / "red" / "frames.ecsv")
    row = ft[ft["file"] == victim["file"]][0]
    assert not row["used"] and "DATE-OBS" in row["problem"]
    assert victim["file"] in (tmp_path / "red" / "report.html").read_text()
    done = {r["target"] for r in res.table if r["kind"] == "science"}
    assert done == set(sci["object"]) - {victim["object"]}


def test_repeated_exposures_combine_and_a_foreign_file_is_one_line(night, tmp_path):
    import astropy.units as u
    from astropy.time import Time

    frames = Table.read(night / "truth" / "frames.ecsv")
    raw = tmp_path / "raw"
    shutil.copytree(night / "raw", raw)
    sci = frames[frames["type"] == "science"]
    first = sci[0]
    # a second exposure of the first target, 50 minutes later (same pointing, new noise)
    with fits.open(raw / first["file"]) as h:
        hdr = h[0].header.copy()
        data = h[0].data.astype(np.float64)
    rng = np.random.default_rng(1)
    data = np.clip(np.round(data + rng.normal(0.0, 3.0, data.shape)), 0, 65535).astype(np.uint16)
    t = Time(hdr["DATE-OBS"]) + 50 * u.min
    hdr["DATE-OBS"] = t.isot
    hdr["MJD-OBS"] = t.mjd
    name = f"EFOSC.{t.isot}.fits"
    hdr["ARCFILE"] = name
    fits.PrimaryHDU(data, header=hdr).writeto(raw / name)
    # and a file from another telescope
    foreign = fits.Header({"TELESCOP": "ESO-VLT-U1", "INSTRUME": "FORS2", "DATE-OBS": t.isot})
    fits.PrimaryHDU(np.zeros((10, 10), np.float32), header=foreign).writeto(raw / "FORS2.fits")
    res = reduce_night(raw, tmp_path / "red", report=False)
    assert sum("FORS2.fits" in p and "not an NTT frame" in p for p in res.problems) == 1, res.problems
    row = res.table[res.table["target"] == first["object"]][0]
    assert set(row["raw_files"].split(",")) == {first["file"], name}
    assert row["exptime"] == pytest.approx(2 * first["exptime"])
    hdr = fits.getheader(tmp_path / "red" / row["file"])
    assert hdr["NCOMBINE"] == 2 and {hdr["PROV1"], hdr["PROV2"]} == {first["file"], name}
    one = reduce_night(night / "raw", tmp_path / "one", report=False).table
    single = one[one["target"] == first["object"]][0]["snr"]
    assert row["snr"] > 1.2 * single                 # ~sqrt(2) more signal-to-noise
