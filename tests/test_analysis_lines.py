"""Line fitting, redshifts and spectrum loading (specred.analysis)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import astropy.units as u
from astropy.table import Table
from scipy.special import erf

from conftest import REAL_SPECTRA, need_shared
from specred.analysis import (LineGroup, fit_lines, find_redshift, load_spectrum, make_spectrum,
                              rest_wavelength)
from specred.analysis import lines as L
from specred.errors import SpectrumError

C = 299792.458


def synthetic(z=0.05, snr=30.0, seed=0, fluxes=None, sigma_kms=80.0, lsf_fwhm=18.0, medium="air", absorb=0.0):
    """A flat continuum (1e-16 per Å) with Gaussian lines at known fluxes, EFOSC2-like sampling."""
    rng = np.random.default_rng(seed)
    wave = np.arange(3700.0, 9300.0, 5.6)
    wvac = wave if medium == "vacuum" else __import__("specred").calib.air_to_vacuum(wave)
    fluxes = fluxes or {"Hbeta": 3e-15, "OIII_5007": 6e-15, "OIII_4959": 6e-15 / 2.98, "Halpha": 9e-15,
                        "NII_6584": 3e-15, "NII_6548": 3e-15 / 3.05, "SII_6717": 1.2e-15, "SII_6731": 0.9e-15,
                        "OI_6300": 0.3e-15}
    cont = 1e-16 * np.ones_like(wave)
    f = cont.copy()
    for n, fl in fluxes.items():
        mu = rest_wavelength(n) * (1 + z)
        s = mu / C * np.hypot(sigma_kms, lsf_fwhm / 2.3548 / mu * C)
        # pixel-integrated, as a detector records it
        f += fl * 0.5 * (erf((wvac + 2.8 - mu) / (np.sqrt(2) * s)) - erf((wvac - 2.8 - mu) / (np.sqrt(2) * s))) / 5.6
        if absorb and n in L.BALMER:
            sa = mu * 700.0 / C
            f -= absorb * np.exp(-0.5 * ((wvac - mu) / sa) ** 2) / (np.sqrt(2 * np.pi) * sa) * 1e-16
    sig = np.full_like(wave, 1e-16 / snr)
    return wave, f + rng.standard_normal(wave.size) * sig, sig, fluxes


def spec_of(wave, flux, sig, medium="air", lsf=18.0):
    return make_spectrum(wave, flux, sig, medium=medium, lsf_fwhm_aa=lsf, name="synthetic")


# ---------------------------------------------------------------------------- fitting
def test_fluxes_redshift_and_width_are_recovered_with_calibrated_errors():
    pulls_f, pulls_z, fw = [], [], []
    for seed in range(40):
        w, f, s, truth = synthetic(seed=seed, snr=15.0, sigma_kms=150.0)
        res = fit_lines(spec_of(w, f, s), 0.05)
        for n in ("Hbeta", "OIII_5007", "Halpha", "NII_6584", "SII_6717", "SII_6731"):
            pulls_f.append((res[n].flux - truth[n]) / res[n].flux_err)
        pulls_z.append((res.group_z["narrow"] - 0.05) / res.group_z_err["narrow"])
        fw.append(res["Halpha"].fwhm_kms)
    assert abs(np.mean(pulls_f)) < 0.2
    assert 0.8 < np.std(pulls_f) < 1.25
    assert 0.8 < np.std(pulls_z) < 1.25
    # intrinsic FWHM 353 km/s after removing the 18 Å instrumental FWHM
    assert abs(np.median(fw) - 2.3548 * 150.0) < 40.0


def test_doublets_are_tied_and_lines_outside_are_reported():
    w, f, s, truth = synthetic(z=0.40, snr=20)
    res = fit_lines(spec_of(w, f, s), 0.40)
    assert res["OIII_5007"].flux / res["OIII_4959"].flux == pytest.approx(2.98, rel=1e-9)
    assert res["NII_6584"].flux / res["NII_6548"].flux == pytest.approx(3.05, rel=1e-9)
    # Hα at 0.92 µm is covered, [S II] at 9400 Å is not
    assert not res["SII_6731"].covered and "NOT_COVERED" in res["SII_6731"].flags
    assert np.isnan(res["SII_6731"].flux)


def test_undetected_line_gets_a_three_sigma_upper_limit_and_table_has_units():
    fl = {"Hbeta": 3e-15, "OIII_5007": 6e-15, "OIII_4959": 2e-15, "Halpha": 9e-15, "NII_6584": 0.0,
          "NII_6548": 0.0, "SII_6717": 1e-15, "SII_6731": 1e-15, "OI_6300": 0.0}
    w, f, s, _ = synthetic(fluxes=fl, snr=20, seed=2)
    res = fit_lines(spec_of(w, f, s), 0.05)
    oi = res["OI_6300"]
    assert not oi.detected and np.isfinite(oi.flux_upper_limit) and oi.flux_upper_limit > 0
    assert oi.flux < oi.flux_upper_limit
    tab = res.to_table()
    assert tab["flux"].unit == u.Unit("erg s-1 cm-2") and tab["fwhm_kms"].unit == u.km / u.s
    assert res["Halpha"].ew_rest == pytest.approx(9e-15 / 1e-16 / 1.05, rel=0.05)


def test_shift_grid_prevents_halpha_locking_onto_nii():
    # started 1e-3 off (300 km/s): Hα must stay Hα
    w, f, s, truth = synthetic(z=0.1, snr=25, seed=4)
    res = fit_lines(spec_of(w, f, s), 0.1 + 1e-3)
    assert abs(res.group_z["narrow"] - 0.1) < 1e-4
    assert res["Halpha"].flux == pytest.approx(truth["Halpha"], rel=0.1)


def test_monte_carlo_errors_agree_with_covariance():
    w, f, s, _ = synthetic(snr=20, seed=5)
    sp = spec_of(w, f, s)
    cov = fit_lines(sp, 0.05)
    mc = fit_lines(sp, 0.05, mc=60, seed=1)
    assert mc.method == "mc60"
    for n in ("Hbeta", "Halpha", "OIII_5007"):
        assert mc[n].flux_err == pytest.approx(cov[n].flux_err, rel=0.35)


def test_balmer_absorption_component_recovers_emission_under_absorption():
    w, f, s, truth = synthetic(snr=60, seed=6, absorb=4.0)   # 4 Å EW absorption under Balmer lines
    sp = spec_of(w, f, s)
    plain = fit_lines(sp, 0.05)
    withabs = fit_lines(sp, 0.05, balmer_absorption=True)
    assert plain["Hbeta"].flux < 0.92 * truth["Hbeta"]
    assert withabs["Hbeta"].flux == pytest.approx(truth["Hbeta"], rel=0.08)
    assert np.isfinite(withabs.absorption_sigma_kms)
    # 'auto' keeps the component only when the data demand it (Δχ² > 11.8)
    w, f, s, truth = synthetic(snr=60, seed=6, absorb=8.0)
    auto = fit_lines(spec_of(w, f, s), 0.05, balmer_absorption="auto")
    assert np.isfinite(auto.absorption_sigma_kms)
    assert auto["Hbeta"].flux == pytest.approx(truth["Hbeta"], rel=0.08)
    w, f, s, truth = synthetic(snr=60, seed=6, absorb=0.0)
    assert np.isnan(fit_lines(spec_of(w, f, s), 0.05, balmer_absorption="auto").absorption_sigma_kms)


def test_broad_and_narrow_groups_fit_together():
    w, f, s, truth = synthetic(z=0.1, snr=40, seed=7, fluxes={"Halpha": 5e-15, "NII_6584": 2e-15,
                                                              "NII_6548": 2e-15 / 3.05})
    wvac = __import__("specred").calib.air_to_vacuum(w)
    mu = rest_wavelength("Halpha") * 1.1
    sb = mu * 2000.0 / C
    f = f + 4e-14 * np.exp(-0.5 * ((wvac - mu) / sb) ** 2) / (np.sqrt(2 * np.pi) * sb)
    groups = [LineGroup("narrow", ("NII_6548", "Halpha", "NII_6584"), sigma_kms=80.0),
              LineGroup("broad", ("Halpha",), sigma_kms=1500.0, sigma_max_kms=6000.0, max_shift_kms=1500.0)]
    res = fit_lines(spec_of(w, f, s), 0.1, groups=groups, window_kms=15000.0)
    broad = [ln for ln in res.lines if ln.group == "broad"][0]
    assert broad.flux == pytest.approx(4e-14, rel=0.1)
    assert broad.fwhm_kms == pytest.approx(2.3548 * 2000.0, rel=0.15)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind, match", [
    ("empty", "empty"), ("nan", "all NaN"), ("negative", "negative"), ("zero", "zero uncertainty"),
    ("nonmono", "monotonic"), ("unit", "flux unit"), ("medium", "medium"),
])
def test_bad_spectra_raise_clear_errors(kind, match):
    w, f, s, _ = synthetic()
    kw = {"medium": "air"}
    if kind == "empty":
        w, f, s = w[:0], f[:0], s[:0]
    elif kind == "nan":
        f = np.full_like(f, np.nan)
    elif kind == "negative":
        s = s.copy()
        s[10] = -1e-17
    elif kind == "zero":
        s = s.copy()
        s[10] = 0.0
    elif kind == "nonmono":
        w = w.copy()
        w[100], w[101] = w[101], w[100]
    elif kind == "unit":
        kw["flux_unit"] = "km/s"
    elif kind == "medium":
        kw["medium"] = "glass"
    with pytest.raises(SpectrumError, match=match):
        make_spectrum(w, f, s, **kw)


def test_missing_units_and_medium_in_a_table_are_errors(tmp_path):
    w, f, s, _ = synthetic()
    t = Table({"wavelength": w, "flux": f, "uncertainty": s})
    p = tmp_path / "nounits.ecsv"
    t.write(p)
    with pytest.raises(SpectrumError, match="unit|medium"):
        load_spectrum(p)
    t["wavelength"].unit = u.AA
    t["flux"].unit = u.Unit("erg s-1 cm-2 AA-1")
    t["uncertainty"].unit = u.Unit("erg s-1 cm-2 AA-1")
    t.meta["medium"] = "air"
    t.write(p, overwrite=True)
    sp = load_spectrum(p)
    assert sp.medium_in == "air" and sp.wave[0] > w[0]       # converted to vacuum


def test_fast_fits_reader_gives_what_astropy_gives(tmp_path, monkeypatch):
    """The CFITSIO path for 1D table files returns the same spectrum and header meta as the
    astropy reader (HIERARCH strings included); other layouts go to the astropy reader."""
    from astropy.io import fits
    from specred.analysis import spectrum as S
    w, f, s, _ = synthetic()
    cols = [fits.Column("wavelength", "D", unit="Angstrom", array=w),
            fits.Column("flux", "D", unit="erg s-1 cm-2 Angstrom-1", array=f),
            fits.Column("uncertainty", "D", unit="erg s-1 cm-2 Angstrom-1", array=s),
            fits.Column("mask", "L", array=np.arange(w.size) % 97 == 0)]
    h0 = fits.Header()
    h0["OBJECT"] = "J010203.04"
    h0["RA"] = 15.5125
    h0["HIERARCH SPECRED MASK"] = "True = bad or no data"
    h0["HIERARCH SPECRED TELLURIC"] = 180
    h0["LSFPIX"] = 3.2
    tb = fits.BinTableHDU.from_columns(cols, name="DATA")
    tb.header["TCTYP1"] = "AWAV"
    p = tmp_path / "one.fits"
    fits.HDUList([fits.PrimaryHDU(header=h0), tb]).writeto(p)
    assert S._fast_table(p) is not None
    fast = load_spectrum(p)
    monkeypatch.setattr(S, "_fast_table", lambda path: None)
    slow = load_spectrum(p)
    for k in ("wave", "flux", "sigma", "good", "lsf_sigma_kms"):
        assert np.array_equal(getattr(fast, k), getattr(slow, k), equal_nan=True), k
    assert fast.meta == slow.meta and fast.meta["SPECRED MASK"] == "True = bad or no data"
    assert fast.medium_in == "air" and not fast.good[0]
    monkeypatch.undo()
    # a scaled column, or a third HDU: not the simple layout, read by astropy
    tb2 = tb.copy()
    tb2.header["TSCAL2"] = 1.0
    tb2.header["TCTYP1"] = "AWAV"
    fits.HDUList([fits.PrimaryHDU(header=h0), tb2]).writeto(tmp_path / "scaled.fits")
    fits.HDUList([fits.PrimaryHDU(header=h0), tb, fits.ImageHDU(np.zeros(3))]).writeto(tmp_path / "three.fits")
    for name in ("scaled.fits", "three.fits"):
        assert S._fast_table(tmp_path / name) is None
        assert np.allclose(load_spectrum(tmp_path / name).flux, fast.flux, rtol=1e-6, atol=2e-19)


def test_fit_rejects_bad_redshift_and_unknown_lines():
    w, f, s, _ = synthetic()
    sp = spec_of(w, f, s)
    with pytest.raises(SpectrumError, match="redshift"):
        fit_lines(sp, float("nan"))
    with pytest.raises(SpectrumError, match="unknown line"):
        fit_lines(sp, 0.05, ["Halpha", "NotALine"])


def test_specutils_input_and_nm_units_give_the_same_fit():
    from astropy.nddata import InverseVariance
    from specutils import Spectrum
    w, f, s, _ = synthetic(medium="vacuum", seed=8)
    a = fit_lines(spec_of(w, f, s, medium="vacuum"), 0.05)
    sp = Spectrum(flux=f * 1e17 * u.Unit("1e-17 erg s-1 cm-2 AA-1"), spectral_axis=w / 10 * u.nm,
                  uncertainty=InverseVariance(1 / (s * 1e17) ** 2 * u.Unit("1e-17 erg s-1 cm-2 AA-1") ** -2))
    b = fit_lines(load_spectrum(sp, medium="vacuum", lsf_fwhm_aa=18.0), 0.05)
    assert b["Halpha"].flux == pytest.approx(a["Halpha"].flux, rel=1e-6)


# ---------------------------------------------------------------------------- redshifts
def test_redshift_of_simulated_spectra(tmp_path):
    """Simulated EFOSC2 spectra (S/N 5-50): catastrophic failures, precision, error calibration."""
    from specred.simulate import simulate_spectra
    res = simulate_spectra(tmp_path, 120, seed=21, snr_range=(5.0, 50.0))
    lines = res.lines
    confident_bad, any_bad, n_true, pulls, prec = 0, 0, 0, [], []
    for r in res.truth:
        zr = find_redshift(load_spectrum(tmp_path / "spectra" / r["file"]))
        tz = float(r["z"])
        if not np.isfinite(tz):
            confident_bad += zr.quality in ("good", "single_line")
            continue
        n_true += 1
        ok = np.isfinite(zr.z) and abs(zr.z - tz) <= 0.01 * (1 + tz)
        any_bad += not ok
        confident_bad += (not ok) and zr.quality in ("good", "single_line")
        if r["kind"] in ("SF", "WR", "Sy2", "S0") and ok:
            pulls.append((zr.z - tz) / zr.z_err)
            sub = lines[(lines["id"] == r["id"]) & ~lines["broad"]]
            strong = sum(1 for x in sub if x["flux"] / r["noise_at_ref"] / 20.0 > 10.0)
            if strong >= 2:
                prec.append(abs(zr.z - tz))
    assert confident_bad <= 0.02 * len(res.truth)
    assert any_bad <= 0.05 * n_true
    assert np.max(prec) <= 0.001
    assert 0.7 < np.std(pulls) < 1.3


def test_qso_and_absorption_templates_are_found():
    from specred.simulate.sources import build_source
    from specred.simulate.spectra1d import _Sampler
    smp = _Sampler("EFOSC2")
    rng = np.random.default_rng(3)
    for kind, z in (("QSO", 2.2), ("QSO", 0.9), ("E", 0.12)):
        src = build_source("x", kind, z, rng, f6100=1e-16)
        model = smp.observe(src)
        sig = np.full(model.size, np.median(model) / 30.0)
        sp = make_spectrum(smp.wave, model + rng.standard_normal(model.size) * sig, sig, medium="air",
                           lsf_fwhm_aa=3.2 * smp.dlam)
        zr = find_redshift(sp)
        assert abs(zr.z - z) < 0.01 * (1 + z), (kind, z, zr)
        assert zr.template == {"QSO": "qso", "E": "absorption"}[kind]


def test_candidate_pruning_changes_neither_winner_nor_margin(tmp_path):
    """Candidates left out by their upper bound could not have changed the best Δχ², the
    best at a distinct redshift or the absorption score the classifier reads: compared with
    solving every candidate, on simulated spectra of every class."""
    from specred.analysis import redshift as R
    from specred.simulate import simulate_spectra
    res = simulate_spectra(tmp_path, 40, seed=4, snr_range=(5.0, 50.0))
    n_left_out = 0
    for r in res.truth:
        ls = R._resample_log(load_spectrum(tmp_path / "spectra" / r["file"]))
        u = np.arange(0.0, np.log1p(4.0) + ls.dx, ls.dx)
        cands = []
        for t, comps, resid in (("emission", R.EMISSION_COMPONENTS, ls.r_narrow),
                                ("qso", R.QSO_COMPONENTS, ls.r_broad),
                                ("absorption", R.ABSORPTION_COMPONENTS, ls.r_narrow)):
            sc = R._template_score(ls, comps, R.FILTER_SIGMA[t], resid, u)
            cands += [(t, float(np.expm1(u[i])), 0.0) for i in R._peaks(sc, u, 4, 0.01)]
        full = sorted(((g, t, zg) for t, zc, _ in cands for g, zg in [R._global_score(ls, t, zc)]
                       if np.isfinite(g)), reverse=True)
        pruned = R._refine(ls, cands)
        n_left_out += len(full) - len(pruned)
        assert pruned[0] == pytest.approx(full[0])
        best_other = [x for x in full if R._distinct(x[2], full[0][2])][:1]
        assert [x for x in pruned if R._distinct(x[2], pruned[0][2])][:1] == pytest.approx(best_other)
        near_abs = [x for x in full if x[1] == "absorption" and abs(x[2] - full[0][2]) < 0.003 * (1 + full[0][2])]
        assert all(x in pruned for x in near_abs)
    assert n_left_out > 40          # and it does leave candidates out


def test_near_tie_is_re_solved_over_a_wider_shift_range(monkeypatch):
    """A QSO at z = 2.605 whose candidate sits ~2500 km/s off its lines (where the Lyα forest
    pushed the FFT peak) scores below its Mg II alias at z = 0.567 (Mg II 2800 = Lyα 1216 of
    z = 2.605) within ±4 steps; the near-tie re-solve over ±16 steps puts it back at the truth
    and it wins.  Far from a tie nothing is re-solved."""
    from specred.analysis import redshift as R
    from specred.simulate.sources import build_source
    from specred.simulate.spectra1d import _Sampler
    smp = _Sampler("EFOSC2")
    rng = np.random.default_rng(11)
    z = 2.605
    src = build_source("q", "QSO", z, rng, f6100=1e-16)
    model = smp.observe(src)
    sig = np.full(model.size, np.median(model) / 15.0)
    sp = make_spectrum(smp.wave, model + rng.standard_normal(model.size) * sig, sig, medium="air",
                       lsf_fwhm_aa=3.2 * smp.dlam)
    ls = R._resample_log(sp)
    off = np.expm1(np.log1p(z) + 9 * ls.dx)              # 9 grid steps redward of the truth
    g_off, z_off = R._global_score(ls, "qso", off)
    g_alias, z_alias = R._global_score(ls, "qso", 0.567)
    g_true, _ = R._global_score(ls, "qso", z)
    assert g_off < g_true and abs(z_off - z) > 0.003 * (1 + z)     # ±4 steps do not reach back
    refined = sorted([(g_off, "qso", z_off), (g_alias, "qso", z_alias)], reverse=True)
    monkeypatch.setattr(R, "NEAR_TIE_FRACTION", 1.0)     # whatever the gap: treat as a near-tie
    settled = R._settle_near_tie(ls, refined)
    assert settled[0][1] == "qso" and abs(settled[0][2] - z) < 0.002 * (1 + z)
    assert settled[0][0] == pytest.approx(g_true, rel=1e-3)
    monkeypatch.setattr(R, "NEAR_TIE_FRACTION", 0.0)     # never a tie: returned as it was
    assert R._settle_near_tie(ls, refined) == refined


def test_normal_equation_triangles_match_qr():
    from specred.analysis.redshift import _triangles
    rng = np.random.default_rng(2)
    A = rng.standard_normal((5, 300, 6)) * np.array([1e17, 1e15, 1e17, 1e16, 1e17, 1e3])
    A[2, :, 4] = 0.0                      # a line outside the spectrum at one shift
    y = rng.standard_normal(300)
    R, qty, keep = _triangles(A, y)
    assert keep.sum() == A.shape[0] * A.shape[2] - 1 and not keep[2, 4]
    for k in range(A.shape[0]):
        a = A[k][:, keep[k]]
        q, _ = np.linalg.qr(a / np.linalg.norm(a, axis=0))
        proj = float(np.sum((q.T @ y) ** 2))             # ‖Qᵀy‖²: the explained part of y
        assert float(qty[k] @ qty[k]) == pytest.approx(proj, rel=1e-9)
        # the same quadratic form: ‖R b − Qᵀy‖² + ‖y‖² − ‖Qᵀy‖² = ‖A b − y‖² for any b
        b = rng.standard_normal(a.shape[1]) / np.abs(a).max(axis=0)
        lhs = np.sum((R[k][:, keep[k]] @ b - qty[k]) ** 2) + y @ y - qty[k] @ qty[k]
        assert lhs == pytest.approx(np.sum((a @ b - y) ** 2), rel=1e-9)


def test_featureless_spectrum_gets_no_confident_redshift():
    rng = np.random.default_rng(0)
    w = np.arange(3700.0, 9300.0, 5.6)
    f = 1e-16 * (w / 6000) ** -1.5
    s = np.full_like(w, 1e-16 / 20)
    zr = find_redshift(make_spectrum(w, f + rng.standard_normal(w.size) * s, s, medium="air", lsf_fwhm_aa=18.0))
    assert zr.quality in ("none", "low")


# ---------------------------------------------------------------------------- real spectra
@pytest.fixture(scope="module")
def real():
    need_shared(REAL_SPECTRA)
    return Table.read(REAL_SPECTRA / "truth.ecsv")


def test_real_spectra_redshifts(real):
    for r in real:
        zr = find_redshift(load_spectrum(REAL_SPECTRA / r["file"]))
        tol = 0.005 * (1 + r["z_truth"]) if r["sdss_class"] == "QSO" else 0.001
        assert abs(zr.z - r["z_truth"]) <= tol, (r["file"], zr.z, r["z_truth"])
        assert zr.quality == "good"
        if r["sdss_class"] == "QSO":
            assert zr.template == "qso"


def test_real_spectra_line_fluxes_against_sdss(real):
    """Fluxes against SDSS SPZLINE, for lines the catalogue measures at S/N > 10.

    SDSS measures its lines above a stellar-population model; so does specred here
    (E-MILES templates, ``stellar_continuum='auto'``).  Two cases are left out of the 10 %
    check, with reasons in the issue note: NGC 3073, which the SDSS pipeline fitted with
    an A0 *star* template (its CLASS is STAR), and Hα of NGC 4636, whose emission EW
    (~2 Å) equals the stellar Hα absorption under it, so the flux is as uncertain as the
    template difference (we measure +32 %)."""
    keys = {"hb": "Hbeta", "oiii5007": "OIII_5007", "ha": "Halpha", "nii6584": "NII_6584",
            "sii6717": "SII_6717", "sii6731": "SII_6731"}
    checked = 0
    for r in real:
        if r["sdss_class"] != "GALAXY":
            continue
        sp = load_spectrum(REAL_SPECTRA / r["file"])
        res = fit_lines(sp, float(r["z_truth"]), list(keys.values()) + ["OIII_4959", "NII_6548"],
                        balmer_absorption=True, stellar_continuum="auto")
        assert res.stellar is not None and res.stellar.significant, r["file"]
        for k, n in keys.items():
            t, e = r[f"f_{k}"] * 1e-17, r[f"e_{k}"] * 1e-17
            if not t / e > 10 or (r["file"].startswith("NGC4636") and n == "Halpha"):
                continue
            assert res[n].flux == pytest.approx(t, rel=0.10), (r["file"], n, res[n].flux, t)
            checked += 1
    assert checked == 9


# ---------------------------------------------------------------------------- command line
def test_cli_fit_batch_writes_a_table_and_reports_bad_input(tmp_path, capsys):
    from specred.cli import main
    from specred.spectrum_io import write_spectrum
    w, f, s, truth = synthetic(z=0.08, snr=30, seed=9)
    p = write_spectrum(tmp_path / "s.fits", w, f, s, medium="air", header={"LSFFWHM": 18.0})
    out = tmp_path / "lines.ecsv"
    assert main(["fit", str(p), "--batch", "--out", str(out)]) == 0
    t = Table.read(out)
    assert abs(t.meta["z"] - 0.08) < 0.001
    row = t[t["name"] == "Halpha"][0]
    assert row["flux"] == pytest.approx(truth["Halpha"], rel=0.1)
    capsys.readouterr()
    assert main(["fit", str(p)]) == 2                         # interactive, but no window under Agg
    assert "cannot open a window" in capsys.readouterr().err
    bad = tmp_path / "bad.ecsv"
    Table({"wavelength": w, "flux": f}).write(bad)
    capsys.readouterr()
    assert main(["fit", str(bad), "--batch"]) == 2
    assert "medium not stated" in capsys.readouterr().err
    assert main(["fit", str(bad), "--batch", "--medium", "air"]) == 2
    assert "has no unit" in capsys.readouterr().err


def test_bounded_levenberg_marquardt_stays_within_bounds():
    from specred.analysis.fitting import _bounded_leastsq
    t = np.linspace(0, 1, 50)
    y = 2.0 * np.exp(-3.0 * t)

    def fun(x):
        return x[0] * np.exp(-x[1] * t) - y

    def jac(x):
        e = np.exp(-x[1] * t)
        return np.column_stack([e, -x[0] * t * e])

    lo, hi = np.array([0.0, 0.0]), np.array([10.0, 10.0])
    x = _bounded_leastsq(fun, jac, np.array([1.0, 1.0]), lo, hi, xtol=1e-10, ftol=1e-12, max_nfev=200)
    assert x == pytest.approx([2.0, 3.0], rel=1e-6)
    # the optimum outside the box: the answer is on the bound, not beyond it
    x = _bounded_leastsq(fun, jac, np.array([1.0, 1.0]), lo, np.array([10.0, 2.0]), xtol=1e-10, ftol=1e-12,
                         max_nfev=200)
    assert 0.0 <= x[1] <= 2.0 and x[1] == pytest.approx(2.0, abs=1e-3)
    # out of evaluations: the best point seen, still inside the bounds
    x = _bounded_leastsq(fun, jac, np.array([1.0, 1.0]), lo, hi, xtol=1e-10, ftol=1e-12, max_nfev=2)
    assert np.all((x >= lo) & (x <= hi))
    assert np.sum(fun(x) ** 2) <= np.sum(fun(np.array([1.0, 1.0])) ** 2) * (1 + 1e-12)


def test_sparse_gaussians_equal_the_dense_evaluation():
    """The line model evaluates each Gaussian only near its allowed centres: the columns and
    their derivatives equal the dense evaluation, and outside the bounds it falls back."""
    from specred.analysis.fitting import _Model, narrow_group
    spec = spec_of(*synthetic(z=0.05)[:3])
    groups = [replace(narrow_group(tuple(L.BPT_LINES) + ("Hgamma",)), absorption=("Hbeta", "Halpha", "Hgamma"))]
    m = _Model(spec, 0.05, groups, continuum_order=1, window_kms=3000.0, edge_kms=0.0, wide_balmer=True)
    assert m._support["lines"] is not None and m._support["lines"][0].size < 0.5 * m.wave.size * m.n_lines
    rng = np.random.default_rng(0)
    lo, hi = np.array(m.lo), np.array(m.hi)
    thetas = lo + rng.uniform(size=(6, lo.size)) * (hi - lo)
    for th in list(thetas) + [thetas]:                 # single points and a batch
        mu, s = m._centres(th)
        m._band_memo.clear()
        sparse = m._band(mu, s, derivs=True)
        sup, m._support["lines"] = m._support["lines"], None
        dense = m._band(mu, s, derivs=True)
        m._support["lines"] = sup
        for a, b in zip(sparse, dense):
            assert np.allclose(a, b, rtol=1e-12, atol=1e-15 * np.abs(b).max())
    # a centre beyond the bounds (not reachable by the fit) is evaluated densely
    th = thetas[0].copy()
    th[0] = hi[0] + 5000.0
    mu, s = m._centres(th)
    far = m._band(mu, s)
    assert np.allclose(far, np.exp(-0.5 * (m.wave[:, None] - mu) ** 2 / (s ** 2 + m.pix2_12[:, None]))
                       / np.sqrt(2 * np.pi * (s ** 2 + m.pix2_12[:, None])))
