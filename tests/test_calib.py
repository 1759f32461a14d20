"""The run-time reference data (calib/*.ecsv) and their loaders (specred.calib).

Self-consistency checks run everywhere; cross-checks against the real PESSTO reference data
in ../shared/ntt-reference skip with a clear reason when that folder is absent.
"""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table

from specred import calib
from specred._resources import calib_path
from specred.errors import SpecredError

from conftest import NTT_REF, need_shared

WAVE_COLS = ("wavelength", "wave_vac", "wave_min")


def _ref(rel: str):
    need_shared(NTT_REF)
    return NTT_REF / rel


def _arr(col) -> np.ndarray:
    return np.asarray(col, dtype=float)


# ============================================================================ files
@pytest.mark.parametrize("name", calib.calib_files())
def test_every_calib_file_loads_with_provenance(name):
    path = calib_path(name)
    assert path.stat().st_size < 300_000, "keep calib files small"
    t = Table.read(path, format="ascii.ecsv")
    assert len(t) > 0
    for key in ("description", "source", "derived"):
        assert str(t.meta.get(key, "")).strip(), f"{name}: meta[{key!r}] missing"
    if any(c in t.colnames for c in WAVE_COLS):
        assert t.meta.get("medium") in ("air", "vacuum"), name
        wcol = next(c for c in WAVE_COLS if c in t.colnames)
        assert t[wcol].unit == u.AA, f"{name}: {wcol} must carry a unit"


def test_expected_files_present():
    files = set(calib.calib_files())
    need = {"arc_lines_HeAr.ecsv", "arc_lines_Xe.ecsv", "extinction_lasilla.ecsv", "standards.ecsv",
            "telluric_standards.ecsv", "sky_lines_optical.ecsv", "sky_lines_nir.ecsv",
            "telluric_bands.ecsv", "telluric_transmission.ecsv", "sensitivity_efosc2_gr13.ecsv",
            "sensitivity_sofi_gb.ecsv", "a0v_model.ecsv", "emission_lines.ecsv"}
    assert need <= files
    # every flux file of the index exists, and nothing unindexed lies around
    ff = {str(f) for f in calib.standards()["flux_file"] if str(f)}
    assert ff == {f for f in files if f.startswith("std_")}


def test_loaders_return_copies():
    t = calib.arc_lines("HeAr")
    t["intensity"][:] = -1.0
    assert np.all(_arr(calib.arc_lines("HeAr")["intensity"]) > 0)


@pytest.mark.parametrize("call", [lambda: calib.arc_lines("neon"), lambda: calib.sky_lines("uv"),
                                  lambda: calib.nominal_sensitivity("EFOSC2_GR11"),
                                  lambda: calib.telluric_transmission(5000.0, medium="glass"),
                                  lambda: calib.telluric_transmission(5000.0, airmass=-1)])
def test_bad_arguments_raise_specred_error(call):
    with pytest.raises(SpecredError):
        call()


# ============================================================================ air / vacuum
def test_air_vacuum_conversion():
    assert calib.air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.02)
    assert calib.vacuum_to_air(5008.24) == pytest.approx(5006.84, abs=0.02)
    assert isinstance(calib.air_to_vacuum(6562.80), float)
    w = np.linspace(2001.0, 30000.0, 5000)
    assert np.max(np.abs(calib.vacuum_to_air(calib.air_to_vacuum(w)) - w)) < 1e-4
    assert np.max(np.abs(calib.air_to_vacuum(calib.vacuum_to_air(w)) - w)) < 1e-4
    # identity below 2000 Å; Quantity in -> Quantity out, in the input unit
    assert calib.air_to_vacuum(1215.67) == 1215.67
    q = calib.air_to_vacuum(656.28 * u.nm)
    assert q.unit == u.nm and q.value == pytest.approx(656.461, abs=0.002)


def test_sofi_list_is_the_vacuum_version_of_the_efosc2_ar_lines():
    """PESSTO's SofI list gives the EFOSC2 (air) Ar I lines in vacuum: our formula agrees."""
    assert calib.air_to_vacuum(9122.97) == pytest.approx(9125.47, abs=0.01)
    assert calib.air_to_vacuum(8264.52) == pytest.approx(8266.79, abs=0.01)


