"""Wolf-Rayet bump measurement (specred.analysis.wr) on simulated EFOSC2 spectra."""
from __future__ import annotations

import numpy as np
import pytest

from specred import calib
from specred.analysis import fit_lines, make_spectrum, narrow_group
from specred.analysis import wr as W
from specred.analysis.wr import WRResult, measure_wr_bump, plot_wr
from specred.errors import SpectrumError
from specred.simulate.sources import REST_VAC, Line, build_source
from specred.simulate.spectra1d import _Sampler

BUMP_LINES = ("HeII_4686", "NIII_4640")


@pytest.fixture(scope="module")
def sampler():
    return _Sampler("EFOSC2")


def observe(smp, src, snr, rng, name="sim"):
    """A noisy EFOSC2-like spectrum of ``src`` as ``simulate_spectra`` makes it: LSF-convolved
    model, sky-limited noise normalised to median continuum S/N ``snr`` per pixel at
    6000–6200 Å (observed)."""
    flux, sigma, _ = smp.noisy(src, snr, rng)
    return make_spectrum(smp.wave, flux, sigma, medium=smp.inst.medium,
                         lsf_fwhm_aa=smp.inst.lsf_fwhm_px * np.abs(np.gradient(smp.wave)), name=name)


def true_bump(src):
    # src.truth['wr_bump_flux'] is computed before build_source rescales the lines to f6100,
    # so the truth is summed from the (rescaled) injected broad lines instead
    return sum(ln.flux for ln in src.lines if ln.broad and ln.name in BUMP_LINES)


def wr_sample(smp, n=20, seed=2020):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        z, snr = rng.uniform(0.02, 0.15), rng.uniform(10.0, 40.0)
        src = build_source(f"wr{i}", "WR", z, rng, f6100=1e-16)
        out.append((z, snr, src, observe(smp, src, snr, rng, f"wr{i}")))
    return out


# ---------------------------------------------------------------------------- detection
def test_wr_galaxies_are_flagged_with_accurate_bump_flux(sampler):
    sample = wr_sample(sampler)
    res = [measure_wr_bump(sp, z) for z, snr, src, sp in sample]
    flagged = np.array([r.wr for r in res])
    snr = np.array([s[1] for s in sample])
    truth = np.array([true_bump(s[2]) for s in sample])
    flux = np.array([r.flux for r in res])
    err = np.array([r.flux_err for r in res])
    ratio = flux[flagged] / truth[flagged]
    fw_ratio = np.array([r.fwhm_kms / s[2].truth["wr_fwhm_kms"] for r, s in zip(res, sample) if r.wr])
    pull = (flux - truth) / err
    print(f"\nWR recovery {flagged.sum()}/{flagged.size} (S/N >= 25: {flagged[snr >= 25].sum()}/{(snr >= 25).sum()}); "
          f"bump flux / truth median {np.median(ratio):.3f}, 16-84% {np.percentile(ratio, 16):.2f}-"
          f"{np.percentile(ratio, 84):.2f}; pull mean {pull.mean():.2f} std {pull.std():.2f}; "
          f"FWHM ratio median {np.median(fw_ratio):.2f}")
    assert flagged.sum() >= 12                           # 15/20 measured (weak bumps at S/N ~ 10 are lost)
    assert flagged[snr >= 25].mean() >= 0.8              # bright ones are found
    assert 0.85 < np.median(ratio) < 1.25              # flagged ones: slightly biased up by selection
    assert np.all((ratio > 0.5) & (ratio < 2.0))
    assert abs(np.mean(pull)) < 0.8 and 0.5 < np.std(pull) < 1.6
    assert 0.7 < np.median(fw_ratio) < 1.4
    for r in res:
        assert r.covered and np.isfinite(r.flux_err) and r.flux_err > 0
        if r.wr:
            assert r.significance >= 4.0 and r.snr >= 3.0 and r.ew_rest > 0
            assert W.FWHM_MIN_KMS <= r.fwhm_kms <= W.FWHM_MAX_KMS
            assert "WR blue bump" in r.reason


