"""The HTML night report (`specred.report.write_report`): sections, plots, robustness to missing
inputs, HTML escaping, and rendering in a headless browser (skipped without Chromium)."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from specred import calib
from specred.errors import SpecredError
from specred.report import SECTIONS, _expected_lines, write_report
from specred.spectrum_io import write_spectrum

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ============================================================================ helpers
def _section(page: str, sid: str) -> str:
    """The HTML of ``<section id=sid>`` (sections are not nested)."""
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, flags=re.S)
    assert m, f"section {sid!r} missing"
    return m.group(1)


def _img_payloads(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _night_row(target, instrument="EFOSC2", kind="science", file="", flags="OK", z=np.nan, raw="EFOSC.x.fits"):
    return {"target": target, "instrument": instrument, "kind": kind, "file": file, "raw_files": raw,
            "date_obs": "2018-12-05T03:00:00", "exptime": 1200.0, "airmass": 1.2,
            "snr": 12.5 if file else np.nan, "snr_window": "6000-6200" if file else "", "wave_rms_px": 0.05,
            "wave_rms_aa": 0.14, "sky_shift_px": 0.1, "n_cosmics": 10, "standard": "LTT 1020", "flags": flags,
            "match_id": "", "match_sep_arcsec": np.nan, "z_cat": z}


def _write_night(out: Path, rows: list[dict], **meta) -> None:
    names = list(rows[0])
    t = Table(rows=[[r[n] for n in names] for r in rows], names=names)
    t.meta.update(meta)
    out.mkdir(parents=True, exist_ok=True)
    t.write(out / "night.ecsv", overwrite=True)


def _write_product(out: Path, stem: str, medium: str = "air", wmin=3650.0, wmax=9250.0) -> str:
    """A smooth spectrum with an emission line at 7221 Å (Hα at z = 0.1 in air) and a masked edge."""
    wave = np.linspace(wmin, wmax, 1024)
    flux = 1e-16 * (1 + 0.2 * np.sin(wave / 700)) + 5e-16 * np.exp(-0.5 * ((wave - 7221) / 8) ** 2)
    sigma = np.full_like(wave, 2e-18)
    mask = np.zeros(wave.size, bool)
    mask[:20] = True
    flux[5] = 1e-10                                   # a masked wild pixel must not set the y range
    rel = f"spectra/{stem}.fits"
    write_spectrum(out / rel, wave, flux, sigma, mask, medium=medium, header={"OBJECT": stem, "INSTRUME": "EFOSC"})
    return rel


# ============================================================================ fast unit tests
def test_minimal_folder_reports_missing_inputs(tmp_path):
    out = tmp_path / "red"
    rel = _write_product(out, "J0001_EFOSC2")
    _write_night(out, [_night_row("J0001", file=rel)])
    path = write_report(out)
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert page.count(f'<section id="{sid}">') == 1
    assert "not available: no frames.ecsv" in _section(page, "frames")
    assert "not available: no calibrations/ folder" in _section(page, "calibrations")
    targets = _section(page, "targets")
    assert "not available: no qc/J0001_EFOSC2_2d.fits" in targets
    # exactly the one 1D plot, embedded and saved, and it is a real PNG
    imgs = _img_payloads(page)
    assert page.count("<img") == len(imgs) == 1
    assert imgs[0].startswith(PNG_MAGIC) and len(imgs[0]) > 5000
    assert (out / "qc" / "J0001_EFOSC2_1d.png").read_bytes() == imgs[0]
    # self-contained: no external URL anywhere, the render probe is there
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "document.body.dataset.rendered" in page and 'data-rendered="no"' in page
    # nothing half-written left behind
    assert not list(out.rglob("*.part"))


def test_empty_folder_still_gives_a_page(tmp_path):
    path = write_report(tmp_path, title="empty night")
    page = path.read_text(encoding="utf-8")
    assert "<title>empty night</title>" in page
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "not available: no night.ecsv" in _section(page, "summary")
    assert "<img" not in page


def test_missing_output_folder_is_an_error(tmp_path):
    with pytest.raises(SpecredError, match="no such output folder"):
        write_report(tmp_path / "nope")


def test_target_names_and_flags_are_escaped(tmp_path):
    out = tmp_path / "red"
    rel = _write_product(out, "_b_x__b__EFOSC2")
    _write_night(out, [_night_row("<b>x</b>", file=rel, flags="ODD<script>alert(1)</script>")])
    page = write_report(out).read_text(encoding="utf-8")
    assert "<b>x</b>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in _section(page, "targets")
    assert "&lt;b&gt;x&lt;/b&gt;" in _section(page, "summary")
    assert "<script>alert" not in page and "ODD&lt;script&gt;" in page
    assert page.count("<script>") == 1                    # only the render probe
    assert "flagged" in _section(page, "targets")          # non-OK flags make a flagged card


def test_failed_row_is_listed_under_problems(tmp_path):
    out = tmp_path / "red"
    rel = _write_product(out, "J0001_EFOSC2")
    _write_night(out, [_night_row("J0001", file=rel),
                       _night_row("J0002", flags="FAILED: no trace found (S/N < 3)",
                                  raw="EFOSC.2018-12-05T04:00:00.fits")],
                 problems=["junk.fits: not a FITS file"])
    Table(rows=[("raw/EFOSC.b.fits", "EFOSC2", "2018-12-04", "Gr#13", "bias", "BIAS", 0.0, 1.0, "", True, ""),
                ("raw/trunc.fits", "", "", "", "unusable", "", np.nan, np.nan, "", False, "truncated (3 of 9 blocks)")],
          names=("file", "instrument", "night", "setup", "type", "object", "exptime", "airmass", "date_obs",
                 "used", "problem")).write(out / "frames.ecsv")
    page = write_report(out).read_text(encoding="utf-8")
    problems = _section(page, "problems")
    lines = re.findall(r"<li.*?</li>", problems, flags=re.S)
    assert len(lines) == 3
    failed = [li for li in lines if "EFOSC.2018-12-05T04:00:00.fits" in li]
    assert len(failed) == 1 and "no trace found (S/N &lt; 3)" in failed[0] and "FAILED:" not in failed[0]
    assert any("raw/trunc.fits" in li and "truncated (3 of 9 blocks)" in li for li in lines)
    assert any("junk.fits" in li and "not a FITS file" in li for li in lines)
    assert 'data-ok="1"' in page and 'data-failed="1"' in page and 'data-flagged="0"' in page
    frames = _section(page, "frames")
    assert frames.count('<tr class="bad">') == 1 and frames.count("<tr") == 3   # header + 2 files
    assert 'href="#problems">Problems (3)' in page


def test_2d_cutout_arc_lines_and_expected_lines(tmp_path):
    out = tmp_path / "red"
    rel = _write_product(out, "J0001_EFOSC2")
    _write_night(out, [_night_row("J0001", file=rel, z=0.1)])
    # 2D cut-out with the wavelength decreasing along the rows (as for SofI)
    rows = np.arange(400)
    trace = 20 + 0.01 * rows
    profile = 30 * np.exp(-0.5 * ((np.arange(40) - trace[:, None]) / 2) ** 2)
    img = np.random.default_rng(0).normal(0, 1, (400, 40)) + profile
    (out / "qc").mkdir()
    fits.HDUList([fits.PrimaryHDU(img.astype(np.float32), header=fits.Header({"X0": 300, "WAVEMED": "AIR"})),
                  fits.ImageHDU(np.linspace(9000, 4000, 400), name="WAVE"),
                  fits.ImageHDU(trace, name="TRACE")]).writeto(out / "qc" / "J0001_EFOSC2_2d.fits")
    # calibrations: a wavelength map with a LINES table, a flat, a corrupt sensitivity file
    cal = out / "calibrations"
    cal.mkdir()
    tag = "EFOSC2_2018-12-04_Gr_13"
    w = np.linspace(4000, 9000, 25)
    lines = Table({"wavelength": w, "residual_aa": 0.1 * np.sin(w), "used": w < 8800})
    fits.HDUList([fits.PrimaryHDU(np.tile(np.linspace(3650, 9250, 50)[:, None], (1, 40)),
                                  header=fits.Header({"WAVEMED": "AIR", "WAVERMS": 0.04, "WAVERMSA": 0.11,
                                                      "WAVENLIN": 24})),
                  fits.BinTableHDU(lines, name="LINES")]).writeto(cal / f"{tag}_wavemap.fits")
    fits.PrimaryHDU(np.random.default_rng(1).normal(1, 0.01, (300, 200))).writeto(cal / f"{tag}_flat.fits")
    (cal / f"{tag}_sensitivity.ecsv").write_text("this is not ECSV\n")
    page = write_report(out).read_text(encoding="utf-8")
    qc = out / "qc"
    for name in ("J0001_EFOSC2_2d", "J0001_EFOSC2_1d", f"{tag}_arc", f"{tag}_flat"):
        assert (qc / f"{name}.png").read_bytes().startswith(PNG_MAGIC), name
    assert not (qc / f"{tag}_sensitivity.png").exists()
    cals = _section(page, "calibrations")
    assert "not available: cannot read" in cals                 # corrupt input: a note, not a crash
    assert "not available: no EFOSC2_2018-12-04_Gr_13_bias.fits" in cals
    assert "arc RMS 0.040 px = 0.110 Å from 24 lines" in cals
    targets = _section(page, "targets")
    assert "trace in orange" in targets and "from column 300" in targets
    n_lines = int(re.search(r"(\d+) catalogue lines marked at z = 0.1000", targets).group(1))
    assert n_lines == _expected_lines(0.1, "air", 3650, 9250)[1].size > 10
    assert page.count("<img") == 4


def test_expected_lines_use_the_products_medium():
    labels, obs, _ = _expected_lines(0.1, "air", 3650.0, 9250.0)
    t = calib.emission_lines()
    ha_vac = float(t["wave_vac"][t["name"] == "Halpha"][0])
    i = list(labels).index(str(t["label"][t["name"] == "Halpha"][0]))
    assert obs[i] == pytest.approx(calib.vacuum_to_air(ha_vac * 1.1), abs=1e-6)
    assert obs[i] < ha_vac * 1.1 - 1.5                      # air is ~2 Å shorter at 7200 Å
    _, obs_v, _ = _expected_lines(0.1, "vacuum", 3650.0, 9250.0)
    assert obs_v[i] == pytest.approx(ha_vac * 1.1)
    # Mg II 2800 (tabulated air = vacuum below 2000 Å is not used): converted after redshifting
    labels2, obs2, _ = _expected_lines(1.5, "air", 3650.0, 9250.0)
    mg = float(t["wave_vac"][t["name"] == "MgII_2800"][0])
    j = list(labels2).index(str(t["label"][t["name"] == "MgII_2800"][0]))
    assert obs2[j] == pytest.approx(calib.vacuum_to_air(mg * 2.5), abs=1e-6)
    assert np.all((obs2 >= 3650) & (obs2 <= 9250))


def test_unreadable_spectrum_becomes_a_note(tmp_path):
    out = tmp_path / "red"
    (out / "spectra").mkdir(parents=True)
    (out / "spectra" / "J0001_EFOSC2.fits").write_bytes(b"garbage" * 100)
    _write_night(out, [_night_row("J0001", file="spectra/J0001_EFOSC2.fits")])
    page = write_report(out).read_text(encoding="utf-8")
    assert "not available: cannot plot" in _section(page, "targets")
    assert "<img" not in page


# ============================================================================ simulated night
# The tests below share one simulated night (module fixture); under ``pytest -n`` with
# ``--dist loadgroup`` the xdist_group keeps them on one worker so it is made once.

@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A simulated night of both instruments, reduced, then the report written explicitly."""
    from specred.pipeline import reduce_night
    from specred.simulate import simulate_night

    tmp = tmp_path_factory.mktemp("report_night")
    simulate_night(tmp, night="2018-12-05", instrument="both", seed=3)
    out = tmp / "red"
    reduce_night(tmp / "raw", out)
    (out / "report.html").unlink(missing_ok=True)           # the pipeline may already write one
    t0 = time.perf_counter()
    html_path = write_report(out)
    return out, html_path, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.xdist_group("report_night")
