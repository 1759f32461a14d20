"""`specred reduce` on a night with both instruments: one command, one table, both media."""
from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table

from specred.cli import main
from specred.simulate import simulate_night


def test_cli_reduces_a_night_of_both_instruments(tmp_path, capsys):
    simulate_night(tmp_path, night="2018-12-05", instrument="both", seed=2)
    truth = Table.read(tmp_path / "truth" / "frames.ecsv")
    assert main(["reduce", str(tmp_path / "raw"), "--out", str(tmp_path / "red")]) == 0
    printed = capsys.readouterr().out
    tab = Table.read(tmp_path / "red" / "night.ecsv")
    assert set(tab["instrument"]) == {"EFOSC2", "SOFI"}
    for inst, window, medium, ctype in (("EFOSC2", "6000-6200", "AIR", "AWAV"),
                                        ("SOFI", "12000-12200", "VACUUM", "WAVE")):
        rows = tab[(tab["instrument"] == inst) & (tab["kind"] == "science")]
        expected = set(truth["object"][(truth["instrument"] == inst) & (truth["type"] == "science")])
        assert set(rows["target"]) == expected and len(expected) > 0
        assert all(w == window for w in rows["snr_window"])
        for r in rows:
            assert r["target"] in printed
            path = tmp_path / "red" / r["file"]
            assert fits.getheader(path)["WAVEMED"] == medium
            assert fits.getheader(path, 1)["TCTYP1"] == ctype
            w = fits.getdata(path, 1)["wavelength"]
            assert np.all(np.diff(w) > 0)
    # every frame of the night is accounted for: products list their raw files
    used = {f for s in tab["raw_files"] for f in s.split(",")}
    sci = truth[np.isin(truth["type"], ["science"])]
    assert set(sci["file"]) <= used


def test_an_unsolvable_arc_loses_its_set_up_only(tmp_path, capsys):
    simulate_night(tmp_path, night="2018-12-05", instrument="both", seed=5)
    truth = Table.read(tmp_path / "truth" / "frames.ecsv")
    arcs = truth[(truth["instrument"] == "EFOSC2") & (truth["type"] == "arc")]
    rng = np.random.default_rng(0)
    for f in arcs["file"]:                              # lamps off: bias level and noise only
        with fits.open(tmp_path / "raw" / f, mode="update") as h:
            h[0].data = (200 + rng.normal(0, 3, h[0].data.shape)).astype(h[0].data.dtype)
    assert main(["reduce", str(tmp_path / "raw"), "--out", str(tmp_path / "red"), "--no-report"]) == 0
    out = capsys.readouterr().out
    tab = Table.read(tmp_path / "red" / "night.ecsv")
    assert set(tab["instrument"]) == {"SOFI"}
    assert "EFOSC2 set-up" in out and "not reduced" in out and arcs["file"][0] in out


def test_demo_runs_end_to_end(tmp_path, capsys):
    """`specred demo`, the README's first command: simulate, inspect, reduce both instruments,
    write the report, and show each target beside the paper's redshift and class."""
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    red = tmp_path / "demo" / "reduced"
    tab = Table.read(red / "night.ecsv")
    assert set(tab["instrument"]) == {"EFOSC2", "SOFI"} and all(f == "OK" for f in tab["flags"])
    assert (red / "report.html").exists() and "night report: file://" in out
    assert "z (paper)" in out and "Fe rich QSO" in out                 # J040754.75, Solarz+2020
    # ... then classifies the reduced spectra: the paper's redshifts and classes come back
    cls = Table.read(red / "classes.ecsv")
    assert (red / "classes" / "bpt.png").exists()
    paper = {"J040754.75": (1.356, "QSO"), "J053520.86": (0.073, "SF"), "J062035.99": (0.080, "SF"),
             "J070647.77": (0.078, "SF"), "J072450.77": (1.578, "QSO")}
    for r in cls:
        if r["target_id"] in paper and str(r["instrument"]).startswith("EFOSC"):
            z, c = paper[r["target_id"]]
            assert abs(r["z"] - z) < 0.01 * (1 + z), (r["target_id"], r["z"])
            assert r["class"] == c, (r["target_id"], r["class"], r["class_reason"])
