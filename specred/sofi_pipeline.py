"""SofI blue-grism (GB) night reduction: ABBA pair subtraction, shift-and-median combination,
Xe wavelength solution with an OH zero point, A0V telluric correction, flux calibration.

Called by :func:`specred.pipeline.reduce_night` for every SofI GB set-up of a night.

Per set-up:

* flats: every lamp-on flat minus the nearest lamp-off flat (removes the thermal glow),
  combined and normalised along the dispersion;
* arcs: automatic Xe solution (vacuum Å; wavelength decreases with row);
* every ABBA sequence (science, telluric standard, flux standard): consecutive A/B frames
  are subtracted both ways (P − Q puts a positive beam at P), which removes sky, bias and
  dark together; each difference is shifted so that its positive beam falls on the
  reference position (offsets from ``ESO SEQ CUMOFFSETX``, cross-checked by the measured
  beam position), the stack is median-combined (hot pixels and cosmic rays rejected), the
  residual sky along the slit is removed, and the positive beam is extracted optimally;
* the zero point of the wavelength scale is refined on isolated OH lines of the sky;
* telluric: each A0V star is divided by the intrinsic A0V model (hydrogen lines removed) and
  its smooth continuum, giving T(λ); the target observed before it is divided by T after a
  sub-pixel shift and an airmass scaling; T < ``telluric.min_transmission`` is masked;
* flux: sensitivity from the spectrophotometric standard (itself telluric-corrected with
  the nearest A0V star), or — flagged ``FLUX_FROM_TELLURIC`` — from the A0V star's V
  magnitude and the Vega model.

Exposure: SofI frames hold the average of NDIT integrations of DIT seconds (``EXPTIME`` =
DIT), so counts are per DIT and the variance of a frame is (RN² + signal) / NDIT.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from . import calib
from .errors import CalibrationError, SpecredError
from .instruments.base import slit_width_arcsec
from .io import atomic_write_table, safe_name
from .pipeline import (Calibrations, FrameSpectrum, _read_raw, _reduce_target, _row, _Stage, make_cutout,
                       new_calibrations, sky_shift_xcorr, solve_setup_arcs, store_flat, target_name)
from .reduce import ccd as ccdred
from .reduce import extract as extr
from .reduce import fluxcal, skysub, telluric
from .reduce import trace as trc
from .reduce import wavecal

log = logging.getLogger(__name__)

__all__ = ["sofi_calibrations", "abba_pairs", "ReferenceBeam", "combine_abba", "extract_sequence", "reduce_sofi_setup"]


# ============================================================================ calibrations
def _process(info, geom, bad=None):
    raw, hdr = _read_raw(info)
    img = ccdred.process_frame(raw, geom, bad_pixels=bad)
    ndit = max(int(info.ndit or 1), 1)
    img.uncertainty.array[...] = img.uncertainty.array / ndit
    return img, hdr


def sofi_calibrations(group: dict, cfg: dict, out: Path, key: tuple, stage=None) -> Calibrations:
    """Lamp-on minus lamp-off flat and Xe wavelength solution of one SofI set-up."""
    stage = stage or _Stage({})
    cal = new_calibrations(key, group, "vacuum")
    geom, tag = cal.geometry, cal.tag
    caldir = out / "calibrations"
    with stage("flat"):
        on, off = group.get("flat", []), group.get("lamp_off_flat", [])
        if on and off:
            diffs = []
            for f in on:
                g = min(off, key=lambda o: abs(o.mjd - f.mjd))
                a, _ = _process(f, geom)
                b, _ = _process(g, geom)
                d = a.subtract(b)
                d.uncertainty = type(a.uncertainty)(a.uncertainty.array + b.uncertainty.array)
                d.mask = a.mask | b.mask
                diffs.append(d)
            flat, _ = ccdred.master_flat(diffs, spectral_smooth=cfg["flat"]["spectral_smooth"],
                                         min_level=cfg["flat"]["min_level"])
            store_flat(cal, flat, caldir)
        else:
            cal.flags.append("NO_FLAT")
            log.warning("%s: no lamp-on/lamp-off flat pair; pixel response not corrected", tag)
    with stage("wavecal"):
        seed = wavecal.load_seed(wavecal.seed_for_setup("SOFI", key[2].split("/")[0]))
        arcs = group.get("arc", [])
        solve_setup_arcs(cal, seed, [_process(a, geom)[0] for a in arcs], arcs, caldir, "OH")
        cal.lsf_fwhm_aa = float(seed.fwhm_px * np.median(np.abs(np.gradient(cal.wavemap[:, cal.wavemap.shape[1] // 2]))))
    return cal


# ============================================================================ ABBA
def abba_pairs(frames) -> tuple[list[tuple], list[str]]:
    """Pair the frames of one nodding sequence (sorted by time) into (P, Q) with P, Q at
    different nod positions, consecutive where possible (A1B1, B2A2, ...).

    A frame left without a partner (incomplete cycle, missing B) is paired with the
    nearest-in-time frame of the other position, with a warning; a sequence with one nod
    position only cannot be pair-subtracted (empty list, warning).
    """
    fr = sorted(frames, key=lambda f: f.mjd)
    warnings = []
    if len({f.nod for f in fr}) < 2:
        return [], [f"{fr[0].object}: all {len(fr)} frames at nod position {fr[0].nod}; no A-B pair to subtract"]
    pairs, used = [], set()
    i = 0
    while i < len(fr) - 1:
        if fr[i].nod != fr[i + 1].nod:
            pairs.append((fr[i], fr[i + 1]))
            used |= {i, i + 1}
            i += 2
        else:
            i += 1
    for j, f in enumerate(fr):
        if j in used:
            continue
        other = [g for g in fr if g.nod != f.nod]
        g = min(other, key=lambda o: abs(o.mjd - f.mjd))
        pairs.append((f, g))
        warnings.append(f"{f.object}: {Path(f.path).name} (nod {f.nod}) has no consecutive partner "
                        f"(incomplete ABBA cycle); paired with {Path(g.path).name}")
    return pairs, warnings


def _beam_column(d, var, mask, expected: float, search: float) -> float | None:
    lo = int(max(expected - search, 0))
    hi = int(min(expected + search + 1, d.shape[1]))
    cands = trc.find_objects(d, var, mask, col_range=(lo, hi), min_snr=5.0)
    near = trc.choose_object(cands, expected_x=expected, max_distance=search)
    return None if near is None else float(near[0])


def _shift_columns(a: np.ndarray, dx: float, fill: float) -> np.ndarray:
    """``out[:, j] = a[:, j + dx]`` by linear interpolation between the two nearest columns
    (what ``scipy.ndimage.shift(a, (0, -dx), order=1)`` does, without its spline machinery);
    columns that fall outside ``a`` get ``fill``."""
    ny, nx = a.shape
    i0 = int(np.floor(dx))
    f = float(dx - i0)
    out = np.full((ny, nx), fill, dtype=float)
    # out[:, j] = (1 - f) a[:, j + i0] + f a[:, j + i0 + 1], for 0 <= j + i0 and j + i0 + 1 < nx
    # (f == 0: only a[:, j + i0] is needed)
    j_lo = max(0, -i0)
    j_hi = min(nx, nx - i0 - (1 if f > 0 else 0))
    if j_hi <= j_lo:
        return out
    src = a[:, j_lo + i0:j_hi + i0]
    if f > 0:
        out[:, j_lo:j_hi] = (1.0 - f) * src + f * a[:, j_lo + i0 + 1:j_hi + i0 + 1]
    else:
        out[:, j_lo:j_hi] = src
    return out


def _masked_median(S: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median over axis 0 of ``S`` leaving out ``M`` (True = bad), and the number of values
    used.  One sort of the stack (bad values set to NaN sort last) and two gathers: far
    faster than ``np.nanmedian``, which goes through masked arrays for short axes."""
    srt = np.sort(np.where(M, np.nan, S), axis=0)
    n = np.sum(~M, axis=0)
    lo = np.take_along_axis(srt, np.maximum(n - 1, 0)[None] // 2, axis=0)[0]
    hi = np.take_along_axis(srt, (n // 2)[None], axis=0)[0]
    with np.errstate(invalid="ignore"):
        med = 0.5 * (lo + hi)
    return np.where(n > 0, med, np.nan), n


def _shift_and_combine(diffs, shifts, method: str):
    """Shift each difference image by ``-shift`` columns (linear interpolation) and combine.

    Median (default): the variance of the median of n ~Gaussian values is (π/2) σ²/n for
    n >= 3 (the mean's for n <= 2).  Pixels masked in a frame are left out of it; a shifted
    pixel is bad when either of the two it is interpolated from is.
    """
    k = len(diffs)
    ny, nx = diffs[0][1].shape
    S = np.empty((k, ny, nx))
    V = np.empty((k, ny, nx))
    M = np.empty((k, ny, nx), bool)
    for i, ((_, d, v, m, _), dx) in enumerate(zip(diffs, shifts)):
        S[i] = _shift_columns(np.where(m, 0.0, d), dx, np.nan)
        V[i] = _shift_columns(np.where(m, 0.0, v), dx, np.nan)
        M[i] = _shift_columns(m.astype(float), dx, 1.0) > 0.01
    M |= ~np.isfinite(S) | ~np.isfinite(V)
    if method == "median":
        data, n = _masked_median(S, M)
        factor = np.where(n > 2, np.pi / 2, 1.0)
    else:
        n = np.sum(~M, axis=0)
        data = np.sum(np.where(M, 0.0, S), axis=0) / np.maximum(n, 1)
        factor = 1.0
    bad = n < max(1, k // 2)                  # edges not covered by most shifted images
    var = np.sum(np.where(M, 0.0, V), axis=0) / np.maximum(n, 1) ** 2 * factor
    return np.where(bad, 0.0, data), np.where(bad, np.inf, var), bad


@dataclass
class ReferenceBeam:
    """Where a bright star of the same set-up fell on the slit: its trace in the combined
    frame and the header offset (``ESO SEQ CUMOFFSETX``, arcsec) of the frame that trace
    refers to.  Targets are acquired at the same slit position, so a faint target's beam is
    expected at the star's column plus the difference of the offsets."""

    trace: trc.Trace
    offset_x: float
    name: str

    def expected_x(self, offset_x: float, scale: float) -> float:
        return float(self.trace.x([0.5 * (self.trace.ny - 1)])[0]) + (offset_x - self.offset_x) / scale


def combine_abba(infos, cal: Calibrations, cfg: dict, stage=None, reference: ReferenceBeam | None = None):
    """Pair-subtract, align and median-combine one nodding sequence.

    Returns (data, variance, mask, x_ref, sky_frame, notes, n_images, ref_offset): the
    combined positive-beam image (e- per DIT), its variance, bad-pixel mask, the column of
    the positive beam, a sky image (the first frame, for the OH zero point), warnings, the
    number of difference images combined and the header offset (arcsec) of the reference
    frame.

    With a ``reference`` beam the target is the candidate nearest the column expected from
    it (within ``trace.reference_window_px``); when none is there (a target too faint to be
    detected in the combined frame) the expected column itself is used and a note says so.
    Without one, the brightest candidate is taken.
    """
    stage = stage or _Stage({})
    geom = cal.geometry
    pairs, notes = abba_pairs(infos)
    if not pairs:
        raise SpecredError("; ".join(notes))
    scale = geom.pixel_scale
    ref_off = float(pairs[0][0].offset_x or 0.0)
    proc = {}

    def get(info):
        if info.path not in proc:
            img, _ = _process(info, geom, cal.bad_pixels)
            if cal.flat is not None:
                img = ccdred.apply_flat(img, cal.flat)
            proc[info.path] = img
        return proc[info.path]

    with stage("abba"):
        diffs = []       # (positive frame, D, V, M, header shift in columns)
        for p, q in pairs:
            a, b = get(p), get(q)
            for pos, neg in ((a, b), (b, a)):
                info = p if pos is a else q
                d = pos.data.astype(float) - neg.data
                v = pos.uncertainty.array.astype(float) + neg.uncertainty.array
                diffs.append((info, d, v, pos.mask | neg.mask, (float(info.offset_x or 0.0) - ref_off) / scale))
        shifts = [h for *_, h in diffs]
        data, var, mask = _shift_and_combine(diffs, shifts, cfg["abba"]["combine"])
        cands = trc.find_objects(data, var, mask, min_snr=cfg["trace"]["min_snr"])
        if reference is not None and cfg["trace"]["expected_x"] is None:
            expect = reference.expected_x(ref_off, scale)
            win = cfg["trace"]["reference_window_px"]
            pick = trc.choose_object(cands, expected_x=expect, max_distance=win)
            if pick is None:
                notes.append(f"{infos[0].object}: no beam above S/N {cfg['trace']['min_snr']} within {win:.0f} px "
                             f"of column {expect:.1f} expected from {reference.name}; extracting there")
                pick = (expect, 0.0)
        else:
            pick = trc.choose_object(cands, expected_x=cfg["trace"]["expected_x"])
        if pick is None:
            raise SpecredError(f"{infos[0].object}: no positive beam in the combined A-B frames "
                               f"(no peak above S/N {cfg['trace']['min_snr']})")
        x_ref = pick[0]
        # cross-check every difference's beam against the header offset; measured offsets
        # replace the header's when they agree within the tolerance
        tol = cfg["abba"]["max_offset_mismatch_px"]
        measured = list(shifts)
        for k, (info, d, v, m, h) in enumerate(diffs):
            col = _beam_column(d, v, m, x_ref + h, 3 * tol)
            if col is None:
                continue
            if abs(col - x_ref - h) > tol:
                notes.append(f"{Path(info.path).name}: measured beam offset {col - x_ref:.1f} px differs from "
                             f"the header's {h:.1f} px; using the header")
            else:
                measured[k] = col - x_ref
        if not np.allclose(measured, shifts, rtol=0.0, atol=0.05):   # 0.05 px: below the interpolation error
            data, var, mask = _shift_and_combine(diffs, measured, cfg["abba"]["combine"])
        nstack = len(diffs)
    sky_frame = get(pairs[0][0])
    return data, var, mask, x_ref, sky_frame, notes, nstack, ref_off


def extract_sequence(infos, cal: Calibrations, cfg: dict, stage=None,
                     reference: ReferenceBeam | None = None) -> FrameSpectrum:
    """Reduce one ABBA sequence to a 1D spectrum in e- per DIT (see :func:`combine_abba`).

    ``reference``: a bright star's beam (:class:`ReferenceBeam`) that places, and when the
    target is too faint to be traced, shapes the extraction aperture (the star's trace
    moved to the target's column; flag ``TRACE_FROM_REFERENCE``).
    """
    stage = stage or _Stage({})
    data, var, mask, x_ref, sky_frame, notes, nstack, ref_off = combine_abba(infos, cal, cfg, stage, reference)
    flags = ["ABBA_INCOMPLETE"] if any("partner" in s for s in notes) else []
    for s in notes:
        log.warning("%s", s)
    with stage("trace"):
        t = cfg["trace"]
        try:
            tr = trc.fit_trace(data, var, mask, x_ref, order=t["order"], bin_rows=t["bin_rows"])
        except SpecredError as exc:
            if reference is None:
                raise
            mid = 0.5 * (data.shape[0] - 1)
            tr = reference.trace.shifted(x_ref - float(reference.trace.x([mid])[0]))
            flags.append("TRACE_FROM_REFERENCE")
            log.warning("%s: %s; using the trace of %s moved to column %.1f", infos[0].object, exc,
                        reference.name, x_ref)
    with stage("sky"):
        s = cfg["sky"]
        excl = skysub.object_mask(data.shape, tr, s["object_half_width_fwhm"] * tr.fwhm)
        # negative beams of the other nod positions: leave them out of the residual-sky fit
        for info in infos:
            dx = (float(info.offset_x or 0.0) - float(infos[0].offset_x or 0.0)) / cal.geometry.pixel_scale
            for sgn in (1, -1):
                excl |= skysub.object_mask(data.shape, tr.shifted(sgn * dx), s["object_half_width_fwhm"] * tr.fwhm) \
                    if abs(dx) > 2 * tr.fwhm else False
        if s["window_px"]:
            # a local background (as IRAF apall's background regions): the residual of the
            # pair subtraction varies along the slit on scales a low-order fit of the whole
            # slit does not follow, and faint targets are biased by it
            cols = np.arange(data.shape[1])[None, :]
            excl |= np.abs(cols - tr.x()[:, None]) > s["window_px"]
        finite = np.isfinite(var)
        sky, sky_var = skysub.fit_sky(data, np.where(finite, var, 1e30), mask | ~finite, excl, order=s["order"])
    rows = np.arange(data.shape[0])
    xs = tr.x(rows)
    wave = cal.wavesol.wavelength(rows.astype(float), xs)
    shift = 0.0
    if cfg["wavecal"]["flexure_from_sky"]:
        xi = np.clip(np.round(xs).astype(int), 0, data.shape[1] - 1)
        cols = np.clip(xi[:, None] + np.r_[-40:-15, 15:40][None, :], 0, data.shape[1] - 1)
        sky1d = np.median(sky_frame.data[rows[:, None], cols], axis=1)
        oh = calib.sky_lines("nir")
        off = sky_shift_xcorr(rows, wave, sky1d, oh["wavelength"], oh["flux"], cal.lsf_fwhm_aa,
                              max_shift=cfg["wavecal"]["max_flexure_px"])
        if off is None:
            flags.append("NO_SKY_ZEROPOINT")
        else:
            shift = off
            wave = cal.wavesol.wavelength(rows - shift, xs)
    else:
        sky1d = np.zeros(len(rows))
    # QA: residual of the OH lines in the sky-subtracted combined frame, in units of the
    # propagated photon + read noise, on the rows of the brightest OH lines (top 5 %)
    oh_rows = sky1d > np.percentile(sky1d, 95) if np.any(sky1d) else np.zeros(len(rows), bool)
    zone = ~excl & ~mask & finite
    zone[~oh_rows, :] = False
    chi = ((data - sky) / np.sqrt(np.where(finite, var, np.inf)))[zone]
    chi = chi[np.abs(chi) < 6.0]                  # hot pixels / cosmic-ray remnants
    oh_resid = float(np.sqrt(np.mean(chi**2))) if chi.size > 100 else float("nan")
    with stage("extract"):
        e = cfg["extract"]
        half = e["half_width_fwhm"] * tr.fwhm
        res = extr.optimal_extract(np.where(mask, 0.0, data - sky), np.where(finite, var, 1e30), mask | ~finite, tr,
                                   half_width=half, nsigma=e["nsigma"], sky_variance=sky_var)
    info0 = infos[0]
    hdr = fits.getheader(info0.path)
    thru = None
    slit = slit_width_arcsec(info0.slit)
    if cfg["fluxcal"]["slit_loss"] and slit:
        ref = float(np.interp(0.5 * (tr.y_fit[0] + tr.y_fit[1]), rows, wave)) if tr.y_fit else float(np.median(wave))
        thru = fluxcal.slit_throughput(wave, tr.fwhm * cal.geometry.pixel_scale, slit, ref)
    fs = FrameSpectrum(info0, hdr, wave, res.flux, res.variance, res.mask | ~np.isfinite(res.flux), tr, rows, xs,
                       shift, int(res.n_rejected), sky1d, flags, res.rejected, thru,
                       make_cutout(data - sky, mask | ~finite, xs))
    fs.total_exptime = float(sum(f.exptime * (f.ndit or 1) for f in infos))
    fs.n_frames = len(infos)
    fs.oh_residual = oh_resid
    fs.n_stack = nstack
    fs.notes = notes
    fs.ref_offset_x = ref_off
    fs.raw_infos = list(infos)                    # provenance: every frame of the sequence
    return fs


# ============================================================================ set-up
def _sequences(frames) -> list[list]:
    """Split frames of one type into nodding sequences (one OB: same object and obs id)."""
    seqs: dict[tuple, list] = {}
    for f in frames:
        seqs.setdefault((f.object, f.obs_id), []).append(f)
    return [sorted(v, key=lambda f: f.mjd) for v in sorted(seqs.values(), key=lambda v: min(f.mjd for f in v))]


def _telluric_for(seq, tells: list[tuple]) -> tuple[object | None, list[str]]:
    """The telluric transmission for a science sequence: the A0V star observed right after
    it (within 1 h), else the one nearest in airmass (flagged)."""
    if not tells:
        return None, ["NO_TELLURIC"]
    end = max(f.mjd for f in seq)
    after = [t for t in tells if 0 <= t[0] - end < 1.0 / 24]
    if after:
        return min(after, key=lambda t: t[0])[1], []
    am = np.mean([f.airmass for f in seq if f.airmass])
    best = min(tells, key=lambda t: abs(t[1].airmass - am))
    log.warning("%s: no telluric star observed right after; using the one at airmass %.2f", seq[0].object,
                best[1].airmass)
    return best[1], ["TELLURIC_NEAREST_AIRMASS"]


def _a0v_transmission(fs: FrameSpectrum, cal: Calibrations) -> tuple[telluric.Transmission, object]:
    intrinsic = telluric.a0v_intrinsic(fs.wave, cal.lsf_fwhm_aa, "vacuum")
    tr = telluric.transmission_from_standard(fs.wave, fs.counts, fs.var, medium="vacuum", airmass=fs.info.airmass,
                                             intrinsic=intrinsic, mask=fs.mask)
    return tr, intrinsic


def reduce_sofi_setup(key, group: dict, cfg: dict, out: Path, timings: dict, progress=None, catalog=None):
    """Reduce one SofI set-up of one night; returns (spectra, rows, calibrations)."""
    stage = _Stage(timings)
    cal = sofi_calibrations(group, cfg, out, key, stage)
    cal.catalog = catalog
    spectra, rows = [], []

    def run(seq, kind, reference=None):
        try:
            return extract_sequence(seq, cal, cfg, stage, reference=reference)
        except SpecredError as exc:
            log.warning("%s", exc)
            rows.append(_row(None, seq[0].object, seq, cal, [f"FAILED: {exc}"], out, kind=kind))
            return None

    def reference_for(seq):
        """The telluric star nearest in time: where the target should be on the slit."""
        if not tells:
            return None
        t0 = min(f.mjd for f in seq)
        _, _, fs, _ = min(tells, key=lambda t: abs(t[0] - t0))
        return ReferenceBeam(fs.trace, fs.ref_offset_x, fs.info.object)

    # telluric stars: transmission of each
    tells = []
    for seq in _sequences(group.get("telluric_standard", [])):
        fs = run(seq, "telluric_standard")
        if fs is None:
            continue
        with stage("telluric"):
            try:
                trans, _ = _a0v_transmission(fs, cal)
            except (CalibrationError, SpecredError) as exc:
                log.warning("%s: %s", seq[0].object, exc)
                continue
        tells.append((min(f.mjd for f in seq), trans, fs, seq))
        safe = safe_name(seq[0].object)
        atomic_write_table(Table({"wavelength": trans.wave, "transmission": trans.trans, "variance": trans.variance},
                                 meta={"medium": trans.medium, "airmass": trans.airmass, "source": seq[0].object}),
                           out / "calibrations" / f"{cal.tag}_telluric_{safe}.ecsv")
    tell_list = [(t[0], t[1]) for t in tells]
    # flux standard: telluric-corrected with the nearest star, then the sensitivity
    with stage("fluxcal"):
        std_done, std_trans = None, None
        for seq in _sequences(group.get("flux_standard", [])):
            star = calib.find_standard(seq[0].ra, seq[0].dec, name=seq[0].object)
            if star is None or star.kind != "flux" or not star.flux_file:
                log.warning("%s is not a spectrophotometric standard known to calib/", seq[0].object)
                continue
            fs = run(seq, "flux_standard")
            if fs is None:
                continue
            std_done = (fs, star, seq)
            break
        extra = []
        if std_done is not None:
            fs, star, seq = std_done
            counts, var = fs.counts_above_slit()
            mask = fs.mask
            if tell_list:
                # a standard needs no star of its own: the one observed nearest in time
                tr = std_trans = min(tell_list, key=lambda t: abs(t[0] - fs.info.mjd))[1]
                counts, var, mask, _ = telluric.correct_telluric(fs.wave, counts, var, mask, tr,
                                                                 airmass=fs.info.airmass, medium="vacuum",
                                                                 min_transmission=cfg["telluric"]["min_transmission"])
            tab = calib.standard_flux(star.name)
            cal.sensitivity = fluxcal.sensitivity_function(
                fs.wave, counts, var, fs.info.exptime, fs.info.airmass, tab["wavelength"], tab["flux"],
                medium="vacuum", std_medium=tab.meta.get("medium", "air"), mask=mask, standard=star.name,
                smoothing=cfg["fluxcal"]["smoothing_aa"], stellar_lines="hydrogen" if cfg["fluxcal"]["mask_balmer"] else None)
            cal.standard = star.name
        elif tells:
            # no spectrophotometric standard: the A0V star's V magnitude and the Vega model
            _, trans, fs, seq = tells[0]
            star = calib.find_standard(seq[0].ra, seq[0].dec, name=seq[0].object)
            if star is None or not np.isfinite(star.vmag):
                raise CalibrationError(f"{cal.tag}: no flux standard and no telluric star of known V magnitude")
            model = calib.a0v_model()
            scale = 10 ** (-0.4 * (star.vmag - 0.03))          # Vega: V = 0.03
            counts, var = fs.counts_above_slit()
            counts, var, mask, _ = telluric.correct_telluric(fs.wave, counts, var, fs.mask, trans,
                                                             airmass=fs.info.airmass, medium="vacuum",
                                                             min_transmission=cfg["telluric"]["min_transmission"])
            cal.sensitivity = fluxcal.sensitivity_function(
                fs.wave, counts, var, fs.info.exptime, fs.info.airmass, model["wavelength"],
                np.asarray(model["flux"], float) * scale, medium="vacuum",
                std_medium=model.meta.get("medium", "vacuum"), mask=mask, standard=star.name,
                smoothing=cfg["fluxcal"]["smoothing_aa"], stellar_lines="hydrogen")
            cal.standard = f"{star.name} (A0V, V={star.vmag:.2f})"
            extra.append("FLUX_FROM_TELLURIC")
            log.warning("%s: no spectrophotometric standard; flux scale from %s", cal.tag, cal.standard)
        else:
            raise CalibrationError(f"{cal.tag}: neither a flux standard nor a telluric star to calibrate with")
        cal.flags += extra
        cal.files["sensitivity"] = f"{cal.tag}_sensitivity.ecsv"
        atomic_write_table(cal.sensitivity.to_table(), out / "calibrations" / cal.files["sensitivity"])
    if std_done is not None:
        fs = std_done[0]
        with stage("fluxcal"):
            rs = _reduce_target(fs.info.object, [fs], cal, cfg, out, "flux_standard", trans=std_trans,
                                extra_flags=[] if std_trans is not None else ["NO_TELLURIC"])
        spectra.append(rs)
        rows.append(_row(rs, rs.target, std_done[2], cal, rs.flags, out))
    for _, trans, fs, seq in tells:
        with stage("fluxcal"):
            rs = _reduce_target(fs.info.object, [fs], cal, cfg, out, "telluric_standard", trans=trans)
        spectra.append(rs)
        rows.append(_row(rs, rs.target, seq, cal, rs.flags, out))
    # science: every sequence reduced with its own telluric star; sequences of the same
    # target (matched by position to the target list, else by OBJECT) combined
    by_target: dict[str, list] = {}
    for seq in _sequences(group.get("science", [])):
        name, match = target_name(seq[0], cal)
        by_target.setdefault(name, []).append((seq, match))
    items = list(by_target.items())
    it = items if progress is None else progress(items, desc="SofI targets", unit="target")
    for name, seqs in it:
        fss, transs, tflags, raw = [], [], [], []
        for seq, _ in seqs:
            fs = run(seq, "science", reference_for(seq))
            if fs is None:
                continue
            trans, fl = _telluric_for(seq, tell_list)
            fss.append(fs)
            transs.append(trans)
            tflags += fl
            raw += seq
        if not fss:
            continue
        with stage("fluxcal"):
            rs = _reduce_target(name, fss, cal, cfg, out, "science", trans=transs,
                                extra_flags=sorted(set(tflags)), match=seqs[0][1])
        spectra.append(rs)
        rows.append(_row(rs, rs.target, raw, cal, rs.flags, out))
        log.info("%s: S/N %.1f at %.0f-%.0f Å -> %s", rs.target, rs.meta["snr"], *cfg["snr_window"], rs.path.name)
    return spectra, rows, cal