# ============================================================================ arc lines
@pytest.mark.parametrize("lamp,medium,lo,hi", [("HeAr", "air", 3600, 9300), ("He-Ar", "air", 3600, 9300),
                                               ("Xe", "vacuum", 9300, 25300),
                                               ("Xenon", "vacuum", 9300, 25300)])
def test_arc_lines_basic(lamp, medium, lo, hi):
    t = calib.arc_lines(lamp)
    w = _arr(t["wavelength"])
    assert t.meta["medium"] == medium
    assert np.all(np.diff(w) > 0) and w.min() >= lo and w.max() <= hi
    assert np.all(_arr(t["intensity"]) > 0)
    assert t["preferred"].dtype == bool and t["preferred"].sum() >= 10


def test_hear_list_has_the_strong_lines():
    t = calib.arc_lines("HeAr")
    w, inten = _arr(t["wavelength"]), _arr(t["intensity"])

    def at(lam):
        i = int(np.argmin(np.abs(w - lam)))
        assert abs(w[i] - lam) < 0.2, lam
        return inten[i], str(t["species"][i])

    assert at(5875.6) == (inten.max(), "He I")
    strong_he = [5875.6, 6678.2, 7065.2, 3888.6, 4471.5, 5015.7]
    strong_ar = [6965.4, 7067.2, 7383.98, 7503.9, 7635.1, 8115.3, 8424.6, 7723.8, 9122.97, 8014.8,
                 8264.5, 9224.5]
    for lam in strong_he + strong_ar:
        val, sp = at(lam)
        assert val > 0.01 * inten.max(), lam          # > 1 % of He I 5876 (CCD response falls at 9200 Å)
        assert sp == ("He I" if lam in strong_he else "Ar I")
    # lamp-realistic: He I 6678 much stronger than He I 4713, Ar I 7635 the strongest Ar line
    assert at(6678.2)[0] > 10 * at(4713.2)[0]
    ar = t[t["species"] == "Ar I"]
    assert abs(float(ar["wavelength"][np.argmax(ar["intensity"])]) - 7635.1) < 0.1


def test_xe_list_covers_sofi_gb():
    t = calib.arc_lines("Xe")
    w = _arr(t["wavelength"])
    gb = (w > 9500) & (w < 16100)
    assert gb.sum() >= 20
    assert np.sum(gb & t["preferred"]) >= 10
    assert set(t["species"]) <= {"Xe I", "Ar I"}


def test_arc_lists_contain_every_line_pessto_identified():
    """Every line of the human-checked PESSTO wavelength solutions is in our lists."""
    efosc = "arcs/efosc2_gr13/arc_20120825_Gr13_"
    for rel, lamp, tol in [(efosc + "Free_slit1.0_56442_1.lines.ecsv", "HeAr", 0.1),
                           (efosc + "GG495_slit1.0_56442_1.lines.ecsv", "HeAr", 0.1),
                           ("arcs/sofi_gb/arc_GD71_1_GB_20111220.lines.ecsv", "Xe", 0.01),
                           ("arcs/sofi_gb/arc_20110625_GB_0_1.lines.ecsv", "Xe", 0.01),
                           ("arcs/sofi_gr/arc_GD71_2_GR_20120121.lines.ecsv", "Xe", 0.01)]:
        ref = np.unique(_arr(Table.read(_ref(rel))["ref_wavelength"]))
        ours = _arr(calib.arc_lines(lamp)["wavelength"])
        d = np.min(np.abs(ref[:, None] - ours[None, :]), axis=1)
        assert np.all(d < tol), (rel, ref[d >= tol])