def test_star_forming_limits_on_nebular_lines_find_weak_bumps_without_false_ones(sampler):
    """With the host known to be star-forming, narrow He II / [Fe III] held below
    NEBULAR_MAX_HBETA × Hβ can no longer absorb the bump: more weak bumps are found
    (measured 38/40 against 31/40, 11/13 against 5/13 at S/N < 20), still none in plain
    SF galaxies (0/60; largest no-bump Δχ² 12)."""
    sample = wr_sample(sampler, n=40, seed=11)
    plain = np.array([measure_wr_bump(sp, z).wr for z, snr, src, sp in sample])
    res = [measure_wr_bump(sp, z, star_forming=True) for z, snr, src, sp in sample]
    sf = np.array([r.wr for r in res])
    snr = np.array([s[1] for s in sample])
    print(f"\nWR found {sf.sum()}/{sf.size} with the limits, {plain.sum()} without; "
          f"S/N < 20: {sf[snr < 20].sum()} vs {plain[snr < 20].sum()} of {(snr < 20).sum()}")
    assert sf.sum() >= plain.sum() + 4
    assert sf.sum() >= 0.85 * sf.size
    ratio = np.array([r.flux / true_bump(s[2]) for r, s in zip(res, sample) if r.wr])
    assert 0.85 < np.median(ratio) < 1.2 and np.all((ratio > 0.5) & (ratio < 2.0))
    for r in res:                                   # the narrow He II respects its limit
        assert -1e-30 <= r.heii_narrow_flux <= W.NEBULAR_MAX_HBETA["HeII_4686n"] * r.hbeta_flux * (1 + 1e-9)
    rng = np.random.default_rng(5)
    n_false = 0
    for i in range(40):
        z, snr = rng.uniform(0.01, 0.3), float(np.exp(rng.uniform(np.log(5.0), np.log(50.0))))
        src = build_source(f"sf{i}", "SF", z, rng, f6100=1e-16)
        n_false += measure_wr_bump(observe(sampler, src, snr, rng), z, star_forming=True).wr
    assert n_false <= 1


def test_non_wr_galaxies_rarely_give_a_false_wr(sampler):
    rng = np.random.default_rng(77)
    n_false, n, dchi2 = 0, 0, []
    for kind in ("SF", "Sy2", "S0", "E"):
        for i in range(12):
            z, snr = rng.uniform(0.01, 0.3), float(np.exp(rng.uniform(np.log(5.0), np.log(50.0))))
            src = build_source(f"{kind}{i}", kind, z, rng, f6100=1e-16)
            assert not src.truth["wr"]
            r = measure_wr_bump(observe(sampler, src, snr, rng), z)
            n += 1
            n_false += r.wr
            dchi2.append(r.delta_chi2)
    print(f"\nfalse WR {n_false}/{n} = {n_false / n:.1%}; no-bump delta chi2 median {np.median(dchi2):.1f}, "
          f"max {np.max(dchi2):.1f}")
    assert n >= 40
    assert n_false / n <= 0.05
    assert np.median(dchi2) < 6.0                     # the null distribution sits well below the cut


def _sy2_with_nebular_heii(seed, z, broad_bump=False):
    """A Seyfert 2 with strong *narrow* He II 4686 (0.5 Hβ) and [Ar IV] / [Fe III]."""
    rng = np.random.default_rng(seed)
    src = build_source(f"sy2_{seed}", "Sy2", z, rng, f6100=1e-16)
    hb = next(ln for ln in src.lines if ln.name == "Hbeta")
    fw = hb.fwhm_kms
    src.lines += [Line("HeII_4686", REST_VAC["HeII_4686"], 0.5 * hb.flux, fw),
                  Line("ArIV_4711", W.ARIV_4711, 0.05 * hb.flux, fw),
                  Line("ArIV_4740", W.ARIV_4740, 0.04 * hb.flux, fw),
                  Line("FeIII_4658", W.FEIII_4658, 0.03 * hb.flux, fw)]
    if broad_bump:
        src.lines += [Line("HeII_4686", REST_VAC["HeII_4686"], 1.0 * hb.flux, 2000.0, True),
                      Line("NIII_4640", REST_VAC["NIII_4640"], 0.5 * hb.flux, 2000.0, True)]
    return src, rng, 0.5 * hb.flux


def test_narrow_heii_alone_is_not_a_wr_bump(sampler):
    with_bump = []
    for seed in range(6):
        z = 0.03 + 0.02 * seed
        src, rng, heii = _sy2_with_nebular_heii(seed, z)
        r = measure_wr_bump(observe(sampler, src, 50.0, rng), z)
        assert not r.wr, r.reason
        assert r.significance < 4.0 and abs(r.flux) < 3 * r.flux_err
        # the nebular line is measured separately, not lost
        assert abs(r.heii_narrow_flux - heii) < 3 * r.heii_narrow_flux_err
        assert r.heii_narrow_flux / r.heii_narrow_flux_err > 3
        # the same nucleus with a broad bump (3x the narrow line) under it is flagged
        src_b, rng_b, _ = _sy2_with_nebular_heii(seed, z, broad_bump=True)
        rb = measure_wr_bump(observe(sampler, src_b, 50.0, rng_b), z)
        assert rb.wr, rb.reason
        with_bump.append((rb.flux / true_bump(src_b), rb.heii_narrow_flux / heii))
    bump_ratio, narrow_ratio = np.array(with_bump).T
    assert np.all(np.abs(bump_ratio - 1) < 0.25)
    # at R ~ 350 narrow and broad He II trade flux (errors ~ 30 %), but not on average
    assert 0.5 < np.median(narrow_ratio) < 1.3


