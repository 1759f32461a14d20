"""ABBA building blocks of the SofI reducer: pairing, column shifts, masked median stack."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import shift as nd_shift

from specred.sofi_pipeline import _masked_median, _shift_and_combine, _shift_columns, abba_pairs


def _frames(nods):
    return [SimpleNamespace(object="T", nod=n, mjd=58000.0 + 0.001 * i, path=f"f{i}.fits") for i, n in enumerate(nods)]


def test_abba_pairs_consecutive():
    pairs, notes = abba_pairs(_frames("ABBAABBA"))
    assert notes == []
    assert [(p.nod + q.nod) for p, q in pairs] == ["AB", "BA", "AB", "BA"]
    assert len({p.path for pq in pairs for p in pq}) == 8          # every frame used once


def test_abba_pairs_missing_b_pairs_leftover_with_nearest_and_says_so():
    fr = _frames("ABBAA")            # A B B A A: the last A has no consecutive partner
    pairs, notes = abba_pairs(fr)
    assert len(pairs) == 3 and len(notes) == 1 and "f4.fits" in notes[0] and "incomplete" in notes[0]
    p, q = pairs[-1]
    assert p.path == "f4.fits" and q.nod == "B" and q.path == "f2.fits"  # nearest B in time


def test_abba_pairs_single_position_cannot_be_subtracted():
    pairs, notes = abba_pairs(_frames("AAAA"))
    assert pairs == [] and "no A-B pair" in notes[0]


@pytest.mark.parametrize("dx", [0.0, 0.37, -0.81, 4.0, -7.5, 12.25])
def test_shift_columns_matches_scipy_linear_shift(dx):
    a = np.random.default_rng(3).normal(size=(40, 64))
    ref = nd_shift(a, (0, -dx), order=1, mode="constant", cval=np.nan)
    out = _shift_columns(a, dx, np.nan)
    assert np.array_equal(np.isfinite(ref), np.isfinite(out))
    ok = np.isfinite(ref)
    assert np.allclose(out[ok], ref[ok], atol=1e-12)


def test_masked_median_matches_nanmedian():
    rng = np.random.default_rng(5)
    for k in (1, 2, 5, 8):
        S = rng.normal(size=(k, 20, 30))
        M = rng.random(S.shape) < 0.3
        med, n = _masked_median(S, M)
        with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if np.any(M.all(axis=0)) else _nullctx():
            ref = np.nanmedian(np.where(M, np.nan, S), axis=0)
        assert np.array_equal(n, (~M).sum(axis=0))
        assert np.array_equal(np.isnan(med), np.isnan(ref))
        assert np.allclose(med[~np.isnan(ref)], ref[~np.isnan(ref)])


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_shift_and_combine_aligns_beams_rejects_cosmics_and_propagates_variance():
    rng = np.random.default_rng(11)
    ny, nx, sig = 200, 120, 1.0
    cols = np.arange(nx)
    offsets = [0.0, 20.3, 0.0, 20.3, -10.6, 9.7, -10.6, 9.7]
    diffs = []
    for off in offsets:
        beam = 100.0 * np.exp(-0.5 * ((cols - 50.0 - off) / 2.0) ** 2)
        d = beam[None, :] + rng.normal(0.0, sig, (ny, nx))
        m = np.zeros((ny, nx), bool)
        diffs.append([None, d, np.full((ny, nx), sig**2), m, off])
    diffs[3][1][100, 70] += 5000.0                                  # a cosmic ray in one frame
    data, var, bad = _shift_and_combine([tuple(d) for d in diffs], offsets, "median")
    prof = np.median(data[:, 35:66], axis=0)
    xc = np.sum(prof * cols[35:66]) / np.sum(prof)
    assert xc == pytest.approx(50.0, abs=0.05)                      # beams on top of each other
    assert abs(data[100, 70 - 20] - np.median(data[:, 50])) < 20.0  # cosmic ray gone from the stack
    # variance of the median of 8: (pi/2) sigma^2 / 8.  Sub-pixel interpolation moves part
    # of each pixel's variance into its neighbours' covariance, so the propagated per-pixel
    # value is checked where it matters, on sums over an extraction-sized block of columns
    assert np.median(var[:, 85:100]) == pytest.approx(np.pi / 2 / 8, rel=0.01)
    block = data[:, 85:95].sum(axis=1)
    assert np.var(block) == pytest.approx(np.sum(var[0, 85:95]), rel=0.25)
    # the last columns are covered by 4 of the 8 shifted frames only: variance doubles
    assert not bad.any()
    assert np.median(var[:, -1]) == pytest.approx(np.pi / 2 / 4, rel=0.01)
    # with two more frames shifted off the edge, fewer than half cover it: flagged, not kept
    more = [tuple(d) for d in diffs] + [(None, diffs[0][1], diffs[0][2], diffs[0][3], 30.0)] * 2
    _, var2, bad2 = _shift_and_combine(more, offsets + [30.0, 30.0], "median")
    assert bad2[:, -1].all() and np.isinf(var2[:, -1]).all() and not bad2[:, 50].any()