def test_hear_intensities_rank_like_an_independent_real_arc():
    """Our intensities were measured on the Free arc; the GG495 arc of the same night is an
    independent frame: the measured line fluxes there must rank like ours."""
    from numpy.polynomial import legendre
    from scipy.ndimage import median_filter, minimum_filter1d
    from scipy.stats import spearmanr
    from astropy.io import fits

    base = "arcs/efosc2_gr13/arc_20120825_Gr13_GG495_slit1.0_56442_1"
    data = fits.getdata(_ref(base + ".fits")).astype(float)
    sol = Table.read(_ref(base + ".solution.ecsv"))
    s = sol[int(np.argmin(np.abs(sol["column_or_row"] - 430)))]
    ltv2 = float(sol.meta["LTV2"])
    rows = np.arange(1, data.shape[0] + 1, dtype=float)
    phys = rows - ltv2
    n = (2 * phys - (s["pmax"] + s["pmin"])) / (s["pmax"] - s["pmin"])
    wave = legendre.legval(n, np.asarray(s["coefficients"], float))
    prof = np.median(data[:, 427:434], axis=1)
    prof = prof - median_filter(minimum_filter1d(prof, 25), 25)
    t = calib.arc_lines("HeAr")
    use = t["measured"] & ~t["blended"] & (_arr(t["wavelength"]) > 5000) & (_arr(t["wavelength"]) < 9200)
    ours, real = [], []
    for lam, inten in zip(_arr(t["wavelength"])[use], _arr(t["intensity"])[use]):
        y = int(round(np.interp(lam, wave, rows))) - 1
        if prof[y - 3:y + 4].max() > 55000:
            continue
        ours.append(inten)
        real.append(prof[y - 3:y + 4].sum())
    assert len(ours) >= 8
    rho = spearmanr(ours, real).correlation
    assert rho > 0.9, rho


# ============================================================================ extinction
def test_extinction_values_and_shape():
    k55 = float(calib.extinction(5500.0))
    assert 0.1 < k55 < 0.2
    w = np.arange(3500.0, 9001.0, 10.0)
    k = calib.extinction(w)
    assert np.all(np.diff(k) <= 1e-3)
    assert k[0] > 3 * k[-1]
    assert calib.extinction(550 * u.nm) == pytest.approx(k55)
    # constant beyond the ends; tiny (continuum only) in the near-IR
    t = calib.extinction_table()
    assert calib.extinction(1000.0) == pytest.approx(float(t["extinction"][0]))
    assert calib.extinction(40000.0) == pytest.approx(float(t["extinction"][-1]))
    nir = calib.extinction(np.array([12500.0, 16500.0, 22000.0]))
    assert np.all((nir > 0) & (nir < 0.01))
    assert _arr(t["wavelength"]).max() >= 25000


def test_extinction_equals_lasilla2_at_its_nodes():
    ref = Table.read(_ref("extinction/lasilla2.ecsv"))
    k = calib.extinction(_arr(ref["wavelength_angstrom"]))
    assert np.allclose(k, _arr(ref["extinction_mag_per_airmass"]), atol=1e-6)


# ============================================================================ standards
def test_standards_index():
    t = calib.standards()
    assert {"name", "aliases", "ra", "dec", "vmag", "sptype", "flux_file"} <= set(t.colnames)
    assert t["ra"].unit == u.deg and t["dec"].unit == u.deg
    assert np.all((_arr(t["ra"]) >= 0) & (_arr(t["ra"]) < 360) & (np.abs(_arr(t["dec"])) <= 90))
    have = {str(n) for n, f in zip(t["name"], t["flux_file"]) if str(f)}
    assert {"LTT 7987", "LTT 3218", "LTT 1020", "Feige 110", "GD 71", "EG 274", "GD 153", "BD+17 4708",
            "LTT 1788", "LTT 377"} <= have
    # enough stars with near-IR tables for SofI; optical-only tables flagged by their range
    nir = (_arr(t["flux_wmax"]) > 24000) & (_arr(t["flux_wmin"]) < 3300)
    assert nir.sum() >= 7
    # no alias may point to two stars
    from specred.calib import _norm
    seen = {}
    for r in t:
        for a in {_norm(x) for x in [r["name"], *str(r["aliases"]).split(",")] if x}:
            assert seen.setdefault(a, r["name"]) == r["name"], a


def test_gd71_flux_scale():
    t = calib.standard_flux("GD71")
    assert t.meta["medium"] == "air"
    f5500 = float(np.interp(5500.0, _arr(t["wavelength"]), _arr(t["flux"])))
    assert f5500 == pytest.approx(2.19e-14, rel=0.05)
    assert t["flux"].unit == u.erg / u.s / u.cm**2 / u.AA