def test_broad_hbeta_of_an_agn_vetoes_the_bump(sampler):
    rng = np.random.default_rng(5)
    src = build_source("wr_agn", "WR", 0.06, rng, f6100=1e-16)
    state = rng.bit_generator.state
    sp = observe(sampler, src, 40.0, rng)
    r = measure_wr_bump(sp, 0.06)
    assert r.wr and "BROAD_HBETA" not in r.flags
    # add an AGN broad Hβ (FWHM 4000 km/s, 3x the bump) with the same noise realisation
    src.lines.append(Line("Hbeta", REST_VAC["Hbeta"], 3.0 * true_bump(src), 4000.0, True))
    rng.bit_generator.state = state
    ra = measure_wr_bump(observe(sampler, src, 40.0, rng), 0.06)
    assert "BROAD_HBETA" in ra.flags and not ra.wr
    assert "AGN" in ra.reason
    assert ra.broad_hbeta_flux == pytest.approx(3.0 * true_bump(src), rel=0.3)


# ---------------------------------------------------------------------------- edges
def test_bump_outside_coverage_or_masked_is_not_covered(sampler):
    rng = np.random.default_rng(3)
    src = build_source("far", "WR", 1.05, rng, f6100=1e-16)        # bump at ~9600 Å: beyond Gr#13
    r = measure_wr_bump(observe(sampler, src, 30.0, rng), 1.05)
    assert not r.wr and not r.covered and "NOT_COVERED" in r.flags and "RED_NOT_COVERED" in r.flags
    assert np.isnan(r.flux) and np.isnan(r.significance)
    assert "not covered" in r.reason
    # a bump that is there but sits in masked pixels
    src = build_source("masked", "WR", 0.05, rng, f6100=1e-16)
    sp = observe(sampler, src, 30.0, rng)
    assert measure_wr_bump(sp, 0.05).covered
    rest = sampler.wave / 1.05
    mask = (rest > 4630) & (rest < 4700)
    sp_m = make_spectrum(sampler.wave, sp.flux, sp.sigma, medium="air", mask=mask,
                         lsf_fwhm_aa=sampler.inst.lsf_fwhm_px * 5.65)
    rm = measure_wr_bump(sp_m, 0.05)
    assert not rm.wr and "NOT_COVERED" in rm.flags


@pytest.mark.parametrize("z", [float("nan"), -0.05, float("inf"), None, "abc"])
def test_bad_redshift_raises(sampler, z):
    rng = np.random.default_rng(0)
    sp = observe(sampler, build_source("x", "SF", 0.05, rng, f6100=1e-16), 20.0, rng)
    with pytest.raises(SpectrumError):
        measure_wr_bump(sp, z)


def test_not_a_spectrum_raises():
    with pytest.raises(SpectrumError):
        measure_wr_bump(np.arange(10.0), 0.05)


