"""Trace, sky subtraction and extraction on synthetic long-slit frames with known truth.

The frames are made here: a Gaussian spatial profile of known FWHM on a tilted and
curved trace, a continuum that fades towards the blue end with a few strong narrow emission
lines, a sky continuum with slit illumination and tilted sky lines, Poisson + read noise,
and injected cosmic rays.  The variance given to the algorithms is computed from the noisy
data (read_noise^2 + max(data, 0)), as :func:`specred.reduce.ccd.process_frame` does.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

from specred.errors import SpecredError
from specred.reduce import extract, skysub, trace

RN = 8.0
FWHM = 4.0
SIG = FWHM / (2 * np.sqrt(2 * np.log(2)))
LINE_ROWS = (300.3, 520.7, 705.2, 880.5)
LINE_FLUX = (3.0e4, 1.0e5, 2.0e4, 6.0e4)
SKY_LINES = ((60.0, 3000.0), (140.5, 800.0), (233.2, 6000.0), (401.7, 1500.0), (455.1, 400.0),
             (610.4, 5000.0), (612.9, 2500.0), (760.0, 900.0), (845.6, 4000.0), (990.2, 2000.0))


def _pix_gauss(x, centre, sigma):
    """Pixel-integrated unit Gaussian."""
    a = (x + 0.5 - centre) / (np.sqrt(2) * sigma)
    b = (x - 0.5 - centre) / (np.sqrt(2) * sigma)
    return 0.5 * (erf(a) - erf(b))


def make_frame(seed=1, *, ny=1024, nx=400, objects=((200.0, 1.0),), sky_lines=True, tilt=5.0,
               n_cr=0, lines=True, cont=400.0, sky_level=150.0, line_fwhm=FWHM):
    """Synthetic frame and its truth (see module docstring).

    ``line_fwhm`` > FWHM makes the emission lines spatially more extended than the
    continuum (e.g. a galaxy's line-emitting region)."""
    rng = np.random.default_rng(seed)
    y = np.arange(ny, dtype=float)
    x = np.arange(nx, dtype=float)
    t = y / (ny - 1) - 0.5
    # object continuum (fading to ~10 % at the blue end) + emission lines
    f_cont = cont * (0.1 + 0.9 / (1 + np.exp(-(y - 150.0) / 60.0)))
    f_line = np.zeros(ny)
    if lines:
        for yl, fl in zip(LINE_ROWS, LINE_FLUX):
            f_line += fl * _pix_gauss(y, yl, 1.3)
    flux = f_cont + f_line
    # sky: S(lambda) on a tilted wavelength map, times a slit illumination g(x)
    xr = (x - nx / 2) / nx
    wavemap = y[:, None] + tilt * xr[None, :] + 1.5 * xr[None, :] ** 2
    s_lam = sky_level + 0.05 * wavemap
    if sky_lines:
        for lam, amp in SKY_LINES:
            s_lam = s_lam + amp * np.exp(-0.5 * ((wavemap - lam) / 1.5) ** 2)
    illum = 1.0 + 0.06 * xr - 0.16 * xr**2
    sky = s_lam * illum[None, :]
    model = sky.copy()
    truths = []
    for k, (x0, scale) in enumerate(objects):
        xc = x0 + 3.0 * t + 10.0 * t**2 + (0.8 * t**3 if k == 0 else 0.0)
        prof = _pix_gauss(x[None, :], xc[:, None], SIG)
        if line_fwhm != FWHM:
            lprof = _pix_gauss(x[None, :], xc[:, None], line_fwhm / (2 * np.sqrt(2 * np.log(2))))
            obj2d = scale * (f_cont[:, None] * prof + f_line[:, None] * lprof)
            prof = obj2d / (scale * flux[:, None])      # effective profile of each row
        model += scale * flux[:, None] * prof
        truths.append({"x": xc, "flux": scale * flux, "prof": prof})
    data = rng.poisson(model).astype(float) + rng.normal(0, RN, model.shape)
    crmask = np.zeros(model.shape, bool)
    if n_cr:
        xc = truths[0]["x"]
        far = np.ones(ny, bool)
        for yl in LINE_ROWS:
            far &= np.abs(y - yl) > 8
        rows_ok = np.flatnonzero(far)
        rows_ok = rows_ok[rows_ok < ny - 1]
        for i in range(n_cr):
            r = int(rng.choice(rows_ok))
            # most events land in the aperture (the interesting case), some anywhere
            if i % 4:
                c = int(round(xc[r] + rng.uniform(-2.2, 2.2) * FWHM))
            else:
                c = int(rng.integers(5, nx - 5))
            amp = rng.uniform(400.0, 4000.0)
            data[r, c] += amp
            crmask[r, c] = True
            if i % 3 == 0:  # a two-pixel event
                dr, dc = (0, 1) if i % 2 else (1, 0)
                if r + dr >= ny or c + dc >= nx:
                    continue
                data[r + dr, c + dc] += 0.5 * amp
                crmask[r + dr, c + dc] = True
    var = RN**2 + np.clip(data, 0, None)
    mask = np.zeros(data.shape, bool)
    return {"data": data, "var": var, "mask": mask, "model": model, "sky": sky, "wavemap": wavemap,
            "objects": truths, "cr": crmask, "flux_cont": f_cont}


# ----------------------------------------------------------------------------------------
# helpers and fixtures


def _truth_in_aperture(obj, xcen, half_width, partial=False):
    """True object counts per row inside the aperture used by the extraction."""
    nx = obj["prof"].shape[1]
    u = np.arange(nx)[None, :] - xcen[:, None]
    if partial:
        w = np.clip(np.minimum(u + 0.5, half_width) - np.maximum(u - 0.5, -half_width), 0, 1)
    else:
        w = (np.abs(u) <= half_width).astype(float)
    return np.sum(obj["flux"][:, None] * obj["prof"] * w, axis=1)


def _reduce(fr, *, wavemap=True, excl_fwhm=3.0, ap_fwhm=2.5):
    """trace -> sky -> optimal + boxcar extraction, as the pipeline chains them."""
    d, v, m = fr["data"], fr["var"], fr["mask"]
    cands = trace.find_objects(d, v, m)
    tr = trace.fit_trace(d, v, m, trace.choose_object(cands)[0])
    excl = skysub.object_mask(d.shape, tr, excl_fwhm * tr.fwhm)
    sky, svar = skysub.fit_sky(d, v, m, excl, wavemap=fr["wavemap"] if wavemap else None)
    hw = ap_fwhm * tr.fwhm
    opt = extract.optimal_extract(d - sky, v, m, tr, half_width=hw, read_noise=RN, sky=sky, sky_variance=svar)
    box = extract.boxcar_extract(d - sky, v, m, tr, hw, sky_variance=svar)
    return {"trace": tr, "sky": sky, "sky_var": svar, "excl": excl, "opt": opt, "box": box, "hw": hw}


@pytest.fixture(scope="module")
def frame_cr():
    """Faint-ish object (S/N ~ 9 per row), strong tilted sky lines, 80 cosmic-ray events."""
    fr = make_frame(1, nx=300, objects=((150.0, 1.0),), n_cr=80)
    return fr, _reduce(fr)


@pytest.fixture(scope="module")
def frame_clean():
    """Same kind of frame without cosmic rays (boxcar vs optimal comparisons)."""
    fr = make_frame(2, nx=300, objects=((150.0, 1.0),))
    return fr, _reduce(fr)


@pytest.fixture(scope="module")
def frame_bright():
    """Bright continuum (S/N ~ 40 per row): the flux bias is measurable below 1 %."""
    fr = make_frame(3, nx=300, objects=((150.0, 1.0),), cont=3000.0, n_cr=40)
    return fr, _reduce(fr)


# ----------------------------------------------------------------------------------------
# trace


def test_find_objects_position_and_snr():
    fr = make_frame(11, nx=400, objects=((200.0, 1.0),))
    cands = trace.find_objects(fr["data"], fr["var"], fr["mask"])
    assert len(cands) == 1
    obj = fr["objects"][0]
    # the collapsed profile measures the flux-weighted mean centre of the curved trace
    xmean = np.sum(obj["x"] * obj["flux"]) / np.sum(obj["flux"])
    assert abs(cands[0][0] - xmean) < 0.5
    assert cands[0][1] > 50


def test_find_objects_two_objects_and_choose():
    fr = make_frame(12, nx=400, objects=((150.0, 1.0), (240.0, 0.4)))
    cands = trace.find_objects(fr["data"], fr["var"], fr["mask"])
    assert len(cands) == 2
    xs = [o["x"].mean() for o in fr["objects"]]
    # sorted by S/N: the bright one first
    assert abs(cands[0][0] - xs[0]) < 0.5 and abs(cands[1][0] - xs[1]) < 0.5
    assert cands[0][1] > cands[1][1]
    assert trace.choose_object(cands)[0] == cands[0][0]
    near = trace.choose_object(cands, expected_x=230.0)
    assert abs(near[0] - xs[1]) < 0.5
    assert trace.choose_object(cands, expected_x=190.0, max_distance=10.0) is None
    assert trace.choose_object([], expected_x=100.0) is None


def test_find_objects_negative_beam_of_nod_pair():
    a = make_frame(13, nx=400, objects=((150.0, 1.0),))
    b = make_frame(14, nx=400, objects=((250.0, 1.0),))
    d, v = a["data"] - b["data"], a["var"] + b["var"]
    pos = trace.find_objects(d, v, None)
    neg = trace.find_objects(d, v, None, sign=-1)
    assert len(pos) == 1 and abs(pos[0][0] - a["objects"][0]["x"].mean()) < 0.5
    assert len(neg) == 1 and abs(neg[0][0] - b["objects"][0]["x"].mean()) < 0.5
    trn = trace.fit_trace(d, v, None, neg[0][0], sign=-1)
    assert np.sqrt(np.mean((trn.x() - b["objects"][0]["x"]) ** 2)) < 0.1


def test_fit_trace_recovers_curved_trace(frame_cr):
    fr, red = frame_cr
    tr = red["trace"]
    xt = fr["objects"][0]["x"]
    rms = np.sqrt(np.mean((tr.x() - xt) ** 2))
    assert rms < 0.1, rms
    assert abs(tr.fwhm - FWHM) / FWHM < 0.1
    assert tr.n_bins >= 30 and tr.snr > 100
    # x(y) accepts any rows and is continuous where the extrapolation takes over
    for yb in tr.y_fit:
        xb = tr.x(np.array([yb - 1e-3, yb + 1e-3]))
        assert abs(xb[1] - xb[0]) < 1e-3
    assert np.all(np.isfinite(tr.x(np.array([-100.0, 2000.0]))))
    assert tr.x(np.array([512.0])).shape == (1,)


def test_fit_trace_faint_blue_end_extrapolates_smoothly():
    # continuum fading to 2 % at the blue end: the trace is measured on the red part only
    fr = make_frame(15, nx=300, objects=((150.0, 1.0),), lines=False, cont=250.0)
    fr["data"][:300] = fr["data"][:300] - fr["model"][:300] + fr["sky"][:300]   # no object in rows < 300
    tr = trace.fit_trace(fr["data"], fr["var"], fr["mask"], 150.5)
    assert tr.y_fit[0] > 250
    err = tr.x() - fr["objects"][0]["x"]
    assert np.sqrt(np.mean(err[300:] ** 2)) < 0.1
    assert np.max(np.abs(err[:300])) < 0.8       # smooth, no polynomial run-away


def test_no_object_raises():
    fr = make_frame(16, nx=300, objects=())
    assert trace.find_objects(fr["data"], fr["var"], fr["mask"]) == []
    with pytest.raises(SpecredError, match="no usable trace"):
        trace.fit_trace(fr["data"], fr["var"], fr["mask"], 150.0)


# ----------------------------------------------------------------------------------------
# sky


def test_fit_sky_wavemap_removes_tilted_sky_lines(frame_cr):
    fr, red = frame_cr
    d, v = fr["data"], fr["var"]
    sky_pix = ~red["excl"] & ~fr["cr"]
    z = (d - red["sky"]) / np.sqrt(v)
    assert 0.9 < z[sky_pix].std() < 1.15
    assert abs(z[sky_pix].mean()) < 0.05
    rows = np.arange(d.shape[0])
    for lam, amp in SKY_LINES:
        if amp >= 3000:
            on_line = sky_pix & (np.abs(rows - lam) < 4)[:, None]
            assert 0.9 < z[on_line].std() < 1.15, lam
    # the model variance is honest: (model - truth) / sqrt(sky_var) has unit scatter
    e = (red["sky"] - fr["sky"]) / np.sqrt(red["sky_var"])
    assert 0.8 < e.std() < 1.25


def test_fit_sky_rows_near_object():
    fr = make_frame(17, nx=400, objects=((200.0, 1.0),), n_cr=40)
    d, v, m = fr["data"], fr["var"], fr["mask"]
    tr = trace.fit_trace(d, v, m, 200.0)
    excl = skysub.object_mask(d.shape, tr, 3 * tr.fwhm)
    cols = (140, 260)
    sky, svar = skysub.fit_sky(d, v, m, excl, order=2, col_range=cols)
    sel = ~excl & ~fr["cr"]
    sel[:, : cols[0]] = False
    sel[:, cols[1]:] = False
    z = (d - sky) / np.sqrt(v)
    assert 0.9 < z[sel].std() < 1.15
    e = (sky - fr["sky"])[:, 195:206] / np.sqrt(svar[:, 195:206])
    assert 0.8 < e.std() < 1.25
    # across the whole slit the tilted lines defeat a per-row polynomial (hence the
    # wavelength method): this is what the wavemap test above guards against
    sky_all, _ = skysub.fit_sky(d, v, m, excl, order=2)
    assert ((d - sky_all) / np.sqrt(v))[~excl & ~fr["cr"]].std() > 1.3


def test_object_mask_width():
    fr = make_frame(18, nx=300, objects=((150.0, 1.0),), sky_lines=False, lines=False)
    tr = trace.fit_trace(fr["data"], fr["var"], fr["mask"], 150.0)
    ex = skysub.object_mask(fr["data"].shape, tr, 6.0)
    n = ex.sum(axis=1)
    assert ex.shape == fr["data"].shape and n.min() >= 12 and n.max() <= 14
    assert np.all(ex[np.arange(1024), np.rint(tr.x()).astype(int)])


# ----------------------------------------------------------------------------------------
# extraction


def test_optimal_flux_unbiased(frame_bright):
    fr, red = frame_bright
    opt = red["opt"]
    truth = _truth_in_aperture(fr["objects"][0], opt.x, red["hw"])
    good = ~opt.mask
    assert good.all()
    bias = np.sum(opt.flux[good] - truth[good]) / np.sum(truth[good])
    assert abs(bias) < 0.01, bias
    # also over the faint blue quarter and the bright red half separately
    for sl in (slice(0, 256), slice(512, 1024)):
        b = np.sum(opt.flux[sl] - truth[sl]) / np.sum(truth[sl])
        assert abs(b) < 0.02, (sl, b)


def test_optimal_variance_is_honest(frame_cr, frame_clean):
    for fr, red in (frame_cr, frame_clean):
        opt = red["opt"]
        truth = _truth_in_aperture(fr["objects"][0], opt.x, red["hw"])
        chi2 = np.mean((opt.flux - truth) ** 2 / opt.variance)
        assert 0.85 < chi2 < 1.15, chi2
        box = red["box"]
        truth_b = _truth_in_aperture(fr["objects"][0], box.x, red["hw"], partial=True)
        if not fr["cr"].any():
            chi2b = np.mean((box.flux - truth_b) ** 2 / box.variance)
            assert 0.85 < chi2b < 1.15, chi2b


def test_optimal_snr_beats_boxcar_and_reaches_theory(frame_clean):
    fr, red = frame_clean
    opt, box, hw = red["opt"], red["box"], red["hw"]
    obj = fr["objects"][0]
    truth = _truth_in_aperture(obj, opt.x, hw)
    truth_b = _truth_in_aperture(obj, box.x, hw, partial=True)
    snr_opt = truth / np.sqrt(opt.variance)
    snr_box = truth_b / np.sqrt(box.variance)
    assert np.median(snr_opt) > 1.2 * np.median(snr_box)
    # and in the actual scatter, not only in the quoted errors
    assert np.std(opt.flux - truth) < np.std(box.flux - truth_b)
    # theoretical optimum from the truth: S/N^2 = sum_x (f P)^2 / V
    u = np.arange(obj["prof"].shape[1])[None, :] - opt.x[:, None]
    fP = obj["flux"][:, None] * obj["prof"] * (np.abs(u) <= hw)
    snr_th = np.sqrt(np.sum(fP**2 / (RN**2 + fr["model"]), axis=1))
    ratio = np.median(snr_opt / snr_th)
    assert 0.9 < ratio <= 1.02, ratio


def test_cosmic_rays_rejected_and_lines_kept(frame_cr):
    fr, red = frame_cr
    opt, hw = red["opt"], red["hw"]
    u = np.arange(fr["data"].shape[1])[None, :] - opt.x[:, None]
    cr_in = fr["cr"] & (np.abs(u) <= hw)
    assert cr_in.sum() >= 50
    assert (opt.rejected & cr_in).sum() >= 0.95 * cr_in.sum()
    assert opt.n_rejected == int(opt.rejected.sum())
    assert (opt.rejected & ~fr["cr"]).sum() <= 5
    truth = _truth_in_aperture(fr["objects"][0], opt.x, hw)
    z = (opt.flux - truth) / np.sqrt(opt.variance)
    cr_rows = cr_in.any(axis=1)
    assert np.all(np.abs(z[cr_rows]) < 4.5)
    # emission lines: no pixel of a line row clipped, line fluxes within 3 sigma
    rows = np.arange(fr["data"].shape[0])
    for yl in LINE_ROWS:
        sel = np.abs(rows - yl) < 5
        assert not opt.rejected[sel].any(), yl
        zl = (opt.flux[sel].sum() - truth[sel].sum()) / np.sqrt(opt.variance[sel].sum())
        assert abs(zl) < 3, (yl, zl)


@pytest.mark.parametrize("line_fwhm", [4.8, 5.6])
def test_extended_emission_lines_not_clipped(line_fwhm):
    """Lines more extended than the continuum: their rows get a two-component profile, the
    profile peak is never rejected, and the line fluxes stay within 3 sigma."""
    fr = make_frame(31, nx=300, objects=((150.0, 1.0),), line_fwhm=line_fwhm, n_cr=40)
    red = _reduce(fr)
    opt = red["opt"]
    truth = _truth_in_aperture(fr["objects"][0], opt.x, red["hw"])
    rows = np.arange(fr["data"].shape[0])
    peak = opt.profile >= 0.3 * opt.profile.max(axis=1, keepdims=True)
    for yl in LINE_ROWS:
        sel = np.abs(rows - yl) < 5
        assert not (opt.rejected & peak)[sel].any(), yl
        assert (opt.rejected & ~fr["cr"])[sel].sum() <= 2, yl
        zl = (opt.flux[sel].sum() - truth[sel].sum()) / np.sqrt(opt.variance[sel].sum())
        assert abs(zl) < 3, (yl, zl)


def test_boxcar_partial_pixels_and_masked_column():
    fr = make_frame(19, nx=300, objects=((150.0, 1.0),), sky_lines=False, cont=2000.0)
    d, v = fr["data"] - fr["sky"], fr["var"]
    tr = trace.fit_trace(fr["data"], v, fr["mask"], 150.0)
    obj = fr["objects"][0]
    hw = 7.3                                    # non-integer: partial pixels at both edges
    mask = np.zeros(d.shape, bool)
    mask[:, int(round(obj["x"].mean()))] = True  # a bad column through the trace
    for m in (None, mask):
        box = extract.boxcar_extract(d, v, m, tr, hw)
        truth = _truth_in_aperture(obj, box.x, hw, partial=True)
        assert abs(np.sum(box.flux - truth) / np.sum(truth)) < 0.005
        assert 0.85 < np.mean((box.flux - truth) ** 2 / box.variance) < 1.2
        assert not box.mask.any() and box.method == "boxcar"
    opt = extract.optimal_extract(d, v, mask, tr, half_width=hw, read_noise=RN, sky=fr["sky"])
    truth = _truth_in_aperture(obj, opt.x, hw)
    assert abs(np.sum(opt.flux - truth) / np.sum(truth)) < 0.005
    assert not opt.mask.any() and opt.method == "optimal"
    # a row with every aperture pixel masked has no flux and is flagged
    mask[100, :] = True
    opt = extract.optimal_extract(d, v, mask, tr, half_width=hw, read_noise=RN, sky=fr["sky"])
    assert opt.mask[100] and np.isnan(opt.flux[100]) and opt.mask.sum() == 1


def test_profile_is_normalised(frame_clean):
    fr, red = frame_clean
    P = red["opt"].profile
    assert P.shape == fr["data"].shape
    assert np.allclose(P.sum(axis=1), 1.0)
    # the profile peaks on the trace
    peak = np.argmax(P, axis=1)
    assert np.all(np.abs(peak - red["trace"].x()) < 1.0)


# ----------------------------------------------------------------------------------------
# real data: the EFOSC2 Gr#13 He-Ar arc of the reference pack (tilted lines across the slit)


def _arc_pseudo_wavemap(lines_table, shape):
    """Map of 'reference row' (the row a line occupies at column 430) for every pixel, from
    the positions of the identified arc lines in every 10th column (PESSTO solution)."""
    from numpy.polynomial import polynomial as Pn

    ny, nx = shape
    x = np.asarray(lines_table["column_or_row"], float) - 1
    p = np.asarray(lines_table["pixel_file"], float) - 1
    lam = np.asarray(lines_table["ref_wavelength"], float)
    rows = []
    for lw in np.unique(lam):
        s = lam == lw
        pref = Pn.polyval(429.0, Pn.polyfit(x[s], p[s], 2))
        rows.append(np.c_[x[s], np.full(s.sum(), pref), p[s] - pref])
    off = np.vstack(rows)
    terms = [(i, j) for i in range(3) for j in range(3)]
    A = np.stack([(off[:, 0] / nx) ** i * (off[:, 1] / ny) ** j for i, j in terms], axis=1)
    coef, *_ = np.linalg.lstsq(A, off[:, 2], rcond=None)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    yref = yy.copy()
    for _ in range(3):
        delta = sum(c * (xx / nx) ** i * (yref / ny) ** j for c, (i, j) in zip(coef, terms))
        yref = yy - delta
    return yref


def test_fit_sky_wavemap_on_real_efosc2_arc(ntt_ref):
    from astropy.io import fits
    from astropy.table import Table
    from scipy.ndimage import binary_dilation

    stem = str(ntt_ref / "arcs" / "efosc2_gr13" / "arc_20120825_Gr13_Free_slit1.0_56442_1")
    raw = fits.getdata(stem + ".fits").astype(float)                   # flat-fielded ADU
    hdr = fits.getheader(stem + ".fits")
    gain = float(hdr["HIERARCH ESO DET OUT1 CONAD"])                   # e-/ADU
    rn = float(hdr["HIERARCH ESO DET OUT1 RON"])                       # e-
    wmap = _arc_pseudo_wavemap(Table.read(stem + ".lines.ecsv"), raw.shape)
    data = raw * gain
    var = rn**2 + np.clip(data, 0, None)
    mask = binary_dilation(raw > 60000, iterations=2)                  # saturated lines
    sky_w, svar_w = skysub.fit_sky(data, var, mask, None, wavemap=wmap, order=2)
    sky_r, svar_r = skysub.fit_sky(data, var, mask, None, order=2)
    good = ~mask
    zw = ((data - sky_w) / np.sqrt(var + svar_w))[good]
    zr = ((data - sky_r) / np.sqrt(var + svar_r))[good]
    bright = (sky_w > 2000)[good]
    # lines tilted by ~2 px across the slit: the per-row polynomial leaves their flanks, the
    # wavelength-space B-spline follows them (limited by the line-position map, ~0.05 px)
    assert 1.4826 * np.median(np.abs(zw)) < 1.5
    assert np.std(zw) < 0.75 * np.std(zr)
    assert np.std(zw[bright]) < 0.7 * np.std(zr[bright])


@pytest.mark.parametrize("amp", [1.0, 3.0])
def test_optimal_extraction_of_a_faint_object_is_unbiased(amp):
    """At S/N ~0.6 and ~1.8 per row (the programme's faintest targets) the optimal flux,
    averaged over many rows and noise draws, equals the truth: an empirical profile normalised
    by each row's own noisy flux comes out too broad and biased it +26 % (S/N 0.6)."""
    from specred.reduce.extract import optimal_extract
    from specred.reduce.trace import Trace

    ny, nx, sig = 1000, 61, 1.5
    x = np.arange(nx)
    prof = np.exp(-0.5 * ((x - 30.0) / 1.5) ** 2)
    prof /= prof.sum()
    tr = Trace(np.array([30.0]), ny, 1.5 * 2.3548, 10.0)
    flux = amp * 1.5 * np.sqrt(2 * np.pi)
    ratios, errs = [], []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        data = flux * prof[None, :] + rng.normal(0.0, sig, (ny, nx))
        res = optimal_extract(data, np.full((ny, nx), sig**2), None, tr, half_width=2.5 * tr.fwhm)
        ratios.append(np.nanmean(res.flux) / flux)
        errs.append(np.sqrt(np.nanmean(res.variance) / ny) / flux)
    err_of_mean = np.sqrt(np.mean(np.square(errs)) / len(ratios))
    assert abs(np.mean(ratios) - 1.0) < 0.01 + 3 * err_of_mean, (np.mean(ratios), err_of_mean)
    # and the quoted errors describe the scatter between noise draws
    assert np.std(ratios) < 2.0 * np.mean(errs)