@pytest.mark.parametrize("alias", ["LTT 7987", "LTT7987", "ltt 7987", "L7987", "ltt7987.dat", "LTT7987_xs"])
def test_standard_aliases(alias):
    assert calib.standard_flux(alias).meta["star"] == "LTT 7987"


def test_unknown_or_fluxless_standard_raises_clear_error():
    with pytest.raises(SpecredError, match="Vega.*LTT 7987"):
        calib.standard_flux("Vega")
    with pytest.raises(SpecredError, match="HR 718.*no flux table"):
        calib.standard_flux("hr718")


def test_flux_tables_are_clean_and_cover_efosc2():
    for name in calib.standards()["name"][[bool(str(f)) for f in calib.standards()["flux_file"]]]:
        t = calib.standard_flux(str(name))
        w, f = _arr(t["wavelength"]), _arr(t["flux"])
        assert np.all(np.diff(w) > 0), name
        assert np.all(f > 0) and np.all(np.isfinite(f)), name
        assert w.min() <= 3650 and w.max() >= 9250, name
        assert np.median(np.diff(w[w < 9000])) <= 50, name
        # V from the table agrees with the index (synthetic V within 0.1 mag)
        vm = float(calib.standards()["vmag"][list(calib.standards()["name"]).index(name)])
        m = (w > 5050) & (w < 5950)
        assert -2.5 * np.log10(np.mean(f[m]) / 3.63e-9) == pytest.approx(vm, abs=0.1), name


@pytest.mark.parametrize("fname,star,vacuum", [("GD71_xs", "GD 71", True), ("GD153_xs", "GD 153", True),
                                               ("BD17_xs", "BD+17 4708", True), ("EG274_xs", "EG 274", False),
                                               ("feige110_xs", "Feige 110", False),
                                               ("LTT3218_xs", "LTT 3218", False),
                                               ("LTT7987_xs", "LTT 7987", False)])
def test_binned_flux_tables_match_the_originals(fname, star, vacuum):
    """Binning the original table the same way reproduces ours to 2 %."""
    ref = Table.read(_ref(f"standards/{fname}.ecsv"))
    w, f = _arr(ref["wavelength_angstrom"]), _arr(ref["flux"])
    uw, inv = np.unique(w, return_inverse=True)
    uf = np.bincount(inv, weights=f) / np.bincount(inv)
    if vacuum:
        uw = calib.vacuum_to_air(uw)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (uf[1:] + uf[:-1]) * np.diff(uw))])
    ours = calib.standard_flux(star)
    cw = _arr(ours["wavelength"])
    half = np.where(cw < 10000, 5.0, 12.5)
    ref_bin = (np.interp(cw + half, uw, cum) - np.interp(cw - half, uw, cum)) / (2 * half)
    assert np.allclose(_arr(ours["flux"]), ref_bin, rtol=0.02)
    assert cw.max() > 24000


def test_hamuy_table_conversion():
    """LTT 1020: AB = 11.483 at 5500 Å in Hamuy et al. (1994)."""
    t = calib.standard_flux("LTT 1020")
    f = float(np.interp(5500.0, _arr(t["wavelength"]), _arr(t["flux"])))
    assert f == pytest.approx(10 ** (-0.4 * (11.483 + 48.60)) * 2.99792458e18 / 5500.0**2, rel=1e-4)
    # the telluric A band of the source table is interpolated away
    f76 = float(np.interp(7600.0, _arr(t["wavelength"]), _arr(t["flux"])))
    f75 = float(np.interp(7550.0, _arr(t["wavelength"]), _arr(t["flux"])))
    assert abs(f76 / f75 - 1) < 0.03


