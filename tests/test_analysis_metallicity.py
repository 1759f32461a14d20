"""R23 oxygen abundances (specred.analysis.metallicity): PT05 formulas, reddening, branches, MC."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from conftest import SHARED, need_shared
from specred.analysis.bpt import LineFlux
from specred.analysis.metallicity import (Metallicity, balmer_ebv, deredden_ratio, line_wavelength,
                                          oxygen_abundance, pt05_lower, pt05_upper, r23_branch)
from specred.dust import ccm89_k
from specred.errors import SpectrumError
from specred.simulate import sources

TABLE3 = SHARED / "programme" / "table3_metallicity.ecsv"


def r23_upper(oh, p):
    """R23 for a given 12+log(O/H) and P on the upper branch (PT05 eq. 22 is linear in R23)."""
    return (oh * (85.96 + 82.76 * p + 43.98 * p**2) - (726.1 + 842.2 * p + 337.5 * p**2)) / (1 - 1.793 * oh)


def r23_lower(oh, p):
    """Same for the lower branch (PT05 eq. 24)."""
    return (oh * (17.72 + 6.60 * p + 6.95 * p**2) - (106.4 + 106.8 * p - 3.40 * p**2)) / (1 + 0.302 * oh)


def synthetic(oh=8.45, p=0.6, ebv=0.3, log_nii_oii=-0.8, rel_err=0.02, branch="upper", hb=1e-15,
              with_4959=True):
    """Observed (reddened) fluxes of an H II region with known abundance, excitation and E(B-V)."""
    r23 = r23_upper(oh, p) if branch == "upper" else r23_lower(oh, p)
    r3 = p * r23
    intrinsic = {"Hbeta": hb, "OIII_5007": hb * r3 * 2.98 / 3.98, "OIII_4959": hb * r3 / 3.98,
                 "OII_3727": hb * (r23 - r3), "Halpha": 2.86 * hb}
    intrinsic["NII_6584"] = intrinsic["OII_3727"] * 10 ** log_nii_oii
    if not with_4959:
        del intrinsic["OIII_4959"]
    out = {}
    for k, v in intrinsic.items():
        f = v * 10 ** (-0.4 * ccm89_k(np.array([line_wavelength(k)]))[0] * ebv)
        out[k] = LineFlux(f, rel_err * f)
    return out


# ---------------------------------------------------------------------------- formulas
def test_pt05_formulas_at_hand_computed_points():
    # eq. 22: (R23 + 726.1 + 842.2P + 337.5P^2) / (85.96 + 82.76P + 43.98P^2 + 1.793R23)
    # R23 = 5, P = 0.5: (5 + 726.1 + 421.1 + 84.375) / (85.96 + 41.38 + 10.995 + 8.965)
    assert pt05_upper(5.0, 0.5) == pytest.approx(1236.575 / 147.3, abs=1e-9)
    # R23 = 8, P = 0.8: (8 + 726.1 + 673.76 + 216) / (85.96 + 66.208 + 28.1472 + 14.344)
    assert pt05_upper(8.0, 0.8) == pytest.approx(1623.86 / 194.6592, abs=1e-9)
    # eq. 24: (R23 + 106.4 + 106.8P - 3.40P^2) / (17.72 + 6.60P + 6.95P^2 - 0.302R23)
    # R23 = 5, P = 0.5: (5 + 106.4 + 53.4 - 0.85) / (17.72 + 3.30 + 1.7375 - 1.51)
    assert pt05_lower(5.0, 0.5) == pytest.approx(163.95 / 21.2475, abs=1e-9)
    # R23 = 8, P = 0.8: (8 + 106.4 + 85.44 - 2.176) / (17.72 + 5.28 + 4.448 - 2.416)
    assert pt05_lower(8.0, 0.8) == pytest.approx(197.664 / 25.032, abs=1e-9)
    v = pt05_upper(np.array([5.0, 8.0]), np.array([0.5, 0.8]))
    assert v.shape == (2,) and v[0] == pytest.approx(pt05_upper(5.0, 0.5))
    assert isinstance(pt05_lower(5.0, 0.5), float)
    # physics: at fixed P the upper branch falls and the lower branch rises with R23
    r = np.linspace(2, 9, 8)
    assert np.all(np.diff(pt05_upper(r, 0.6)) < 0) and np.all(np.diff(pt05_lower(r, 0.6)) > 0)


def test_pt05_agrees_with_the_simulator_implementation():
    r23, p = np.meshgrid(np.linspace(1.0, 10.0, 19), np.linspace(0.1, 0.95, 18))
    np.testing.assert_allclose(pt05_upper(r23, p), sources.pt05_upper(r23, p), rtol=0, atol=1e-12)
    np.testing.assert_allclose(pt05_lower(r23, p), sources.pt05_lower(r23, p), rtol=0, atol=1e-12)
    # and with the simulator's inversion
    for oh, p in ((8.3, 0.4), (8.6, 0.7)):
        assert pt05_upper(sources.r23_for_oh_upper(oh, p), p) == pytest.approx(oh, abs=1e-10)


def test_balmer_ebv_and_ratio_dereddening():
    k_hb, k_ha = ccm89_k(np.array([4862.68, 6564.61]))
    ratio = 2.86 * 10 ** (0.4 * 0.3 * (k_hb - k_ha))
    ebv, err, clipped = balmer_ebv(ratio, 1.0, 0.03 * ratio, 0.02)
    assert ebv == pytest.approx(0.3, abs=1e-6) and not clipped
    assert err == pytest.approx(2.5 / (k_hb - k_ha) / np.log(10) * np.hypot(0.03, 0.02), rel=1e-6)
    # LineFlux input uses its errors; agrees with specred.dust.ebv_from_balmer
    e2, err2, _ = balmer_ebv(LineFlux(ratio, 0.03 * ratio), LineFlux(1.0, 0.02))
    assert e2 == pytest.approx(ebv) and err2 == pytest.approx(err)
    from specred.dust import ebv_from_balmer
    assert e2 == pytest.approx(float(ebv_from_balmer(ratio)), abs=1e-3)
    # below case B: clipped at 0 and said so
    e3, err3, c3 = balmer_ebv(2.5, 1.0, 0.05, 0.02)
    assert e3 == 0.0 and c3 and err3 > 0
    arr, _, carr = balmer_ebv(np.array([2.5, ratio]), np.array([1.0, 1.0]))
    assert list(carr) == [True, False] and arr[1] == pytest.approx(0.3, abs=1e-6)
    with pytest.raises(SpectrumError):
        balmer_ebv(-1.0, 1.0)
    with pytest.raises(SpectrumError):
        balmer_ebv(LineFlux(3e-16, 1e-16, True), LineFlux(1e-16, 1e-17))
    # ratio correction: 10^(0.4 E (k1 - k2)); [N II]/[O II] goes down (bluer denominator)
    k_n, k_o = ccm89_k(np.array([line_wavelength("NII_6584"), line_wavelength("OII_3727")]))
    assert deredden_ratio(1.0, "NII_6584", "OII_3727", 0.4) == pytest.approx(10 ** (0.16 * (k_n - k_o)))
    assert deredden_ratio(1.0, "NII_6584", "OII_3727", 0.4) < 1.0
    assert deredden_ratio(2.0, 6585.27, 3728.5, -0.2) == 2.0       # negative E(B-V): clipped, no change
    assert line_wavelength("OII_3727") == pytest.approx(3728.485, abs=0.01)


# ---------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("oh,p,ebv", [(8.45, 0.6, 0.3), (8.30, 0.8, 0.0), (8.70, 0.3, 0.6), (8.55, 0.5, 0.15)])
def test_known_abundance_is_recovered_through_reddening(oh, p, ebv):
    fl = synthetic(oh=oh, p=p, ebv=ebv)
    m = oxygen_abundance(fl, n_mc=300)
    assert isinstance(m, Metallicity) and m.branch == "upper"
    assert abs(m.oh12 - oh) < 0.02
    assert m.ebv == pytest.approx(ebv, abs=0.005)
    assert m.p == pytest.approx(p, abs=0.005)
    assert m.log_nii_oii == pytest.approx(-0.8, abs=0.005)
    assert 0 < m.oh12_err < 0.2
    assert "EBV_CLIPPED" not in m.flags and "NO_REDDENING" not in m.flags
    if ebv >= 0.3:
        # the correction matters: without Hα (no dereddening) the answer is off
        del fl["Halpha"]
        m2 = oxygen_abundance(fl, n_mc=0)
        assert "NO_REDDENING" in m2.flags and abs(m2.oh12 - oh) > 0.02


def test_lower_branch_selected_below_the_bifurcation():
    fl = synthetic(oh=7.8, p=0.7, ebv=0.2, log_nii_oii=-1.5, branch="lower")
    m = oxygen_abundance(fl, n_mc=300)
    assert m.branch == "lower"
    assert abs(m.oh12 - 7.8) < 0.02
    assert m.oh12 == pytest.approx(pt05_lower(m.r23, m.p))
    assert "TRANSITION_ZONE" not in m.flags
    assert r23_branch(-1.5) == "lower" and r23_branch(-1.2) == "upper" and r23_branch(np.nan) == "unknown"
    # the bifurcation is a parameter
    assert oxygen_abundance(fl, n_mc=0, bifurcation=-1.6).branch == "upper"


def test_paper_table3_ratios_all_select_the_upper_branch():
    need_shared(TABLE3)
    t = Table.read(TABLE3, format="ascii.ecsv")
    assert len(t) == 8
    assert list(r23_branch(np.asarray(t["log_nii_oii"]))) == ["upper"] * len(t)
    assert np.all(np.asarray(t["oh12"]) > 8.25)        # consistent with the upper-branch validity
    for row in t:
        fl = synthetic(oh=float(row["oh12"]), p=0.55, ebv=0.1, log_nii_oii=float(row["log_nii_oii"]))
        m = oxygen_abundance(fl, n_mc=200)
        assert m.branch == "upper"
        assert m.log_nii_oii == pytest.approx(row["log_nii_oii"], abs=0.005)
        assert abs(m.oh12 - row["oh12"]) < 0.02


def test_transition_zone_and_branch_uncertain_flags():
    m = oxygen_abundance(synthetic(oh=8.15, p=0.5, ebv=0.1), n_mc=200)
    assert m.branch == "upper" and 8.0 <= m.oh12 <= 8.25
    assert "TRANSITION_ZONE" in m.flags
    assert "TRANSITION_ZONE" not in oxygen_abundance(synthetic(oh=8.5), n_mc=0).flags
    # close to the bifurcation with large errors: many draws cross it
    fl = synthetic(oh=8.4, p=0.5, ebv=0.1, log_nii_oii=-1.17, rel_err=0.15)
    m = oxygen_abundance(fl, n_mc=1000)
    assert m.branch == "upper" and m.frac_other_branch > 0.16 and "BRANCH_UNCERTAIN" in m.flags
    m = oxygen_abundance(synthetic(oh=8.4, p=0.5, log_nii_oii=-0.6, rel_err=0.02), n_mc=1000)
    assert m.frac_other_branch == 0.0 and "BRANCH_UNCERTAIN" not in m.flags


def test_mc_error_matches_finite_difference_propagation():
    fl = synthetic(oh=8.45, p=0.55, ebv=0.25, rel_err=0.01)
    m = oxygen_abundance(fl, n_mc=4000, seed=3)
    var = 0.0
    for key, lf in fl.items():
        h = 1e-4 * lf.flux
        up = dict(fl, **{key: LineFlux(lf.flux + h, lf.err)})
        dn = dict(fl, **{key: LineFlux(lf.flux - h, lf.err)})
        deriv = (oxygen_abundance(up, n_mc=0).oh12 - oxygen_abundance(dn, n_mc=0).oh12) / (2 * h)
        var += (deriv * lf.err) ** 2
    sigma_fd = np.sqrt(var)
    assert sigma_fd > 0.003                              # reddening and R23 both contribute
    assert m.oh12_err == pytest.approx(sigma_fd, rel=0.1)
    # scales with the flux errors
    m3 = oxygen_abundance(synthetic(oh=8.45, p=0.55, ebv=0.25, rel_err=0.03), n_mc=4000, seed=3)
    assert m3.oh12_err == pytest.approx(3 * m.oh12_err, rel=0.15)


# ---------------------------------------------------------------------------- input handling
def test_missing_and_undetected_lines_give_flagged_nan_results():
    fl = synthetic()
    no_hb = {k: v for k, v in fl.items() if k != "Hbeta"}
    m = oxygen_abundance(no_hb)
    assert np.isnan(m.oh12) and "NO_HBETA" in m.flags and "Hβ missing" in m.reason and not m.ok
    hb_ul = dict(fl, Hbeta=LineFlux(3e-16, 1e-16, True))
    m = oxygen_abundance(hb_ul)
    assert np.isnan(m.oh12) and "HB_UNDETECTED" in m.flags
    m = oxygen_abundance({k: v for k, v in fl.items() if k != "OII_3727"}, n_mc=50)
    assert np.isnan(m.oh12) and "NO_OII" in m.flags and np.isnan(m.r23)
    assert m.ebv == pytest.approx(0.3, abs=0.005)        # what can be computed still is
    m = oxygen_abundance(dict(fl, OIII_5007=LineFlux(1e-17, 1e-17 / 3, True)), n_mc=0)
    assert np.isnan(m.oh12) and "OIII_UNDETECTED" in m.flags


def test_substitutions_and_defaults_are_flagged():
    full = oxygen_abundance(synthetic(), n_mc=0)
    m = oxygen_abundance(synthetic(with_4959=False), n_mc=0)
    assert "OIII_4959_FROM_5007" in m.flags and m.oh12 == pytest.approx(full.oh12, abs=1e-9)
    fl = synthetic()
    m = oxygen_abundance({k: v for k, v in fl.items() if k != "NII_6584"}, n_mc=0)
    assert m.branch == "upper" and "NO_NII" in m.flags and "missing" in m.reason
    assert m.oh12 == pytest.approx(full.oh12)
    # [N II] undetected: its limit below the bifurcation decides the lower branch ...
    low = synthetic(oh=7.8, p=0.7, ebv=0.0, log_nii_oii=-1.5, branch="lower")
    f = low["NII_6584"].flux
    m = oxygen_abundance(dict(low, NII_6584=LineFlux(f, f / 3, True)), n_mc=100)
    assert m.branch == "lower" and "NII_UPPER_LIMIT" in m.flags and "BRANCH_UNCERTAIN" not in m.flags
    # ... above it the branch stays open: upper by default, flagged
    f = fl["NII_6584"].flux
    m = oxygen_abundance(dict(fl, NII_6584=LineFlux(f, f / 3, True)), n_mc=100)
    assert m.branch == "upper" and {"NII_UPPER_LIMIT", "BRANCH_UNCERTAIN"} <= set(m.flags)
    # Hα/Hβ below case B: E(B-V) clipped to 0, no correction
    hb = fl["Hbeta"]
    m = oxygen_abundance(dict(fl, Halpha=LineFlux(2.6 * hb.flux, 0.01 * hb.flux)), n_mc=100)
    assert m.ebv == 0.0 and "EBV_CLIPPED" in m.flags and "clipped" in m.reason


def test_bad_input_raises_and_row_columns():
    fl = synthetic()
    with pytest.raises(SpectrumError, match="not positive"):
        oxygen_abundance(dict(fl, OII_3727=LineFlux(-1e-16, 1e-17)))
    with pytest.raises(SpectrumError, match="unknown line key"):
        oxygen_abundance(dict(fl, OIII=LineFlux(1e-16, 1e-17)))
    with pytest.raises(SpectrumError):
        oxygen_abundance(dict(fl, Hbeta=LineFlux(1e-16, -1.0)))
    with pytest.raises(SpectrumError):
        oxygen_abundance(fl, n_mc=-5)
    with pytest.raises(SpectrumError):
        oxygen_abundance([1, 2, 3])
    m = oxygen_abundance(fl, n_mc=100)
    row = m.to_row()
    for key in ("oh12", "oh12_err", "oh12_branch", "r23", "p_excitation", "log_nii_oii", "ebv", "ebv_err",
                "oh12_flags", "oh12_reason"):
        assert key in row
    assert row["oh12"] == m.oh12 and row["oh12_branch"] == "upper" and row["oh12_flags"] == ""
    # reproducible with a seed
    assert oxygen_abundance(fl, n_mc=100, seed=7) == oxygen_abundance(fl, n_mc=100, seed=7)
