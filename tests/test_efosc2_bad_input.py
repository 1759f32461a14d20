"""Bad input and missing calibrations in an EFOSC2 night: one-line errors naming the file,
and nights without a standard or without arcs reduced with flagged fallbacks."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from specred.cli import main
from specred.errors import SpecredError
from specred.pipeline import reduce_night
from specred.simulate import simulate_night
from specred.simulate.evaluate import Truth, evaluate_spectrum


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("efosc2_bad")
    simulate_night(out, night="2018-12-05", instrument="efosc2", seed=2)
    return out


def _subset(night, dest, *, drop_types=(), n_science=1):
    """Copy the night's raw frames without the given types and with n_science targets."""
    frames = Table.read(night / "truth" / "frames.ecsv")
    raw = dest / "raw"
    raw.mkdir(parents=True)
    kept_sci = 0
    for f in frames:
        if f["type"] in drop_types:
            continue
        if f["type"] == "science":
            if kept_sci >= n_science:
                continue
            kept_sci += 1
        shutil.copy(night / "raw" / f["file"], raw / f["file"])
    return raw


def test_truncated_and_wrong_grism_frames_are_reported_and_skipped(night, tmp_path, capsys):
    raw = _subset(night, tmp_path, n_science=2)
    frames = Table.read(night / "truth" / "frames.ecsv")
    sci = [raw / f for f in frames["file"][frames["type"] == "science"][:2]]
    data = sci[0].read_bytes()
    sci[0].write_bytes(data[: len(data) // 3])                   # truncated
    with fits.open(sci[1], mode="update") as h:
        h[0].header["HIERARCH ESO INS GRIS1 NAME"] = "Gr#11"      # another grism
    assert main(["reduce", str(raw), "--out", str(tmp_path / "red")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("skipped:")]
    assert any(sci[0].name in ln and "truncated" in ln.lower() for ln in lines), out
    assert any("Gr#11" in ln and "Grism #13" in ln for ln in lines), out
    assert "Traceback" not in out
    tab = Table.read(tmp_path / "red" / "night.ecsv")
    assert list(tab["kind"]) == ["flux_standard"]                 # the rest is reduced


def test_night_without_standard_uses_nominal_sensitivity_and_says_so(night, tmp_path):
    raw = _subset(night, tmp_path, drop_types=("flux_standard",))
    res = reduce_night(raw, tmp_path / "red")
    (rs,) = res.spectra
    assert {"NO_STANDARD", "TELLURIC_MODEL"} <= set(rs.flags)
    hdr = fits.getheader(rs.path)
    assert "NO_STANDARD" in hdr["FLAGS"] and hdr["STANDARD"] == "nominal"
    # the nominal curve still gives the right flux scale to within 25 %
    sc = evaluate_spectrum(Truth(night), rs, c0=res.calibrations[0].geometry.trim_section[1].start)
    assert abs(sc.flux_level - 1.0) < 0.25, sc.flux_level


def test_night_without_arcs_uses_nominal_dispersion_and_sky_lines(night, tmp_path):
    raw = _subset(night, tmp_path, drop_types=("arc",))
    res = reduce_night(raw, tmp_path / "red")
    sci = [rs for rs in res.spectra if rs.meta["kind"] == "science"]
    assert sci and all("NO_ARC" in rs.flags for rs in sci)
    sc = evaluate_spectrum(Truth(night), sci[0], c0=res.calibrations[0].geometry.trim_section[1].start)
    # the night-sky [O I] lines fix the zero point; the nominal shape holds to a few Å
    assert abs(sc.zero_point_aa) < 3.0, sc.zero_point_aa
    assert np.isnan(res.table["wave_rms_px"][0])


def test_folder_without_efosc2_spectra_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "junk.fits").write_bytes(b"not a FITS file at all" * 200)
    with pytest.raises(SpecredError, match="no EFOSC2 Grism #13"):
        reduce_night(tmp_path / "raw", tmp_path / "red")
    assert main(["reduce", str(tmp_path / "raw"), "--out", str(tmp_path / "red")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("specred: error:") and "junk.fits" in err[-1]
    assert any("junk.fits: not a FITS file" in ln for ln in err[:-1])


def test_wavecal_cli_on_an_arc_and_on_a_flat(night, tmp_path, capsys):
    frames = Table.read(night / "truth" / "frames.ecsv")
    arc = night / "raw" / frames["file"][frames["type"] == "arc"][0]
    flat = night / "raw" / frames["file"][frames["type"] == "flat"][0]
    assert main(["wavecal", str(arc), "--out", str(tmp_path / "map.fits")]) == 0
    out = capsys.readouterr().out
    assert "RMS" in out and "lines" in out
    with fits.open(tmp_path / "map.fits") as h:
        assert h[0].header["WAVEMED"] == "AIR"
        assert h[0].data.shape == fits.getdata(arc).shape
    assert main(["wavecal", str(flat)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specred: error:") and flat.name in err[0]