# ============================================================================ find_standard
def test_find_standard_by_position_name_and_kind():
    ltt3218 = calib.find_standard(130.39, -32.948611)          # PESSTO EFOSC2 list position
    assert ltt3218 is not None and ltt3218.name == "LTT 3218" and ltt3218.kind == "flux"
    assert ltt3218.flux_file == "std_ltt3218.ecsv"
    assert calib.find_standard(123.4567, -5.4321) is None
    tell = calib.telluric_standards()[100]
    s = calib.find_standard(float(tell["ra"]) + 10 / 3600, float(tell["dec"]))
    assert s is not None and s.kind == "telluric" and s.name == tell["name"] and s.sptype == "A0V"
    assert calib.find_standard(float(tell["ra"]) + 0.1, float(tell["dec"]), radius_arcsec=60) is None
    # name fallback (position unknown or far away)
    assert calib.find_standard(None, None, name="Feige110").name == "Feige 110"
    assert calib.find_standard(float("nan"), 0.0, name=str(tell["name"]).replace(" ", "")).kind == "telluric"
    assert calib.find_standard(None, None, name="NGC 1068") is None
    with pytest.raises(Exception):
        ltt3218.name = "x"                                        # frozen dataclass


def test_every_listed_standard_is_found_at_its_listed_position():
    sofi = Table.read(_ref("standards/standard_sofi_phot.ecsv"))
    for r in sofi:
        s = calib.find_standard(float(r["ra_deg"]), float(r["dec_deg"]))
        assert s is not None and s.kind == "flux" and s.flux_file, r["name"]
    efo = Table.read(_ref("standards/standard_efosc_mab.ecsv"))
    b1950 = {"bd253941.dat", "bd404032.dat", "l1363a.dat", "bd262606.dat", "hd84937.dat", "bd174708.dat"}
    for r in efo:
        if r["name"] in b1950:
            continue
        s = calib.find_standard(float(r["ra_deg"]), float(r["dec_deg"]))
        assert s is not None and s.kind == "flux", r["name"]


def test_telluric_standards():
    t = calib.telluric_standards()
    assert len(t) >= 300
    assert np.all(np.isfinite(_arr(t["vmag"])))
    assert len(set(t["name"])) == len(t)
    assert set(t["sptype"]) == {"A0V"}
    dec = _arr(t["dec"])
    assert dec.min() < -60 and dec.max() > 20


def test_telluric_list_matches_pessto():
    ref = Table.read(_ref("standards/standard_sofi_vega.ecsv"))
    ours = calib.telluric_standards()
    import re

    names = set()
    for n in ref["name"]:
        m = re.fullmatch(r"(?i)(hip|hd)\s*0*(\d+)", str(n).replace(".dat", ""))
        names.add(f"{m.group(1).upper()} {int(m.group(2))}")
    assert set(ours["name"]) <= names
    assert len(ours) >= 0.95 * len(names)


# ============================================================================ sky
def test_sky_lines_optical():
    t = calib.sky_lines("optical")
    w, f = _arr(t["wavelength"]), _arr(t["flux"])
    assert t.meta["medium"] == "air" and np.all(np.diff(w) >= 0) and w.min() >= 3600 and w.max() <= 9300
    assert np.all(f > 0)
    i = int(np.argmin(np.abs(w - 5577.34)))
    assert abs(w[i] - 5577.34) < 0.01 and t["species"][i] == "[O I]"
    rayleigh = f[i] / (1e6 / (4 * np.pi) / 4.2545e10 * 1.98644586e-8 / 5577.34)
    assert 100 < rayleigh < 400
    for lam in (6300.30, 6363.78, 5889.95, 5895.92, 4358.34, 5460.74):
        assert np.min(np.abs(w - lam)) < 0.05, lam
    oh = np.asarray(t["species"]) == "OH"
    assert oh.sum() > 50 and np.all(w[oh] > 6000)
    assert "continuum_ab_mag_arcsec2" in t.meta


def test_sky_continuum():
    w = np.array([3600.0, 4500.0, 5500.0, 8000.0, 12500.0, 16500.0])
    c = calib.sky_continuum(w)
    assert np.all(c > 0)
    # V ~ 22 AB mag/arcsec^2 between the lines
    mab = -2.5 * np.log10(c[2] * 5500.0**2 / 2.99792458e18) - 48.60
    assert 21.5 < mab < 22.5
    # near-IR interline continuum ~ 1200 photons s^-1 m^-2 um^-1 arcsec^-2 (Maihara et al. 1993)
    photons = c[4:] / (1.98644586e-8 / w[4:]) * 1e4 * 1e4
    assert np.allclose(photons, 1200, rtol=0.2)
    assert calib.sky_continuum(550 * u.nm) == pytest.approx(c[2])


