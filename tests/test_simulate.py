"""The simulator: structure of raw frames, truth consistency, determinism."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.table import Table

from specred import calib
from specred.simulate import optics, simulate_night
from specred.simulate.sources import REST_VAC, build_source, pt05_upper, r23_for_oh_upper

from conftest import NTT_REF, need_shared


def _frames(night, **sel):
    t = Table.read(night.out / "truth" / "frames.ecsv")
    m = np.ones(len(t), bool)
    for k, v in sel.items():
        m &= t[k] == v
    return t[m]


def _raw(night, name):
    with fits.open(night.out / "raw" / name) as h:
        return h[0].header, h[0].data.astype(float)


# ---------------------------------------------------------------- structure
def test_night_content_matches_the_observing_log(sim_night):
    t = Table.read(sim_night.out / "truth" / "frames.ecsv")
    ef = t[t["instrument"] == "EFOSC2"]
    assert np.sum(ef["type"] == "bias") == 11
    assert np.sum(ef["type"] == "flat") == 5
    assert np.sum(ef["type"] == "arc") >= 2
    assert np.sum(ef["type"] == "flux_standard") == 1
    sci = sorted(ef[ef["type"] == "science"]["object"])
    # the paper's log lists six EFOSC2 targets with UT date 2018-12-05
    assert sci == sorted(["J040754.75", "J072450.77", "J071734.84", "J053520.86", "J062035.99", "J070647.77"])
    so = t[t["instrument"] == "SOFI"]
    assert set(so["type"]) >= {"arc", "flat", "lamp_off_flat", "flux_standard", "telluric", "science"}
    assert "bias" not in set(so["type"])
    nods = list(so[so["type"] == "science"]["nod"])
    assert nods[:4] == ["A", "B", "B", "A"]
    dits = so[so["type"] == "science"]["exptime"]
    assert np.all((dits >= 90) & (dits <= 110))


def test_file_names_and_raw_geometry(sim_night):
    for path in sim_night.raw_files:
        assert re.fullmatch(r"(EFOSC|SOFI)\.\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\.fits", path.name)
        # the on-disk header (astropy drops BZERO from the in-memory one once
        # the data are scaled)
        hdr = fits.getheader(path)
        assert path.name.endswith(hdr["DATE-OBS"] + ".fits")
        assert hdr["ARCFILE"] == path.name
        if hdr["INSTRUME"] == "EFOSC":
            assert (hdr["NAXIS1"], hdr["NAXIS2"]) == (1030, 1030)
            assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
            assert fits.getdata(path).dtype == np.uint16
        else:
            assert (hdr["NAXIS1"], hdr["NAXIS2"]) == (1024, 1024)
    hdr, data = _raw(sim_night, _frames(sim_night, type="bias")["file"][0])
    # prescan columns and overscan rows carry the bias level only
    assert abs(np.median(data[:1024, :6]) - np.median(data[1024:, 6:])) < 2.0
    assert 190 < np.median(data[1024:, 6:]) < 240


KEY_TYPES = ["TELESCOP", "INSTRUME", "OBJECT", "RA", "DEC", "EXPTIME", "MJD-OBS", "DATE-OBS", "ARCFILE",
             "HIERARCH ESO DPR CATG", "HIERARCH ESO DPR TYPE", "HIERARCH ESO DPR TECH", "HIERARCH ESO TPL ID",
             "HIERARCH ESO OBS ID", "HIERARCH ESO TEL AIRM START", "HIERARCH ESO TEL AIRM END"]
EFOSC_CONST = ["HIERARCH ESO INS GRIS1 NAME", "HIERARCH ESO INS SLIT1 NAME", "HIERARCH ESO DET WIN1 BINX",
               "HIERARCH ESO DET WIN1 BINY", "HIERARCH ESO DET WIN1 NX", "HIERARCH ESO DET WIN1 NY",
               "HIERARCH ESO DET OUT1 PRSCX", "HIERARCH ESO DET OUT1 OVSCY", "HIERARCH ESO DET OUT1 GAIN",
               "HIERARCH ESO DET OUT1 CONAD", "HIERARCH ESO DET OUT1 RON", "HIERARCH ESO DET CHIP1 ID",
               "HIERARCH ESO INS FILT1 NAME"]
SOFI_CONST = ["HIERARCH ESO INS OPTI2 NAME", "HIERARCH ESO INS FILT1 NAME", "HIERARCH ESO INS MODE",
              "HIERARCH ESO INS PIXSCALE", "HIERARCH ESO DET CHIP NX", "HIERARCH ESO DET WIN NY",
              "HIERARCH ESO INS LAMP1 NAME", "HIERARCH ESO DPR CATG", "HIERARCH ESO DPR TYPE", "OBJECT"]


def _real_header(name):
    need_shared(NTT_REF)
    return fits.Header.fromstring((NTT_REF / "headers" / f"{name}.header.txt").read_text(), sep="\n")


def test_headers_round_trip_against_real_eso_headers(sim_night):
    real_arc = _real_header("arc_20120825_Gr13_Free_slit1.0_56442_1")
    real_std = _real_header("sens0_Gr13_Free")
    sim_arc, _ = _raw(sim_night, _frames(sim_night, type="arc", instrument="EFOSC2")["file"][0])
    sim_std, _ = _raw(sim_night, _frames(sim_night, type="flux_standard", instrument="EFOSC2")["file"][0])
    for real, sim in ((real_arc, sim_arc), (real_std, sim_std)):
        for key in KEY_TYPES:
            assert key in sim, key
            if key in real:
                assert type(sim[key]) is type(real[key]) or (
                    isinstance(sim[key], (int, float)) and isinstance(real[key], (int, float))), key
        for key in EFOSC_CONST:
            assert sim[key] == real[key], key
        for key in ("HIERARCH ESO DPR CATG", "HIERARCH ESO DPR TYPE", "HIERARCH ESO DPR TECH"):
            assert sim[key] == real[key], key
    real_sofi = _real_header("arc_GD71_1_GB_20111220")
    sim_sofi, _ = _raw(sim_night, _frames(sim_night, type="arc", instrument="SOFI")["file"][0])
    for key in SOFI_CONST:
        if key == "HIERARCH ESO INS OPTI1 NAME":
            continue
        assert sim_sofi[key] == real_sofi[key], key
    # the whole simulated header survives a FITS write/read
    again = fits.Header.fromstring(sim_arc.tostring())
    assert list(again.keys()) == list(sim_arc.keys())


def test_no_processing_keywords_in_raw_frames(sim_night):
    for path in sim_night.raw_files[:5]:
        hdr = fits.getheader(path)
        for key in ("CCDSEC", "LTV1", "LTV2", "ZEROCOR", "FLATCOR", "TRIM", "BIASSEC"):
            assert key not in hdr


def test_truth_is_not_among_raw_frames(sim_night):
    raw = {p.name for p in (sim_night.out / "raw").iterdir()}
    assert all(n.startswith(("EFOSC.", "SOFI.")) and n.endswith(".fits") for n in raw)
    assert (sim_night.out / "truth" / "targets.ecsv").exists()


# ---------------------------------------------------------------- physics / truth
def test_line_flux_equals_integral_of_truth_spectrum(sim_night):
    lines = Table.read(sim_night.out / "truth" / "lines.ecsv")
    targets = Table.read(sim_night.out / "truth" / "targets.ecsv")
    sf = [r["object_id"] for r in targets if r["kind"] in ("SF", "WR")]
    assert sf
    oid = sf[0]
    spec = Table.read(sim_night.out / "truth" / "spectra" / f"{oid}_EFOSC2.ecsv")
    wave_air = np.asarray(spec["wavelength"], float)
    wave = calib.air_to_vacuum(wave_air)
    flux = np.asarray(spec["flux"], float)
    for name in ("Halpha", "OIII_5007", "Hbeta"):
        row = lines[(lines["object_id"] == oid) & (lines["line"] == name)][0]
        c = row["obs_vac"]
        win = np.abs(wave - c) < 12
        side = (np.abs(wave - c) > 40) & (np.abs(wave - c) < 60)
        cont = np.polyval(np.polyfit(wave[side], flux[side], 1), wave[win])
        integral = np.trapezoid(flux[win] - cont, wave[win])
        # [N II] 6548/6584 lie > 14 Å from Hα: outside the window
        assert integral == pytest.approx(row["flux"], rel=0.03), name


def test_standard_star_counts_follow_flux_sensitivity_and_extinction(sim_night):
    fr = _frames(sim_night, type="flux_standard", instrument="EFOSC2")[0]
    hdr, data = _raw(sim_night, fr["file"])
    inst = optics.EFOSC2
    bias = np.median(data[1025:1029, 10:1010])
    img = (data - bias) * inst.gain / inst.gain      # ADU
    star = calib.find_standard(hdr["RA"], hdr["DEC"])
    assert star is not None and star.kind == "flux"
    tab = calib.standard_flux(star.name)
    x0 = fr["trace_x0"]
    poly = np.asarray(yaml.safe_load((sim_night.out / "truth" / "optics.yaml").read_text())["EFOSC2"]["dispersion_poly"])
    checked = 0
    for lam in (4500.0, 5200.0, 6100.0, 8000.0):
        # centre-column row of lam (solve the dispersion), then the row at the trace
        rows = np.arange(1024.0)
        u = np.interp(lam, np.polyval(poly, rows), rows) + fr["flexure_px"]
        y = int(round(u))
        band = slice(y - 3, y + 4)
        x = int(round(x0))
        measured = img[band, x - 25:x + 26].sum() / 7.0          # ADU per row
        dl = np.polyval(np.polyder(poly), u)
        f = np.interp(lam, np.asarray(tab["wavelength"], float), np.asarray(tab["flux"], float))
        sens = optics.sensitivity_factor(inst, np.array([lam]))[0]
        atm = optics.atmosphere(inst, np.array([lam]), fr["airmass"])[0]
        loss = optics.slit_loss(optics.seeing_at(lam, fr["seeing"]), 1.0, fr["slit_offset"])
        expected = f * sens * atm * loss * dl * fr["exptime"]
        assert measured == pytest.approx(expected, rel=0.05), lam
        checked += 1
    assert checked == 4


def test_arc_lines_fall_where_the_truth_says(sim_night):
    fr = _frames(sim_night, type="arc", instrument="EFOSC2")[0]
    _, data = _raw(sim_night, fr["file"])
    opt = yaml.safe_load((sim_night.out / "truth" / "optics.yaml").read_text())["EFOSC2"]
    poly = np.asarray(opt["dispersion_poly"])
    lines = calib.arc_lines("HeAr")
    strong = lines[np.argsort(lines["intensity"])[::-1][:25]]
    col = int(opt["x_centre"])
    prof = np.median(data[:1024, col - 2:col + 3], axis=1)
    rows = np.arange(1024.0)
    found = 0
    for lam in strong["wavelength"]:
        u = np.interp(lam, np.polyval(poly, rows), rows, left=np.nan, right=np.nan)
        if not np.isfinite(u) or u < 10 or u > 1010:
            continue
        y = int(round(u))
        seg = prof[y - 4:y + 5]
        if seg.max() >= 65000 or seg.max() - np.median(prof) < 500:
            continue                              # saturated or blended/faint
        others = np.abs(np.interp(lines["wavelength"], np.polyval(poly, rows), rows) - u)
        if np.sum(others < 6) > 1:
            continue                              # a neighbour within 6 px would bias the centroid
        w = seg - np.median(prof)
        centroid = np.sum(w * np.arange(y - 4, y + 5)) / np.sum(w)
        assert centroid == pytest.approx(u, abs=0.3), lam
        found += 1
    assert found >= 6


def test_cosmic_rays_are_recorded_where_injected(sim_night):
    fr = _frames(sim_night, type="science", instrument="EFOSC2")[0]
    _, data = _raw(sim_night, fr["file"])
    cr = np.load(sim_night.out / "truth" / "cosmics" / (fr["file"][:-5] + ".npz"))
    assert fr["n_cosmics"] > 300           # ~0.3 events/s over a 2700 s exposure
    strong = cr["e"] > 3000
    ys, xs = cr["y"][strong], cr["x"][strong]
    bg = np.median(data[200:800, 200:800])
    assert np.median(data[ys, xs] - bg) > 1000


def test_sofi_nod_offsets_and_pair_subtraction(sim_night):
    sci = _frames(sim_night, type="science", instrument="SOFI")
    ha, a = _raw(sim_night, sci["file"][0])
    hb, b = _raw(sim_night, sci["file"][1])
    assert ha["HIERARCH ESO SEQ CUMOFFSETX"] == pytest.approx(sci["offset_x"][0], abs=0.01)
    assert hb["HIERARCH ESO SEQ CUMOFFSETX"] < -20
    assert ha["HIERARCH ESO DET DIT"] == ha["EXPTIME"]
    diff = a - b
    # sky (OH lines) largely cancels: residual far smaller than the sky itself
    sky_rows = np.median(a[:, 100:300], axis=1)
    assert np.std(np.median(diff[:, 100:300], axis=1)) < 0.25 * np.std(sky_rows)
    # the target appears positive at A and negative at B
    xa = int(round(sci["trace_x0"][0]))
    xb = int(round(sci["trace_x0"][1]))
    assert np.median(diff[300:700, xa]) > 0 > np.median(diff[300:700, xb])


def test_telluric_star_follows_each_target_at_similar_airmass(sim_night):
    t = Table.read(sim_night.out / "truth" / "frames.ecsv")
    so = t[t["instrument"] == "SOFI"]
    sci_objs = list(dict.fromkeys(so[so["type"] == "science"]["object"]))
    for obj in sci_objs:
        idx = np.where(so["object"] == obj)[0]
        nxt = so[idx[-1] + 1]
        assert nxt["type"] == "telluric"
        assert abs(nxt["airmass"] - so[idx[-1]]["airmass"]) < 0.15


def test_simulation_is_deterministic_by_seed(tmp_path):
    a = simulate_night(tmp_path / "a", night="2018-12-05", instrument="efosc2", seed=7)
    b = simulate_night(tmp_path / "b", night="2018-12-05", instrument="efosc2", seed=7)
    c = simulate_night(tmp_path / "c", night="2018-12-05", instrument="efosc2", seed=8)

    def digest(res):
        return [hashlib.sha256(fits.getdata(p).tobytes()).hexdigest() for p in res.raw_files]

    assert [p.name for p in a.raw_files] == [p.name for p in b.raw_files]
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_bad_night_or_instrument_is_a_clear_error(tmp_path):
    from specred.errors import SpecredError

    with pytest.raises(SpecredError, match="no SOFI observations"):
        simulate_night(tmp_path, night="2018-12-05", instrument="sofi")
    with pytest.raises(SpecredError, match="YYYY-MM-DD"):
        simulate_night(tmp_path, night="yesterday")


def test_log_entry_without_a_target_row_is_skipped_with_a_warning(tmp_path, caplog):
    # the EFOSC2 log of 2018-12-06 holds J083104.69, which Table 2 of the paper does not list
    with caplog.at_level("WARNING", logger="specred"):
        res = simulate_night(tmp_path, night="2018-12-06", instrument="efosc2", seed=1)
    assert "J083104.69" in caplog.text and "not simulated" in caplog.text
    ids = {str(i) for i in res.targets[res.targets.colnames[0]]}
    assert "J083104.69" not in ids and len(ids) >= 5


# ---------------------------------------------------------------- sources
def test_pt05_inversion_round_trips():
    for oh in (8.3, 8.45, 8.6):
        for p in (0.4, 0.7):
            assert pt05_upper(r23_for_oh_upper(oh, p), p) == pytest.approx(oh, abs=1e-9)


def test_source_truth_metallicity_and_classes():
    rng = np.random.default_rng(0)
    s = build_source("x", "SF", 0.07, rng, f6100=3e-17, oh12=8.41, log_nii_oii=-0.66)
    assert s.truth["oh12"] == pytest.approx(8.41)
    # recompute R23 from the *intrinsic* (de-reddened) line fluxes of the truth
    from specred.dust import redden
    flux = {ln.name: ln.flux / redden(ln.rest_vac, s.truth["ebv"]) for ln in s.lines if not ln.broad}
    r3 = (flux["OIII_5007"] + flux["OIII_4959"]) / flux["Hbeta"]
    r23 = r3 + (flux["OII_3726"] + flux["OII_3729"]) / flux["Hbeta"]
    assert pt05_upper(r23, r3 / r23) == pytest.approx(8.41, abs=1e-6)
    assert np.log10(flux["NII_6584"] / (flux["OII_3726"] + flux["OII_3729"])) == pytest.approx(-0.66, abs=1e-6)
    assert flux["Halpha"] / flux["Hbeta"] == pytest.approx(2.86, rel=1e-6)


def test_rest_wavelengths_agree_with_the_calib_catalogue():
    cat = calib.emission_lines()
    waves = np.asarray(cat["wave_vac"], float)
    for name, w in REST_VAC.items():
        assert np.min(np.abs(waves - w)) < 1.5, name


def test_lobal_has_troughs_and_balnicity():
    from specred.simulate.sources import balnicity_index

    rng = np.random.default_rng(1)
    q = build_source("q", "LoBAL", 1.7, rng, f6100=2e-17)
    assert {t.line for t in q.troughs} >= {"CIV_1549", "MgII_2800", "AlIII_1857"}
    assert balnicity_index(q) > 1000
    assert balnicity_index(build_source("r", "QSO", 1.7, rng, f6100=2e-17)) == 0.0


# ---------------------------------------------------------------- 1D spectra
def test_spectra_are_readable_and_have_the_drawn_snr(sim_spectra):
    from specutils import Spectrum

    truth = sim_spectra.truth
    assert len(sim_spectra.files) == 40
    ratios = []
    for row, path in zip(truth, sim_spectra.files):
        spec = Spectrum.read(path)
        assert spec.flux.unit.is_equivalent("erg / (s cm2 Angstrom)")
        assert fits.getheader(path)["WAVEMED"] == "AIR"
        w = spec.spectral_axis.value
        win = (w > 6000) & (w < 6200)
        sig = spec.uncertainty.array[win]
        ratios.append(row["cont_at_ref"] / np.median(sig) / row["snr"])
    assert np.median(ratios) == pytest.approx(1.0, rel=0.05)
    assert {"QSO", "SF"} <= set(truth["kind"])
    assert 3 <= truth["snr"].min() and truth["snr"].max() <= 50


def test_sofi_flux_standard_has_a_near_ir_flux_table(sim_night):
    """A SofI flux standard must have tabulated fluxes over the whole blue-grism range."""
    std = _frames(sim_night, type="flux_standard", instrument="SOFI")
    assert len(std) >= 4
    name = {str(n) for n in std["object"]}
    assert len(name) == 1
    star = calib.find_standard(None, None, name=name.pop())
    assert star.kind == "flux"
    assert np.max(calib.standard_flux(star.name)["wavelength"]) > 16500