def test_report_of_a_simulated_night(reduced):
    out, path, elapsed = reduced
    assert path == out / "report.html" and path.exists()
    page = path.read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert page.count(f'<section id="{sid}">') == 1
    imgs = _img_payloads(page)
    assert len(imgs) == page.count("<img") > 10
    assert all(b.startswith(PNG_MAGIC) for b in imgs)
    night = Table.read(out / "night.ecsv")
    assert set(night["instrument"]) == {"EFOSC2", "SOFI"}
    targets = _section(page, "targets")
    for r in night:
        if not r["file"]:
            continue
        stem = Path(r["file"]).stem
        assert f'id="t-{stem}"' in targets and f'href="#t-{stem}"' in page
        assert (out / "qc" / f"{stem}_1d.png").read_bytes().startswith(PNG_MAGIC)
        if (out / "qc" / f"{stem}_2d.fits").exists():
            assert (out / "qc" / f"{stem}_2d.png").read_bytes().startswith(PNG_MAGIC)
        else:
            assert f"not available: no qc/{stem}_2d.fits" in targets
    # cards show the S/N of night.ecsv
    for snr in night["snr"][np.isfinite(night["snr"])]:
        assert f"{snr:.1f} per px" in targets
    if "z_cat" in night.colnames and np.isfinite(night["z_cat"]).any():
        assert "catalogue lines marked at z =" in targets
    # calibrations: one block per tag, the plots that must exist, arc residuals if there are lines
    cals = _section(page, "calibrations")
    # set-up tags: '<tag>_<kind>.<ext>' (SofI's per-star '<tag>_telluric_<star>.ecsv' too)
    tags = sorted({re.sub(r"_(bias|flat|wavemap|sensitivity|telluric(_.+)?)\.(fits|ecsv)$", "", p.name)
                   for p in (out / "calibrations").iterdir() if p.suffix in (".fits", ".ecsv")})
    assert any(t.startswith("EFOSC2_") for t in tags) and any(t.startswith("SOFI_") for t in tags)
    for tag in tags:
        assert f"<h3>{tag}</h3>" in cals
        assert (out / "qc" / f"{tag}_flat.png").exists() and (out / "qc" / f"{tag}_sensitivity.png").exists()
        with fits.open(out / "calibrations" / f"{tag}_wavemap.fits") as hdul:
            has_lines = "LINES" in hdul
        assert (out / "qc" / f"{tag}_arc.png").exists() == has_lines
        assert (out / "qc" / f"{tag}_telluric.png").exists()       # SofI: the A0V stars' curves
        if tag.startswith("EFOSC2_"):
            assert (out / "qc" / f"{tag}_bias.png").exists()
    # frames: the table of every file when the pipeline wrote frames.ecsv
    frames = _section(page, "frames")
    if (out / "frames.ecsv").exists():
        ft = Table.read(out / "frames.ecsv")
        assert frames.count("<tr") == len(ft) + 1
    else:
        assert "not available: no frames.ecsv" in frames
    # summary counts agree with night.ecsv
    n_failed = sum(str(f).startswith("FAILED") for f in night["flags"])
    assert f'data-failed="{n_failed}"' in page
    assert f'data-ok="{sum(str(f) == "OK" for f in night["flags"])}"' in page
    assert elapsed < 60                                      # sanity only; speed is benchmarked elsewhere


def _browser() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        pytest.skip("chromium not installed (the CI script installs Debian chromium)")
    return exe


def _run_browser(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           "--no-first-run", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.xdist_group("report_night")
def test_report_renders_in_headless_chromium(reduced, tmp_path):
    _, path, _ = reduced
    res = _run_browser(["--dump-dom", path.as_uri()], tmp_path / "profile")
    dom = res.stdout
    assert res.returncode == 0 and "<body" in dom, res.stderr[-2000:]
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom
    body = re.search(r"<body[^>]*>", dom).group(0)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    assert attrs.get("rendered") == "yes", body
    n_img = path.read_text(encoding="utf-8").count("<img")
    assert n_img > 0
    assert int(attrs["images-ok"]) == n_img
    assert int(attrs["images-broken"]) == 0


@pytest.mark.slow
@pytest.mark.xdist_group("report_night")
def test_report_screenshot(reduced, tmp_path):
    _, path, _ = reduced
    shot = tmp_path / "report.png"
    res = _run_browser([f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars", path.as_uri()],
                       tmp_path / "profile")
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC)
    assert shot.stat().st_size > 10_000