def _band_mag(t, lo, hi, zp):
    w, f = _arr(t["wavelength"]), _arr(t["flux"])
    grid = np.linspace(lo, hi, 200)
    total = f[(w >= lo) & (w <= hi)].sum() / (hi - lo) + np.mean(calib.sky_continuum(grid))
    return -2.5 * np.log10(total / zp)


def test_sky_lines_nir_scale():
    t = calib.sky_lines("nir")
    w = _arr(t["wavelength"])
    assert t.meta["medium"] == "vacuum" and np.all(np.diff(w) >= 0) and w.min() >= 9300 and w.max() <= 16700
    assert _band_mag(t, 11700, 13300, 3.129e-10) == pytest.approx(15.8, abs=0.2)
    assert _band_mag(t, 15000, 16500, 1.133e-10) == pytest.approx(14.0, abs=0.2)
    assert any("O2" in s for s in t["species"])


def _xcorr_best(model_w, model_f, data_w, data_y, fwhm, shifts):
    from scipy.ndimage import median_filter, minimum_filter1d
    s = fwhm / 2.3548
    y = data_y - median_filter(minimum_filter1d(data_y, 15), 31)
    best = (None, -1.0)
    for sh in shifts:
        x = (data_w[:, None] - model_w[None, :] - sh) / s
        m = np.sum(model_f[None, :] * np.exp(-0.5 * x**2), axis=1)
        c = np.corrcoef(m, y)[0, 1]
        if c > best[1]:
            best = (sh, c)
    return best


def test_sky_lines_match_the_real_sky_spectra():
    """Our OH lines, convolved to the instrument resolution, correlate with PESSTO's real
    night-sky spectra at (almost) zero shift."""
    gb = Table.read(_ref("sky/sky_GB.ecsv"))
    gw, gy = _arr(gb["wavelength_angstrom"]), _arr(gb["flux"])
    ok = gw > 9500
    nir = calib.sky_lines("nir")
    sh, c = _xcorr_best(_arr(nir["wavelength"]), _arr(nir["flux"]), gw[ok], gy[ok], 23.0,
                        np.arange(-12, 12.1, 1.0))
    assert c > 0.8 and abs(sh) <= 8, (sh, c)
    ef = Table.read(_ref("sky/sky_Gr13_Free.ecsv"))
    ew, ey = _arr(ef["wavelength_angstrom"]), _arr(ef["flux"])
    ok = (ew > 6800) & (ew < 9250)
    opt = calib.sky_lines("optical")
    sh, c = _xcorr_best(_arr(opt["wavelength"]), _arr(opt["flux"]), ew[ok], ey[ok], 15.0,
                        np.arange(-8, 8.1, 1.0))
    assert c > 0.7 and abs(sh) <= 4, (sh, c)


# ============================================================================ telluric
def test_telluric_transmission_o2_a_band():
    w = np.arange(7590.0, 7630.0, 1.0)                           # air
    t1 = calib.telluric_transmission(w, airmass=1.0, medium="air")
    t2 = calib.telluric_transmission(w, airmass=2.0, medium="air")
    head = np.abs(w - 7594) < 15
    assert t1[head].min() < 0.5
    assert np.all(t2 <= t1 + 1e-12) and t2[head].min() < t1[head].min() - 0.05
    assert calib.telluric_transmission(7500.0) > 0.99                 # just blueward of the head
    assert np.all(calib.telluric_transmission(np.arange(4000.0, 5800.0, 7.0)) > 0.99)


