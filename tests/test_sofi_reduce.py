"""End-to-end SofI blue-grism reduction of simulated nights (ABBA), scored against the truth.

Acceptance numbers of the SofI issue: OH residual in the combined frame <= 2x the photon
noise, wavelength zero point within 1 Å (vacuum), telluric-corrected continuum within 5 %
and absolute flux within 10 %, no A0V Paβ/Paγ residual beyond 3 %; bad ABBA input reported.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from specred.instruments.sofi import SLIT_COLUMNS
from specred.pipeline import reduce_night
from specred.simulate import simulate_night
from specred.simulate.evaluate import Truth, evaluate_sofi_spectrum

NIGHTS = {"s0": ("2018-12-07", 0), "s1": ("2018-08-27", 1)}


@pytest.fixture(scope="module", params=sorted(NIGHTS))
def reduced(request, tmp_path_factory):
    night, seed = NIGHTS[request.param]
    out = tmp_path_factory.mktemp(f"sofi_{request.param}")
    simulate_night(out, night=night, instrument="sofi", seed=seed)
    res = reduce_night(out / "raw", out / "red")
    truth = Truth(out)
    science = [rs for rs in res.spectra if rs.meta["kind"] == "science"]
    # scored: targets bright enough to be measured (the programme's faint 'unknown' sources,
    # f_λ(1.21 µm) ~ 1e-18, are at S/N ~ 1 per pixel and flagged LOW_SNR instead)
    f12 = {str(r["object_id"]): float(r["f12100"]) for r in truth.targets}
    scores = {rs.target: evaluate_sofi_spectrum(truth, rs) for rs in science if f12[rs.target] > 5e-18}
    return res, truth, science, scores


def test_every_sequence_is_reduced_in_vacuum(reduced):
    res, truth, science, _ = reduced
    sci = truth.frames[truth.frames["type"] == "science"]
    assert sorted(rs.target for rs in science) == sorted(set(sci["object"]))
    tab = Table.read(res.out / "night.ecsv")
    assert set(tab["kind"]) == {"science", "flux_standard", "telluric_standard"}
    # the faint targets are traced with the telluric star's trace (and only they)
    allowed = {"OK", "LOW_SNR", "TRACE_FROM_REFERENCE,LOW_SNR"}
    assert all(f in allowed for f in tab["flags"]), list(tab["flags"])
    assert all(w == "12000-12200" for w in tab["snr_window"])
    f12 = {str(r["object_id"]): float(r["f12100"]) for r in truth.targets}
    for r in tab[tab["kind"] == "science"]:
        assert ("LOW_SNR" in r["flags"]) == (r["snr"] < 3), r
    for rs in science:
        hdr = fits.getheader(rs.path)
        assert hdr["WAVEMED"] == "VACUUM" and hdr["INSTRUME"] == "SOFI"
        assert fits.getheader(rs.path, 1)["TCTYP1"] == "WAVE"
        assert np.all(np.diff(rs.wave) > 0)
        assert hdr["EXPTIME"] == pytest.approx(float(np.sum(sci["exptime"][sci["object"] == rs.target]
                                                           * sci["ndit"][sci["object"] == rs.target])))


def test_every_target_is_extracted_where_it_is(reduced):
    """Bright targets are found, faint ones placed from the telluric star's position and the
    header offsets: the aperture centre is within 1 px of the true beam for all of them."""
    _, truth, science, _ = reduced
    for rs in science:
        fs = rs.frames[0]
        x_true = truth.expected(fs.info.path)["x_centre"][fs.rows]
        dx = float(np.median(fs.x + SLIT_COLUMNS[0] - 1 - x_true))   # trimmed -> raw columns
        assert abs(dx) <= 1.0, (rs.target, rs.flags, dx)


def test_telluric_transmission_keeps_no_a0v_hydrogen_line(reduced):
    """The acceptance item measured where the S/N allows it: each A0V star's transmission
    (S/N ~ 800) against the true atmosphere of the simulation, at Paβ and Paγ (line core over
    its surroundings, so smooth water-column differences cancel): no residual above 3 %.
    Measured 0.6-0.8 % (Paβ) and 0.6-1.7 % (Paγ)."""
    from scipy.ndimage import gaussian_filter1d

    from specred import calib

    res, truth, _, _ = reduced
    files = sorted((res.out / "calibrations").glob("*_telluric_*.ecsv"))
    assert files
    fwhm_px = float(truth.optics["SOFI"]["lsf_fwhm_px"])
    for f in files:
        t = Table.read(f)
        w = np.asarray(t["wavelength"], float)
        order = np.argsort(w)
        w, trans = w[order], np.asarray(t["transmission"], float)[order]
        model = gaussian_filter1d(calib.telluric_transmission(w, airmass=float(t.meta["airmass"]), medium="vacuum"),
                                  fwhm_px / 2.3548)
        ratio = trans / model
        disp = float(np.median(np.diff(w)))
        for lam in (12821.59, 10941.09):                       # Paβ, Paγ (vacuum Å)
            core = np.abs(w - lam) < fwhm_px * disp
            side = (np.abs(w - lam) > 8 * disp) & (np.abs(w - lam) < 20 * disp)
            resid = np.median(ratio[core]) / np.median(ratio[side]) - 1.0
            assert abs(resid) <= 0.03, (f.name, lam, resid)


def test_faint_targets_are_measured_without_bias(reduced):
    """The programme's faint sources (S/N < 1 per pixel): integrated flux over 1.00-1.32 µm
    within its error (+15 % model margin) of the truth.  Before the local background and the
    low-S/N profile fix they came out at 2.8 ± 0.4 and 0.48 ± 0.25 of it."""
    from specred.simulate.evaluate import truth_on_pixels

    _, truth, science, _ = reduced
    n = 0
    for rs in science:
        if "TRACE_FROM_REFERENCE" not in rs.flags:
            continue
        ts = truth.spectrum(rs.target, "SOFI")
        tp = truth_on_pixels(np.asarray(ts["wavelength"], float), np.asarray(ts["flux"], float), rs.wave,
                             float(truth.optics["SOFI"]["lsf_fwhm_px"]))
        good = ~rs.mask & np.isfinite(rs.flux) & (rs.wave > 10000) & (rs.wave < 13200)
        level = np.sum(rs.flux[good]) / np.sum(tp[good])
        err = np.sqrt(np.sum(rs.sigma[good] ** 2)) / np.sum(tp[good])
        assert abs(level - 1.0) <= 0.15 + 3 * err, (rs.target, level, err)
        n += 1
    if not n:
        pytest.skip("no faint target in this night")


def test_oh_lines_subtract_to_the_noise(reduced):
    _, _, _, scores = reduced
    for t, s in scores.items():
        assert s.oh_residual <= 2.0, (t, s.oh_residual)


def test_wavelength_zero_point_within_one_angstrom(reduced):
    _, _, _, scores = reduced
    assert all(abs(s.zero_point_aa) <= 1.0 for s in scores.values()), {t: s.zero_point_aa for t, s in scores.items()}


def test_flux_and_telluric_correction_match_truth(reduced):
    _, _, _, scores = reduced
    for t, s in scores.items():
        assert s.flux_mad <= 0.05, (t, s.flux_mad)
        assert abs(s.flux_level - 1.0) <= 0.10, (t, s.flux_level)


def test_a0v_hydrogen_lines_leave_no_residual(reduced):
    """|flux/truth| at Paβ and Paγ over beside them: <= 3 % within the noise of each target."""
    _, _, _, scores = reduced
    n = 0
    assert scores
    for t, s in scores.items():
        for line, (r, noise) in s.hydrogen_residual.items():
            assert abs(r) <= 0.03 + 3 * noise, (t, line, r, noise)
            n += 1
    assert n >= 2


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("sofi_bad")
    simulate_night(out, night="2018-08-27", instrument="sofi", seed=4)
    return out


def _copy(night, dest, keep):
    frames = Table.read(night / "truth" / "frames.ecsv")
    raw = dest / "raw"
    raw.mkdir(parents=True)
    for f in frames:
        if keep(f):
            shutil.copy(night / "raw" / f["file"], raw / f["file"])
    return raw, frames


def test_missing_b_frame_and_missing_telluric_are_flagged_and_reduced(night, tmp_path):
    frames = Table.read(night / "truth" / "frames.ecsv")
    sci = frames[frames["type"] == "science"]
    first = sci["object"][0]
    drop_b = sci["file"][(sci["object"] == first) & (sci["nod"] == "B")][0]
    tel = frames[frames["type"] == "telluric"]
    # the telluric sequence observed right after the first target is missing
    end = max(sci["date_obs"][sci["object"] == first])
    later = tel[tel["date_obs"] > end]
    next_star = later["object"][np.argmin(later["date_obs"])]
    gone = {drop_b, *later["file"][later["object"] == next_star][:4]}
    raw, _ = _copy(night, tmp_path, lambda f: f["file"] not in gone)
    res = reduce_night(raw, tmp_path / "red")
    rows = {r["target"]: r for r in res.table if r["kind"] == "science"}
    assert set(rows) == set(sci["object"])                      # the rest of the night reduces
    flags = rows[first]["flags"]
    assert "ABBA_INCOMPLETE" in flags and "TELLURIC_NEAREST_AIRMASS" in flags, flags


def test_grism_change_mid_sequence_is_reported(night, tmp_path):
    raw, frames = _copy(night, tmp_path, lambda f: True)
    sci = frames[frames["type"] == "science"]
    with fits.open(raw / sci["file"][1], mode="update") as h:
        h[0].header["HIERARCH ESO INS OPTI2 NAME"] = "GR"
        h[0].header["HIERARCH ESO INS FILT1 NAME"] = "GRF"
    res = reduce_night(raw, tmp_path / "red")
    assert any("GR/" in p and "blue grism" in p for p in res.problems), res.problems
    assert sci["object"][0] in set(res.table["target"])


def test_no_flux_standard_calibrates_from_the_telluric_star(night, tmp_path):
    """Without a spectrophotometric standard the A0V star's V magnitude and the Vega model
    set the flux scale (flagged); bright targets still land within 10 % of truth."""
    raw, frames = _copy(night, tmp_path, lambda f: f["type"] != "flux_standard")
    res = reduce_night(raw, tmp_path / "red")
    truth = Truth(night)
    f12 = {str(r["object_id"]): float(r["f12100"]) for r in truth.targets}
    science = [rs for rs in res.spectra if rs.meta["kind"] == "science"]
    assert sorted(rs.target for rs in science) == sorted(set(frames["object"][frames["type"] == "science"]))
    assert all("FLUX_FROM_TELLURIC" in rs.flags for rs in science)
    levels = {rs.target: evaluate_sofi_spectrum(truth, rs).flux_level for rs in science if f12[rs.target] > 5e-18}
    assert levels and all(abs(v - 1.0) <= 0.10 for v in levels.values()), levels


def test_sequence_at_one_nod_position_is_reported_and_the_rest_reduces(night, tmp_path):
    frames = Table.read(night / "truth" / "frames.ecsv")
    sci = frames[frames["type"] == "science"]
    first = sci["object"][0]
    gone = set(sci["file"][(sci["object"] == first) & (sci["nod"] == "B")])
    raw, _ = _copy(night, tmp_path, lambda f: f["file"] not in gone)
    res = reduce_night(raw, tmp_path / "red")
    row = [r for r in res.table if r["target"] == first][0]
    assert row["kind"] == "science" and "FAILED" in row["flags"] and "no A-B pair" in row["flags"], row["flags"]
    others = set(sci["object"]) - {first}
    assert others <= {rs.target for rs in res.spectra}
