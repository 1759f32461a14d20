"""BPT classification (specred.analysis.bpt): demarcations, regions, limits, MC, plot."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.special import erf

from specred.analysis import fit_lines, make_spectrum, rest_wavelength
from specred.analysis.bpt import (BPTResult, LineFlux, classify_bpt, classify_nii, classify_oi, classify_sii,
                                  combine_classes, kauffmann03_nii, kewley01_nii, kewley01_oi, kewley01_sii,
                                  kewley06_oi, kewley06_sii, line_fluxes_from_fit, plot_bpt)
from specred.errors import SpectrumError

C = 299792.458


def fluxes_at(x_nii=None, y=0.0, x_sii=None, x_oi=None, snr=50.0, ha=3e-15, hb=1e-15):
    """A flux dictionary whose log ratios are the given x (per diagram) and y, all S/N = snr."""
    def lf(f):
        return LineFlux(f, f / snr)
    out = {"Halpha": lf(ha), "Hbeta": lf(hb), "OIII_5007": lf(hb * 10 ** y)}
    if x_nii is not None:
        out["NII_6584"] = lf(ha * 10 ** x_nii)
    if x_sii is not None:
        out["SII"] = lf(ha * 10 ** x_sii)
    if x_oi is not None:
        out["OI_6300"] = lf(ha * 10 ** x_oi)
    return out


# ---------------------------------------------------------------------------- demarcations
def test_demarcation_values_by_hand_and_asymptotes():
    # Ka03: 0.61/(x - 0.05) + 1.30 ; Ke01 [N II]: 0.61/(x - 0.47) + 1.19
    assert kauffmann03_nii(-0.5) == pytest.approx(0.61 / -0.55 + 1.30)
    assert kauffmann03_nii(-1.0) == pytest.approx(0.71905, abs=1e-4)
    assert kewley01_nii(0.0) == pytest.approx(-0.10787, abs=1e-4)
    assert kewley01_sii(-0.5) == pytest.approx(0.72 / -0.82 + 1.30)
    assert kewley01_oi(-1.0) == pytest.approx(0.73 / -0.41 + 1.33)
    assert kewley06_sii(0.0) == pytest.approx(0.76) and kewley06_sii(1.0) == pytest.approx(2.65)
    assert kewley06_oi(-1.0) == pytest.approx(0.12)
    # vectorised; NaN on and right of the vertical asymptote
    v = kauffmann03_nii(np.array([-1.0, 0.05, 0.3]))
    assert v.shape == (3,) and np.isfinite(v[0]) and np.isnan(v[1:]).all()
    assert np.isnan(kewley01_sii(0.5)) and np.isnan(kewley01_oi(-0.5))
    # Ka03 lies below Ke01 where composites exist
    x = np.linspace(-1.2, 0.0, 13)
    assert np.all(kauffmann03_nii(x) < kewley01_nii(x))


def test_points_inside_each_region_per_diagram():
    assert classify_nii(-1.0, -0.5) == "SF"
    assert classify_nii(-0.2, 0.0) == "composite"      # Ka03 -1.14 < 0 < Ke01 0.28
    assert classify_nii(0.2, 0.8) == "AGN"
    # right of the asymptotes the hyperbola's other branch must not count: above the curve
    assert classify_nii(0.6, -1.0) == "AGN"
    assert classify_nii(0.1, -1.0) == "composite"      # right of Ka03's asymptote, left of Ke01's
    assert classify_sii(-0.6, -0.3) == "SF"
    assert classify_sii(-0.2, 1.0) == "Seyfert"
    assert classify_sii(0.1, 0.2) == "LINER"
    assert classify_sii(0.5, -1.0) == "LINER"          # right of the Ke01 [S II] asymptote
    assert classify_oi(-1.6, -0.2) == "SF"
    assert classify_oi(-0.8, 1.0) == "Seyfert"
    assert classify_oi(-0.5, 0.3) == "LINER"           # right of x = -0.59
    out = classify_nii(np.array([-1.0, -0.2, 0.2]), np.array([-0.5, 0.0, 0.8]))
    assert list(out) == ["SF", "composite", "AGN"]
    assert classify_nii(np.nan, 0.0) == "unavailable"


def test_combined_classes_follow_kewley06_scheme():
    res = classify_bpt(fluxes_at(x_nii=-1.0, x_sii=-0.6, x_oi=-1.6, y=-0.3), n_mc=50)
    assert (res.bpt_nii, res.bpt_sii, res.bpt_oi, res.bpt_class) == ("SF", "SF", "SF", "SF")
    res = classify_bpt(fluxes_at(x_nii=-0.2, x_sii=-0.6, x_oi=-1.6, y=0.0), n_mc=50)
    assert res.bpt_nii == "composite" and res.bpt_class == "composite"
    res = classify_bpt(fluxes_at(x_nii=0.1, x_sii=-0.1, x_oi=-0.8, y=1.0), n_mc=50)
    assert (res.bpt_nii, res.bpt_sii, res.bpt_oi, res.bpt_class) == ("AGN", "Seyfert", "Seyfert", "Seyfert")
    res = classify_bpt(fluxes_at(x_nii=0.2, x_sii=0.1, x_oi=-0.4, y=0.2), n_mc=50)
    assert (res.bpt_nii, res.bpt_sii, res.bpt_oi, res.bpt_class) == ("AGN", "LINER", "LINER", "LINER")
    # SF in [N II] but LINER in [S II]: ambiguous
    res = classify_bpt(fluxes_at(x_nii=-1.0, x_sii=0.0, y=0.5), n_mc=50)
    assert (res.bpt_nii, res.bpt_sii, res.bpt_oi) == ("SF", "LINER", "unavailable")
    assert res.bpt_class == "ambiguous"
    assert "OI_6300 missing" in res.reason
    # Seyfert in [S II] but LINER in [O I]: ambiguous
    res = classify_bpt(fluxes_at(x_nii=0.1, x_sii=-0.2, x_oi=-0.3, y=0.9), n_mc=50)
    assert (res.bpt_sii, res.bpt_oi, res.bpt_class) == ("Seyfert", "LINER", "ambiguous")
    # AGN in [N II] only: cannot split Seyfert/LINER
    assert classify_bpt(fluxes_at(x_nii=0.2, y=0.8), n_mc=0).bpt_class == "AGN"
    # no [N II]: SF in [S II] cannot separate SF from composite
    res = classify_bpt(fluxes_at(x_sii=-0.6, y=-0.3), n_mc=0)
    assert res.bpt_nii == "unavailable" and res.bpt_class == "undetermined"
    # no Hβ at all: nothing available
    fl = fluxes_at(x_nii=-1.0, y=0.0)
    del fl["Hbeta"]
    res = classify_bpt(fl, n_mc=20)
    assert res.bpt_class == "unavailable" and np.isnan(res.log_oiii_hb) and np.isnan(res.bpt_prob)
    assert combine_classes("composite", "Seyfert", "LINER") == "composite"
    assert combine_classes(None, "LINER", "LINER") == "LINER"
    with pytest.raises(SpectrumError):
        combine_classes("undetermined")


# ---------------------------------------------------------------------------- upper limits
def _ul(fl, key, snr=50.0):
    """Turn a detection into a 3σ upper limit at its current flux."""
    f = fl[key].flux
    fl[key] = LineFlux(f, f / 3.0, True)
    return fl


def test_nii_upper_limit_decides_only_on_the_sf_side():
    fl = _ul(fluxes_at(x_nii=-0.8, y=-0.3), "NII_6584")
    res = classify_bpt(fl, n_mc=100)
    assert res.log_nii_ha_limit == "upper" and res.log_nii_ha == pytest.approx(-0.8)
    assert res.bpt_nii == "SF" and res.bpt_class == "SF"
    assert res.prob_nii["SF"] > 0.9
    # limit in the composite region: moving left could reach SF -> undetermined
    fl = _ul(fluxes_at(x_nii=-0.2, y=0.0), "NII_6584")
    res = classify_bpt(fl, n_mc=100)
    assert res.bpt_nii == "undetermined" and res.bpt_class == "undetermined"
    assert "SF or composite" in res.reason
    assert res.prob_nii["undetermined"] > 0.9
    # a detection at the same place is decided
    assert classify_bpt(fluxes_at(x_nii=-0.2, y=0.0), n_mc=0).bpt_nii == "composite"


def test_hbeta_undetected_gives_a_lower_limit_on_oiii_hb():
    fl = _ul(fluxes_at(x_nii=0.2, y=0.5), "Hbeta")
    res = classify_bpt(fl, n_mc=100)
    assert res.log_oiii_hb_limit == "lower" and np.isnan(res.log_oiii_hb_err)
    assert res.bpt_nii == "AGN"                     # going up from an AGN point stays AGN
    assert "lower limit" in res.reason
    fl = _ul(fluxes_at(x_nii=-1.0, y=0.0), "Hbeta")
    assert classify_bpt(fl, n_mc=0).bpt_nii == "undetermined"   # SF at the limit, could be higher
    # Seyfert region at the limit stays Seyfert going up; LINER could become Seyfert
    assert classify_bpt(_ul(fluxes_at(x_sii=-0.2, y=1.0), "Hbeta"), n_mc=0).bpt_sii == "Seyfert"
    assert classify_bpt(_ul(fluxes_at(x_sii=0.1, y=0.2), "Hbeta"), n_mc=0).bpt_sii == "undetermined"
    # [O III] undetected: an upper limit; SF at the limit stays SF
    res = classify_bpt(_ul(fluxes_at(x_nii=-1.0, x_oi=-1.6, y=-0.3), "OIII_5007"), n_mc=0)
    assert res.log_oiii_hb_limit == "upper" and res.bpt_nii == "SF" and res.bpt_oi == "SF"


def test_ratio_limits_and_unconstrained_points():
    # Hα undetected: every x is a lower limit; far right of the Ke01 asymptote it is still AGN
    fl = _ul(fluxes_at(x_nii=0.6, y=0.0), "Halpha")
    res = classify_bpt(fl, n_mc=0)
    assert res.log_nii_ha_limit == "lower" and res.bpt_nii == "AGN"
    # both [N II] and Hα undetected: x unconstrained, nothing decided (y in the middle)
    fl = _ul(_ul(fluxes_at(x_nii=-0.5, y=0.0), "Halpha"), "NII_6584")
    res = classify_bpt(fl, n_mc=0)
    assert res.log_nii_ha_limit == "unconstrained" and np.isnan(res.log_nii_ha)
    assert res.bpt_nii == "undetermined"
    # explicit limit arguments of the per-diagram functions
    assert classify_oi(-1.6, -0.2, x_limit="upper") == "SF"
    assert classify_oi(-1.6, -0.2, x_limit="lower") == "undetermined"
    assert classify_oi(-0.5, 0.3, x_limit="lower", y_limit="upper") == "LINER"


# ---------------------------------------------------------------------------- Monte Carlo
def test_mc_probabilities_on_and_far_from_a_line():
    x = -0.5
    y = float(kauffmann03_nii(x))                   # exactly on Ka03, far below Ke01
    fl = fluxes_at(x_nii=x, y=y, snr=6.0)          # ~0.1 dex errors on both ratios
    res = classify_bpt(fl, n_mc=2000, seed=1)
    p_sf = res.prob_nii["SF"]
    assert 0.38 < p_sf < 0.62
    assert p_sf + res.prob_nii["composite"] > 0.97    # Ke01 is ~0.35 dex away
    assert sum(res.prob_nii.values()) == pytest.approx(1.0)
    assert sum(res.class_probs.values()) == pytest.approx(1.0)
    far = classify_bpt(fluxes_at(x_nii=-1.2, x_sii=-0.8, x_oi=-1.8, y=-0.6, snr=20.0), n_mc=1000, seed=1)
    assert far.bpt_class == "SF" and far.bpt_prob > 0.99
    # the same seed reproduces, another seed differs a little but not much
    again = classify_bpt(fl, n_mc=2000, seed=1)
    assert again.prob_nii == res.prob_nii
    other = classify_bpt(fl, n_mc=2000, seed=2)
    assert abs(other.prob_nii["SF"] - p_sf) < 0.06
    # bpt_prob is the fraction of draws with the reported class
    assert res.bpt_prob == pytest.approx(res.class_probs[res.bpt_class])


def test_mc_non_positive_draws_become_limits():
    # [N II] barely detected (S/N 1.5 is allowed as a "detection" by the caller): many
    # draws are <= 0; they are treated as 3σ limits, not as log of a negative number
    fl = fluxes_at(x_nii=-1.3, y=-0.3)
    f = fl["NII_6584"].flux
    fl["NII_6584"] = LineFlux(f, f / 1.5)
    res = classify_bpt(fl, n_mc=1000, seed=0)
    assert np.isfinite(list(res.prob_nii.values())).all()
    assert sum(res.prob_nii.values()) == pytest.approx(1.0)
    assert res.prob_nii["SF"] > 0.8                  # a 3σ limit at -1.3+log(2) is still SF


# ---------------------------------------------------------------------------- rows, input, fits
def test_to_row_columns_and_bad_input():
    res = classify_bpt(fluxes_at(x_nii=-0.2, x_sii=-0.6, x_oi=-1.6, y=0.0), n_mc=100)
    row = res.to_row()
    for key in ("bpt_nii", "bpt_sii", "bpt_oi", "bpt_class", "bpt_prob", "log_nii_ha", "log_oiii_hb",
                "log_sii_ha", "log_oi_ha", "log_nii_ha_err", "log_oiii_hb_limit", "bpt_p_SF", "bpt_reason"):
        assert key in row
    assert row["bpt_class"] == res.bpt_class == "composite"
    assert row["log_nii_ha"] == pytest.approx(-0.2)
    # error of a log ratio: (1/ln10) sqrt(2) / snr
    assert row["log_nii_ha_err"] == pytest.approx(np.sqrt(2) / 50 / np.log(10), rel=1e-6)
    assert row["bpt_nii_prob"] == pytest.approx(res.prob_nii["composite"])
    with pytest.raises(SpectrumError, match="not positive"):
        classify_bpt({"Hbeta": LineFlux(-1e-16, 1e-17), "OIII_5007": LineFlux(1e-16, 1e-17)})
    with pytest.raises(SpectrumError, match="unknown line key"):
        classify_bpt({"Hb": LineFlux(1e-16, 1e-17)})
    with pytest.raises(SpectrumError):
        classify_bpt({"Hbeta": LineFlux(np.nan, 1e-17)})
    with pytest.raises(SpectrumError):
        classify_bpt(fluxes_at(x_nii=-1.0), n_mc=-1)
    # tuples are accepted
    res2 = classify_bpt({k: (v.flux, v.err) for k, v in fluxes_at(x_nii=-1.0, y=-0.5).items()}, n_mc=0)
    assert res2.bpt_nii == "SF"


def _synthetic(z=0.05, snr=30.0, seed=0, fluxes=None, wmin=3700.0):
    """Flat continuum with pixel-integrated Gaussian lines (vacuum wavelengths)."""
    rng = np.random.default_rng(seed)
    wave = np.arange(wmin, 9300.0, 5.6)
    f = 1e-16 * np.ones_like(wave)
    for n, fl in fluxes.items():
        mu = rest_wavelength(n) * (1 + z)
        s = mu / C * np.hypot(120.0, 18.0 / 2.3548 / mu * C)
        f += fl * 0.5 * (erf((wave + 2.8 - mu) / (np.sqrt(2) * s)) - erf((wave - 2.8 - mu) / (np.sqrt(2) * s))) / 5.6
    sig = np.full_like(wave, 1e-16 / snr)
    return make_spectrum(wave, f + rng.standard_normal(wave.size) * sig, sig, medium="vacuum",
                         lsf_fwhm_aa=18.0, name="synthetic")


def test_line_fluxes_from_a_real_fit():
    truth = {"OII_3726": 2.0e-15, "OII_3729": 2.6e-15, "Hbeta": 3e-15, "OIII_5007": 6e-15,
             "OIII_4959": 6e-15 / 2.98, "Halpha": 9e-15, "NII_6584": 2.4e-15, "NII_6548": 2.4e-15 / 3.05,
             "SII_6717": 1.2e-15, "SII_6731": 0.9e-15}      # no [O I]: undetected
    names = ["OII_3726", "OII_3729", "Hbeta", "OIII_4959", "OIII_5007", "OI_6300", "NII_6548", "Halpha",
             "NII_6584", "SII_6717", "SII_6731"]
    res = fit_lines(_synthetic(fluxes=truth), 0.05, lines=names)
    fl = line_fluxes_from_fit(res)
    assert set(fl) == {"Hbeta", "OIII_4959", "OIII_5007", "OI_6300", "Halpha", "NII_6584", "SII", "OII_3727"}
    s, e = res.sum_flux(("SII_6717", "SII_6731"))
    assert fl["SII"].flux == s and fl["SII"].err == e and not fl["SII"].upper_limit
    assert abs(fl["SII"].flux - 2.1e-15) < 4 * e
    o, oe = res.sum_flux(("OII_3726", "OII_3729"))
    assert fl["OII_3727"].flux == o and abs(o - 4.6e-15) < 4 * oe
    assert fl["OI_6300"].upper_limit == (not res["OI_6300"].detected)
    if fl["OI_6300"].upper_limit:
        assert fl["OI_6300"].flux == pytest.approx(res["OI_6300"].flux_upper_limit)
    assert fl["Halpha"].flux == res["Halpha"].flux and not fl["Halpha"].upper_limit
    bpt = classify_bpt(fl, n_mc=200)
    assert bpt.bpt_nii == "SF"                        # log NII/Ha = -0.57, log OIII/Hb = 0.30
    assert bpt.log_nii_ha == pytest.approx(np.log10(2.4 / 9), abs=0.05)
    # a spectrum starting redward of [O II]: the blend is absent, not NaN
    res2 = fit_lines(_synthetic(fluxes=truth, wmin=4200.0), 0.05, lines=names)
    assert not res2["OII_3726"].covered
    assert "OII_3727" not in line_fluxes_from_fit(res2)


def test_line_fluxes_limits_without_flux_upper_limit():
    def ln(name, flux, err, detected, ul=np.nan, covered=True):
        return SimpleNamespace(name=name, flux=flux, flux_err=err, detected=detected, flux_upper_limit=ul,
                               covered=covered)
    lines = {"Hbeta": ln("Hbeta", 1e-16, 1e-16, False),            # S/N 1, no stored limit -> 3 err
             "Halpha": ln("Halpha", 5e-15, 1e-16, True),
             "NII_6584": ln("NII_6584", 1e-17, 2e-17, False, ul=7e-17),
             "OI_6300": ln("OI_6300", np.nan, np.nan, False, covered=False)}

    class Fake:
        def __contains__(self, n):
            return n in lines

        def __getitem__(self, n):
            return lines[n]

        def sum_flux(self, names):
            return float("nan"), float("nan")
    fl = line_fluxes_from_fit(Fake())
    assert fl["Hbeta"] == LineFlux(3e-16, 1e-16, True)
    assert fl["NII_6584"] == LineFlux(7e-17, 2e-17, True)
    assert not fl["Halpha"].upper_limit
    assert "OI_6300" not in fl and "SII" not in fl and "OIII_5007" not in fl


# ---------------------------------------------------------------------------- plot
def test_plot_bpt_returns_a_figure_with_three_axes_and_writes_png(tmp_path):
    from matplotlib.figure import Figure
    results = [classify_bpt(fluxes_at(x_nii=-0.8, x_sii=-0.6, x_oi=-1.6, y=-0.2), n_mc=50),
               classify_bpt(_ul(fluxes_at(x_nii=-0.9, x_sii=-0.5, x_oi=-1.5, y=0.1), "NII_6584"), n_mc=50),
               classify_bpt(_ul(fluxes_at(x_nii=0.2, x_sii=0.0, x_oi=-0.6, y=0.6), "Hbeta"), n_mc=50)]
    out = tmp_path / "bpt.png"
    fig = plot_bpt(results, labels=["a", "b", "c"], path=out)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the limits are drawn as arrows (annotations) and every object is in the legend
    ax0 = fig.axes[0]
    assert sum(1 for t in ax0.texts if getattr(t, "arrow_patch", None) is not None) == 2
    labels = [t.get_text() for t in ax0.get_legend().get_texts()]
    assert any(lab.startswith("b (SF)") for lab in labels) and any(lab.startswith("c (AGN)") for lab in labels)
    # into existing axes, a single result
    fig2 = Figure()
    axes = fig2.subplots(1, 3)
    assert plot_bpt(results[0], ax=axes) is fig2
    with pytest.raises(SpectrumError):
        plot_bpt(results, labels=["only one"])
    assert isinstance(results[0], BPTResult)