def test_telluric_transmission_nir_and_media():
    w = np.arange(13500.0, 14500.0, 5.0)                         # vacuum
    t = calib.telluric_transmission(w, medium="vacuum")
    assert np.mean(t < 0.2) > 0.7
    j = np.arange(12000.0, 13200.0, 5.0)
    assert np.median(calib.telluric_transmission(j, medium="vacuum")) > 0.95
    # same physical wavelengths in both media give the same transmission
    wa = np.arange(6800.0, 9800.0, 0.7)
    assert np.allclose(calib.telluric_transmission(wa, medium="air"),
                       calib.telluric_transmission(calib.air_to_vacuum(wa), medium="vacuum"))
    # no water: only O2 left (the 9300 water band disappears)
    dry = calib.telluric_transmission(np.arange(9300.0, 9500.0, 2.0), h2o_scale=0.0)
    assert np.all(dry > 0.99)
    t_all = calib.telluric_transmission(np.arange(3000.0, 26000.0, 3.0), airmass=1.7, medium="vacuum")
    assert np.all((t_all >= 0) & (t_all <= 1))
    assert calib.telluric_transmission(760 * u.nm, medium="air") < 0.9


def test_telluric_table_matches_atlas():
    """Our 2 Å bins reproduce the 1 Å ATLAS versions when both are averaged over 40 Å."""
    tab = Table.read(calib_path("telluric_transmission.ecsv"))
    assert tab.meta["airmass_exponent"] == calib.AIRMASS_EXPONENT
    ours_w = calib.vacuum_to_air(_arr(tab["wavelength"]))
    for nm, col, lo, hi in [("O2", "t_o2", 7580, 7720), ("O2", "t_o2", 6860, 6960),
                            ("H2O", "t_h2o", 7160, 7360),
                            ("H2O", "t_h2o", 9280, 9680)]:
        ref = Table.read(_ref(f"telluric/ATLAS_{nm}_1A.ecsv"))
        rw, rt = _arr(ref["wavelength_angstrom"]), np.clip(_arr(ref["transmission"]), 0, 1)
        for a in np.arange(lo, hi, 40.0):
            mine = np.mean(_arr(tab[col])[(ours_w >= a) & (ours_w < a + 40)])
            theirs = np.mean(rt[(rw >= a + 0.5) & (rw < a + 39.5)])
            assert mine == pytest.approx(theirs, abs=0.02), (nm, a)


def test_telluric_bands_cover_the_absorption():
    b = calib.telluric_bands()
    assert b.meta["medium"] == "air"
    lo, hi = _arr(b["wave_min"]), _arr(b["wave_max"])
    assert np.all(hi > lo) and np.all(_arr(b["wave_min_vac"]) > lo)
    names = set(b["name"])
    assert {"O2 B", "O2 A", "H2O 7200", "H2O 8200", "H2O 9300", "H2O 1.13um", "H2O 1.4um",
            "O2 1.27um"} <= names
    a = b[b["name"] == "O2 A"][0]
    assert a["wave_min"] < 7594 < a["wave_max"] and a["strong"]
    # every wavelength where the model absorbs more than 10 % lies in a listed band
    w = np.arange(4000.0, 24000.0, 2.0)                          # air
    t = calib.telluric_transmission(w, medium="air")
    inside = np.zeros(w.size, bool)
    for l, h in zip(lo, hi):
        inside |= (w >= l) & (w <= h)
    assert np.all(inside[t < 0.9])


# ============================================================================ sensitivity
@pytest.mark.parametrize("setup,medium,lo,hi", [("EFOSC2_GR13", "air", 3700, 9250),
                                                 ("sofi_gb", "vacuum", 9400, 16400)])
def test_nominal_sensitivity_is_smooth_and_plausible(setup, medium, lo, hi):
    t = calib.nominal_sensitivity(setup)
    w, s = _arr(t["wavelength"]), _arr(t["sensitivity"])
    assert t.meta["medium"] == medium and t["sensitivity"].unit == u.mag
    assert w.min() <= lo and w.max() >= hi and np.all(np.diff(w) > 0)
    m = (w >= lo) & (w <= hi)
    assert np.all((s[m] > 30) & (s[m] < 40))
    assert 36 < s[m].max() < 39
    d2 = np.diff(s[m], 2)
    assert np.max(np.abs(d2)) < 0.05          # no telluric or line wiggles (filter edges allowed)


def test_sofi_sensitivity_peaks_in_j():
    t = calib.nominal_sensitivity("SOFI_GB")
    w, s = _arr(t["wavelength"]), _arr(t["sensitivity"])
    assert 12000 < w[np.argmax(s)] < 13500