# ---------------------------------------------------------------------------- API
def test_result_row_mc_errors_and_lines_argument(sampler):
    rng = np.random.default_rng(11)
    src = build_source("wr_api", "WR", 0.08, rng, f6100=1e-16)
    sp = observe(sampler, src, 35.0, rng)
    r = measure_wr_bump(sp, 0.08)
    assert isinstance(r, WRResult) and r.method == "covariance"
    with pytest.raises(Exception):
        r.wr = False                                            # frozen
    row = r.to_row()
    for key in ("wr_bump", "wr_significance", "wr_flux", "wr_flux_err", "wr_ew", "wr_fwhm_kms",
                "heii_narrow_flux", "wr_red_flux", "wr_red_significance", "wr_flags", "wr_reason"):
        assert key in row
    assert row["wr_bump"] is r.wr and row["wr_flux"] == r.flux
    assert r.flux == pytest.approx(r.flux_niii + r.flux_heii_broad)
    assert r.bump_to_hbeta == pytest.approx(r.flux / r.hbeta_flux)
    hb_true = next(ln.flux for ln in src.lines if ln.name == "Hbeta")
    assert r.hbeta_flux == pytest.approx(hb_true, rel=0.1)
    assert r.red_covered and np.isfinite(r.red_flux) and np.isfinite(r.red_significance)
    # Monte-Carlo errors agree with the covariance ones within a factor 2
    rm = measure_wr_bump(sp, 0.08, n_mc=60, seed=1)
    assert rm.method == "mc60" and rm.flux == r.flux
    assert 0.5 < rm.flux_err / r.flux_err < 2.0
    assert 0.5 < rm.ew_rest_err / r.ew_rest_err < 2.0
    # the project's fitter can supply the narrow redshift and Hβ
    lines = fit_lines(sp, 0.08, groups=[narrow_group(("Hbeta", "OIII_4959", "OIII_5007"))])
    rl = measure_wr_bump(sp, 0.08, lines=lines)
    assert rl.narrow_z == pytest.approx(lines.group_z["narrow"])
    assert rl.hbeta_flux == lines["Hbeta"].flux
    assert rl.wr == r.wr and rl.flux == pytest.approx(r.flux, rel=0.1)
    with pytest.raises(SpectrumError):
        measure_wr_bump(sp, 0.08, lines={"Hbeta": 1.0})
    # without the red bump
    rn = measure_wr_bump(sp, 0.08, red_bump=False)
    assert np.isnan(rn.red_flux) and "red" not in rn.model and rn.flux == r.flux


def test_nebular_wavelengths_are_nist_air_converted_to_vacuum():
    air = np.array([4658.05, 4711.37, 4713.14, 4740.16])
    vac = calib.air_to_vacuum(air)
    assert np.allclose(vac, [W.FEIII_4658, W.ARIV_4711, W.HEI_4713, W.ARIV_4740], atol=0.02)


def test_plot_writes_png(sampler, tmp_path):
    rng = np.random.default_rng(21)
    src = build_source("wr_plot", "WR", 0.05, rng, f6100=1e-16)
    sp = observe(sampler, src, 30.0, rng, "wr_plot")
    r = measure_wr_bump(sp, 0.05)
    path = tmp_path / "wr.png"
    fig = plot_wr(sp, 0.05, r, path=path)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10000
    assert len(fig.axes) == 2
    xl = fig.axes[0].get_xlim()
    assert xl == pytest.approx((4550.0, 4800.0))
    assert len(fig.axes[0].lines) >= 3                            # data, continuum, model curves
    fig1 = plot_wr(sp, 0.05, measure_wr_bump(sp, 0.05, red_bump=False))
    assert len(fig1.axes) == 1
    # a spectrum without coverage still plots (data only)
    far = build_source("far", "WR", 1.05, rng, f6100=1e-16)
    spf = observe(sampler, far, 30.0, rng)
    plot_wr(spf, 1.05, measure_wr_bump(spf, 1.05), path=tmp_path / "far.png")
    assert (tmp_path / "far.png").exists()


# ---------------------------------------------------------------------------- real spectra
def test_real_sdss_spectra_are_not_wr():
    """Six public SDSS spectra (early types with the Fe 4668 absorption band, a type-1 AGN, a
    Seyfert 2 with nebular He II, a z = 1.9 quasar): none is a WR galaxy."""
    from astropy.table import Table
    from conftest import REAL_SPECTRA, need_shared
    from specred.analysis import load_spectrum

    need_shared(REAL_SPECTRA)
    truth = Table.read(REAL_SPECTRA / "truth.ecsv")
    for row in truth:
        z = float(row["z_truth"])
        r = measure_wr_bump(load_spectrum(REAL_SPECTRA / row["file"]), z)
        assert not r.wr, (row["object"], r.reason)
        kind = str(row["curator_kind"])
        if kind == "hibal_qso":
            assert "NOT_COVERED" in r.flags
        if kind == "broadline_agn_lowz":
            assert "BROAD_HBETA" in r.flags
        if kind in ("elliptical_liner_like", "early_type_weak_agn"):
            assert "ABSORPTION_TROUGH" in r.flags
        if kind == "seyfert2":
            # nebular He II 4686 measured as narrow, consistent with the SDSS pipeline
            f_sdss, e_sdss = 1e-17 * row["f_heii4686"], 1e-17 * row["e_heii4686"]
            assert r.heii_narrow_flux / r.heii_narrow_flux_err > 3
            assert abs(r.heii_narrow_flux - f_sdss) < 3 * np.hypot(r.heii_narrow_flux_err, e_sdss)