def test_efosc2_sensitivity_matches_pessto():
    ref = Table.read(_ref("sensitivity/sens_merge_Gr13_Free_slit1.0_1.ecsv"))
    rw, rs = _arr(ref["wavelength_angstrom"]), _arr(ref["sensitivity_mag"])
    t = calib.nominal_sensitivity("EFOSC2_GR13")
    m = (rw > 3700) & (rw < 9280)
    ours = np.interp(rw[m], _arr(t["wavelength"]), _arr(t["sensitivity"]))
    assert np.max(np.abs(ours - rs[m])) < 0.02


# ============================================================================ A0V model
def test_a0v_model_has_paschen_beta():
    t = calib.a0v_model()
    assert t.meta["medium"] == "vacuum"
    w, f = _arr(t["wavelength"]), _arr(t["flux"])
    assert np.max(np.diff(w)) <= 10 and w.min() <= 3100 and w.max() >= 24900
    assert float(np.interp(5556.0, w, f)) == pytest.approx(3.46e-9, rel=0.02)
    near = np.abs(w - 12821.6) < 60
    lam_min = w[near][np.argmin(f[near])]
    assert abs(lam_min - 12821.6) <= 10
    cont = (np.abs(w - 12821.6) > 150) & (np.abs(w - 12821.6) < 300)
    assert f[near].min() < 0.9 * np.median(f[cont])
    for line in (10941.1, 10052.1, 21661.2, 6564.6):               # Pa gamma, Pa delta, Br gamma, H alpha
        sel = np.abs(w - line) < 40
        assert abs(w[sel][np.argmin(f[sel])] - line) <= 10, line


def test_a0v_model_matches_pessto_vega():
    ref = Table.read(_ref("vega_sun/vega.ecsv"))
    rw, rf = _arr(ref["wavelength_angstrom"]), _arr(ref["flux"])
    t = calib.a0v_model()
    m = (rw > 3100) & (rw < 24900)
    assert np.allclose(np.interp(rw[m], _arr(t["wavelength"]), _arr(t["flux"])), rf[m], rtol=1e-4)


# ============================================================================ line catalogue
REQUIRED = ["Lya", "NV_1240", "SiIV_1400", "CIV_1549", "HeII_1640", "AlIII_1857", "CIII_1909", "MgII_2800",
            "FeII_2400", "FeII_2600", "OII_3726", "OII_3729", "NeIII_3869", "CaII_K", "CaII_H", "Hdelta",
            "Hgamma", "NIII_4640", "HeII_4686", "Hbeta", "OIII_4959", "OIII_5007", "Mgb_5175", "HeI_5876",
            "NaD_5890", "NaD_5896", "OI_6300", "OI_6364", "NII_6548", "NII_6584", "Halpha", "SII_6717",
            "SII_6731", "CIV_5808", "CaII_8498", "CaII_8542", "CaII_8662", "SIII_9069", "SIII_9531",
            "HeI_10830", "Pagamma", "Pabeta", "Padelta", "FeII_12570", "FeII_16440"]


def test_emission_line_catalogue():
    t = calib.emission_lines()
    names = list(t["name"])
    assert len(set(names)) == len(names)
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, missing
    vac, air = _arr(t["wave_vac"]), _arr(t["wave_air"])
    hi = vac >= 2000
    assert np.allclose(air[hi], calib.vacuum_to_air(vac[hi]), atol=0.011)
    assert np.array_equal(air[~hi], vac[~hi])
    assert set(t["kind"]) <= {"emission", "absorption", "both"}
    assert t["broad"].dtype == bool

    def vac_of(n):
        return float(t["wave_vac"][names.index(n)])

    assert vac_of("Halpha") == pytest.approx(6564.61, abs=0.01)
    assert vac_of("OIII_5007") == pytest.approx(5008.24, abs=0.01)
    assert vac_of("NII_6584") == pytest.approx(6585.27, abs=0.01)
    assert t["kind"][names.index("CaII_K")] == "absorption"
    assert t["broad"][names.index("CIV_1549")] and not t["broad"][names.index("OIII_5007")]
