"""The night reducer: discover -> group -> calibrations -> standards -> science -> products.

``reduce_night(raw, out)`` reduces every EFOSC2 Grism #13 and SofI blue-grism (GB) flux
standard, telluric standard and science target of a night (the SofI part in
:mod:`specred.sofi_pipeline`) and writes

* ``OUT/spectra/<target>_<INSTRUMENT>.fits`` — flux-calibrated, telluric-corrected 1D
  spectra (specutils-readable without a format argument; flux, uncertainty and mask;
  wavelengths in air for EFOSC2 (WCS ``AWAV``), in vacuum for SofI (``WAVE``), stated in
  ``WAVEMED``; provenance in the header);
* ``OUT/calibrations/`` — master bias and flat, wavelength map (Å per pixel of the
  trimmed frame, ``WAVEMED`` AIR/VACUUM), sensitivity function and telluric transmission
  (ECSV);
* ``OUT/night.ecsv`` — one row per reduced target (exposure, airmass, S/N at 6000–6200 Å
  for EFOSC2 and 12000–12200 Å for SofI, wavelength RMS, standard used, flags).

Only :mod:`specred.instruments` reads headers; the algorithms in :mod:`specred.reduce` work
on arrays.  Nothing is lost silently: a frame that cannot be reduced gets a row with the
reason in ``flags``; missing calibrations fall back to the nominal ones shipped in
``calib/`` and say so in the product's ``FLAGS`` keyword.

Flags
-----
``NO_BIAS``       fewer than ``bias.min_frames`` biases: overscan level only.
``NO_FLAT``       no dome flat: no pixel-response correction.
``NO_ARC``        no arc: nominal dispersion of ``calib/wavecal_seeds.yaml`` with the
                  night-sky zero point.
``NO_STANDARD``   no usable flux standard: nominal sensitivity from ``calib/``.
``TELLURIC_MODEL`` telluric transmission from the model in ``calib/``, not measured.
``NO_SKY_ZEROPOINT`` the sky lines were too weak to check the wavelength zero point.
``LOW_SNR``       S/N in the instrument's window below 3.
``ABBA_INCOMPLETE`` (SofI) a nod frame had no consecutive partner; paired with the
                  nearest frame of the other position.
``TELLURIC_NEAREST_AIRMASS`` (SofI) no telluric star observed right after the target;
                  the one of the night nearest in airmass was used.
``NO_TELLURIC``   (SofI) no telluric star at all: not telluric-corrected.
``FLUX_FROM_TELLURIC`` (SofI) no spectrophotometric standard: flux scale from the A0V
                  telluric star's V magnitude and the Vega model.
``SATURATED``     the object's core is saturated on some rows (masked); a flux standard
                  saturated on more than ``fluxcal.max_saturated_fraction`` of its rows is
                  not used.
``TRACE_FROM_REFERENCE`` (SofI) target too faint to trace: the telluric star's trace,
                  moved to the target's expected column, defines the aperture.
``FAILED: ...``   the frame could not be reduced (reason follows).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time as _time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table
from scipy.ndimage import gaussian_filter1d
from scipy.optimize import curve_fit

from . import __version__, calib
from .config import load_config
from .discover import discover
from .errors import CalibrationError, SpecredError
from .instruments import get_instrument
from .instruments.base import slit_width_arcsec
from .io import atomic_write_fits, atomic_write_table, safe_name, sha256
from .reduce import ccd as ccdred
from .reduce import extract as extr
from .reduce import fluxcal, skysub, telluric
from .reduce import trace as trc
from .reduce import wavecal
from .spectrum_io import write_spectrum

log = logging.getLogger(__name__)

__all__ = ["reduce_night", "NightResult", "ReducedSpectrum", "efosc2_calibrations", "extract_frame",
           "sky_zero_point", "SKY_ZERO_LINES_AIR"]

#: Isolated night-sky emission lines for the wavelength zero point (air Å; Osterbrock et al.
#: 1996, PASP 108, 277): [O I] 5577.338, 6300.304, 6363.776.
SKY_ZERO_LINES_AIR = (5577.338, 6300.304, 6363.776)


# ============================================================================ data holders
@dataclass
class Calibrations:
    """Calibrations of one instrument set-up on one night."""

    instrument: str
    setup: str
    geometry: object
    tag: str
    medium: str = "air"
    lsf_fwhm_aa: float = float("nan")
    bias: CCDData | None = None
    flat: CCDData | None = None
    bad_pixels: np.ndarray | None = None
    wavesol: object | None = None
    wavemap: np.ndarray | None = None
    sensitivity: fluxcal.Sensitivity | None = None
    transmission: telluric.Transmission | None = None
    standard: str = ""
    flags: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    catalog: object | None = None          # TargetList: science spectra named after its ids
    notes: list = field(default_factory=list)   # one-line problems met while reducing the set-up


@dataclass
class FrameSpectrum:
    """One extracted exposure (counts, before flux calibration)."""

    info: object
    header: fits.Header
    wave: np.ndarray          # air Å per row
    counts: np.ndarray        # e- per row
    var: np.ndarray           # e-^2
    mask: np.ndarray
    trace: trc.Trace
    rows: np.ndarray          # row of every pixel in the trimmed frame
    x: np.ndarray             # trace centre (trimmed-frame column) per row
    shift_px: float           # wavelength zero-point shift applied (rows)
    n_cosmics: int
    sky1d: np.ndarray
    flags: list[str] = field(default_factory=list)
    rejected: np.ndarray | None = None   # (ny, nx) cosmic-ray mask | extraction outliers
    slit_throughput: np.ndarray | None = None   # point-source slit transmission per pixel
    cutout: tuple | None = None          # (sky-subtracted 2D cut-out, first column) for the QC report

    def counts_above_slit(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts and variance corrected for the slit losses (if known)."""
        t = 1.0 if self.slit_throughput is None else self.slit_throughput
        return self.counts / t, self.var / t**2


@dataclass
class ReducedSpectrum:
    """A final product: a flux-calibrated spectrum of one target."""

    target: str
    instrument: str
    path: Path | None
    wave: np.ndarray
    flux: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray
    frames: list[FrameSpectrum]
    flags: list[str]
    meta: dict


@dataclass
class NightResult:
    out: Path
    spectra: list[ReducedSpectrum]
    table: Table
    calibrations: list[Calibrations]
    problems: list[str]
    timings: dict


# ============================================================================ helpers
def _read_raw(info) -> tuple[np.ndarray, fits.Header]:
    try:
        with fits.open(info.path, memmap=False) as hdul:
            return np.asarray(hdul[0].data, dtype=np.float32), hdul[0].header
    except (OSError, ValueError, TypeError) as exc:
        raise SpecredError(f"{Path(info.path).name}: cannot read the data ({exc})") from exc


def _provenance(header: fits.Header, inputs, calibs: dict, params: dict) -> None:
    header["SPECRED"] = (__version__, "specred version")
    for i, p in enumerate(inputs, 1):
        header[f"PROV{i}"] = (Path(p).name, "input raw file")
        header[f"PROVSH{i}"] = (sha256(p)[:32], "sha256 of input (32 hex)")
    for k, v in calibs.items():
        header[f"HIERARCH SPECRED CAL {k.upper()}"] = str(v)[:50]
    header["HIERARCH SPECRED PARAMS"] = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


class _Stage:
    """Accumulates wall time per reduction stage."""

    def __init__(self, timings: dict):
        self.timings = timings

    def __call__(self, name):
        stage = self

        class _T:
            def __enter__(self):
                self.t0 = _time.perf_counter()

            def __exit__(self, *exc):
                stage.timings[name] = stage.timings.get(name, 0.0) + _time.perf_counter() - self.t0
        return _T()


class NominalSolution:
    """Wavelength 'solution' from the nominal dispersion of a seed, for nights without arcs.

    ``wavelength(y, x)`` = seed λ(raw row) with no tilt; ``rms_px``/``rms_aa`` are NaN.
    """

    def __init__(self, seed, shape, row_offset: int):
        self.seed, self.shape, self.row_offset = seed, shape, row_offset
        self.rms_px = self.rms_aa = float("nan")
        self.n_lines = 0

    def wavelength(self, y, x=None):
        return np.asarray(self.seed.wavelength(np.asarray(y, float) + self.row_offset), float)

    def map(self):
        ny, nx = self.shape
        return np.repeat(self.wavelength(np.arange(ny))[:, None], nx, axis=1)


def _write_wavemap(sol, wavemap: np.ndarray, path: Path) -> Path:
    hdr = fits.Header()
    hdr["BUNIT"] = ("Angstrom", "wavelength of every pixel")
    hdr["WAVEMED"] = (getattr(sol, "medium", "air").upper(), "wavelength medium")
    hdr["WAVERMS"] = (round(float(sol.rms_px), 4) if np.isfinite(sol.rms_px) else -1.0, "arc fit RMS (pixels)")
    hdr["WAVERMSA"] = (round(float(sol.rms_aa), 4) if np.isfinite(sol.rms_aa) else -1.0, "arc fit RMS (Angstrom)")
    hdr["WAVENLIN"] = (int(sol.n_lines), "arc lines used")
    hdus = fits.HDUList([fits.PrimaryHDU(wavemap.astype(np.float64), header=hdr)])
    lines = getattr(sol, "lines", None)
    if lines is not None and len(lines):
        lt = lines.copy()
        lt.meta = {}
        if "residual" in lt.colnames and "residual_aa" not in lt.colnames:
            lt["residual_aa"] = lt["residual"]
        hdus.append(fits.table_to_hdu(lt))
        hdus[-1].name = "LINES"
    return atomic_write_fits(hdus, path)


def store_flat(cal: Calibrations, flat: CCDData, caldir: Path) -> None:
    """Adopt a normalised master flat: bad pixels where its response is < 0.5 or > 1.5,
    written with them to ``calibrations/<tag>_flat.fits``."""
    cal.flat = flat
    cal.bad_pixels = (flat.data < 0.5) | (flat.data > 1.5)
    cal.files["flat"] = f"{cal.tag}_flat.fits"
    atomic_write_fits(fits.HDUList([fits.PrimaryHDU(flat.data),
                                    fits.ImageHDU(cal.bad_pixels.astype(np.uint8), name="BADPIX")]),
                      caldir / cal.files["flat"])


def solve_setup_arcs(cal: Calibrations, seed, arc_images: list, arcs: list, caldir: Path, sky: str) -> None:
    """Wavelength solution of a set-up from its processed arc images (median-combined; pixels
    saturated in any of them masked), or the seed's nominal dispersion (flag ``NO_ARC``) when
    there are none; the wavelength map is written to ``calibrations/<tag>_wavemap.fits``.
    A failed solution raises CalibrationError naming the arc files."""
    row0 = cal.geometry.trim_section[0].start or 0
    if arc_images:
        arc = np.median(np.stack([i.data for i in arc_images]), axis=0)
        sat = np.any(np.stack([i.mask for i in arc_images]), axis=0)
        cal.wavesol = wavecal.solve_arc(arc, calib.arc_lines(seed.lamp), seed, mask=sat, row_offset=row0,
                                        name=", ".join(Path(a.path).name for a in arcs))
        log.info("%s: wavelength solution RMS %.3f px (%.2f Å, %s) from %d lines", cal.tag, cal.wavesol.rms_px,
                 cal.wavesol.rms_aa, seed.medium, cal.wavesol.n_lines)
    else:
        cal.flags.append("NO_ARC")
        log.warning("%s: no arc frames; nominal dispersion + %s zero point", cal.tag, sky)
        cal.wavesol = NominalSolution(seed, cal.geometry.trim_shape, row0)
    cal.wavemap = cal.wavesol.map()
    cal.files["wavemap"] = f"{cal.tag}_wavemap.fits"
    _write_wavemap(cal.wavesol, cal.wavemap, caldir / cal.files["wavemap"])


def new_calibrations(key: tuple, group: dict, medium: str) -> Calibrations:
    """Empty calibrations of the set-up ``key = (instrument, night, setup)``: detector
    geometry from the header of one of its frames, and the tag that names its products
    (``<INSTRUMENT>_<night>_<grism>``)."""
    inst = key[0]
    frames = [f for kind in ("science", "flux_standard", "telluric_standard", "arc", "flat", "bias")
              for f in group.get(kind, [])]
    geom = get_instrument(inst).geometry(fits.getheader(frames[0].path))
    tag = f"{inst}_{key[1]}_" + safe_name(key[2].split("/")[0], keep="")
    return Calibrations(inst, key[2], geom, tag, medium=medium)


# ============================================================================ EFOSC2 calibrations
def efosc2_calibrations(group: dict, cfg: dict, out: Path, key: tuple, stage=None) -> Calibrations:
    """Master bias, flat and wavelength solution of one EFOSC2 set-up of a night."""
    stage = stage or _Stage({})
    cal = new_calibrations(key, group, "air")
    geom, tag = cal.geometry, cal.tag
    caldir = out / "calibrations"

    with stage("bias"):
        biases = group.get("bias", [])
        if len(biases) >= cfg["bias"]["min_frames"]:
            cal.bias = ccdred.master_bias([_read_raw(b)[0] for b in biases], geom, method=cfg["bias"]["method"])
            cal.files["bias"] = f"{tag}_bias.fits"
            atomic_write_fits(fits.HDUList([fits.PrimaryHDU(cal.bias.data),
                                            fits.ImageHDU(cal.bias.uncertainty.array, name="VARIANCE")]),
                              caldir / cal.files["bias"])
        else:
            cal.flags.append("NO_BIAS")
            log.warning("%s: %d bias frame(s), fewer than %d: overscan level only", tag, len(biases),
                        cfg["bias"]["min_frames"])

    with stage("flat"):
        flats = group.get("flat", [])
        if flats:
            ccds = [ccdred.process_frame(_read_raw(f)[0], geom, master_bias=cal.bias) for f in flats]
            flat, _ = ccdred.master_flat(ccds, spectral_smooth=cfg["flat"]["spectral_smooth"],
                                         min_level=cfg["flat"]["min_level"])
            store_flat(cal, flat, caldir)
        else:
            cal.flags.append("NO_FLAT")
            log.warning("%s: no dome flat; pixel response not corrected", tag)

    with stage("wavecal"):
        arcs = group.get("arc", [])
        imgs = [ccdred.process_frame(_read_raw(a)[0], geom, master_bias=cal.bias) for a in arcs]
        solve_setup_arcs(cal, wavecal.load_seed("EFOSC2_GR13"), imgs, arcs, caldir, "night-sky")
    return cal


# ============================================================================ one frame
def _gauss_lin(x, a, mu, sig, c0, c1):
    return a * np.exp(-0.5 * ((x - mu) / sig) ** 2) + c0 + c1 * (x - mu)


def sky_zero_point(rows: np.ndarray, wave: np.ndarray, sky1d: np.ndarray, lines=SKY_ZERO_LINES_AIR,
                   fwhm_px: float = 3.0, min_snr: float = 10.0) -> float | None:
    """Zero-point offset (rows) of a spectrum's wavelength scale from night-sky lines.

    Each line is fitted with a Gaussian plus a straight line in a ±3 FWHM window of the sky
    spectrum along the trace; the offset is the median over the lines of (measured row −
    row where the current solution puts the line's laboratory wavelength).  A positive
    value means the lines sit at larger rows than predicted, i.e. the corrected wavelength
    is ``λ(row − offset)``.  Returns None when no line is measured with S/N ≥ ``min_snr``.
    """
    order = np.argsort(wave)
    offs, wts = [], []
    hw = int(np.ceil(3 * fwhm_px))
    for lam in lines:
        if not wave.min() + 10 < lam < wave.max() - 10:
            continue
        yp = float(np.interp(lam, wave[order], rows[order]))
        i0 = int(round(yp))
        sl = slice(max(i0 - hw, 0), min(i0 + hw + 1, len(rows)))
        x, s = rows[sl].astype(float), sky1d[sl]
        good = np.isfinite(s)
        if good.sum() < 7:
            continue
        x, s = x[good], s[good]
        base = np.median(np.r_[s[:2], s[-2:]])
        amp = float(s.max() - base)
        noise = float(np.std(np.diff(np.r_[s[:3], s[-3:]]))) / np.sqrt(2) + 1e-12
        if amp < min_snr * noise:
            continue
        try:
            p, cov = curve_fit(_gauss_lin, x, s, p0=[amp, x[np.argmax(s)], fwhm_px / 2.355, base, 0.0],
                               maxfev=2000)
        except (RuntimeError, ValueError):
            continue
        if not (abs(p[1] - yp) < hw and 0.3 < abs(p[2]) < 3 * fwhm_px) or not np.isfinite(cov[1, 1]):
            continue
        offs.append(p[1] - yp)
        wts.append(p[0])
    if not offs:
        return None
    return float(np.median(offs))


def sky_shift_xcorr(rows: np.ndarray, wave: np.ndarray, sky1d: np.ndarray, line_wave, line_flux,
                    fwhm_aa: float, max_shift: float = 5.0, step: float = 0.05) -> float | None:
    """Zero-point offset (rows) from the cross-correlation of a sky spectrum with a model of
    its emission lines (e.g. the near-IR OH forest, where few lines are isolated).

    The model is the line list convolved with a Gaussian of ``fwhm_aa``; both spectra are
    high-pass filtered (running median of 4 FWHM removed) and the normalised
    cross-correlation is maximised over shifts ``s`` of ``model(λ(row − s))``, refined by a
    parabola.  Same sign convention as :func:`sky_zero_point`.  None when the peak is at
    the edge of the search or the correlation is below 0.3.
    """
    from scipy.ndimage import median_filter

    good = np.isfinite(sky1d) & np.isfinite(wave)
    if good.sum() < 50:
        return None
    lw = np.asarray(line_wave, float)
    lf = np.asarray(line_flux, float)
    disp = float(np.median(np.abs(np.diff(wave))))
    fine = np.arange(np.nanmin(wave) - 10 * fwhm_aa, np.nanmax(wave) + 10 * fwhm_aa, disp / 10)
    model = np.zeros_like(fine)
    sel = (lw > fine[0]) & (lw < fine[-1])
    idx = np.clip(np.searchsorted(fine, lw[sel]), 0, len(fine) - 1)
    np.add.at(model, idx, lf[sel])
    model = gaussian_filter1d(model, fwhm_aa / 2.3548 / (disp / 10))
    width = int(4 * fwhm_aa / disp) | 1
    model = model - median_filter(model, 10 * width, mode="nearest")       # same high-pass, fine grid
    obs = np.where(good, sky1d, np.nanmedian(sky1d))
    obs = obs - median_filter(obs, width, mode="nearest")
    a = obs[good] - obs[good].mean()
    shifts = np.arange(-max_shift, max_shift + step / 2, step)
    cc = np.empty(len(shifts))
    for k, sft in enumerate(shifts):
        m = np.interp(np.interp(rows - sft, rows, wave), fine, model)[good]
        b = m - m.mean()
        cc[k] = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b) + 1e-300)
    k = int(np.argmax(cc))
    if k == 0 or k == len(cc) - 1 or cc[k] < 0.3:
        return None
    den = cc[k - 1] - 2 * cc[k] + cc[k + 1]
    frac = 0.5 * (cc[k - 1] - cc[k + 1]) / den if den < 0 else 0.0
    return float(shifts[k] + frac * step)


def extract_frame(info, cal: Calibrations, cfg: dict, *, expected_x: float | None = None,
                  stage=None) -> FrameSpectrum:
    """Bias, cosmics, flat, trace, sky, extraction and wavelengths of one EFOSC2 frame.

    Returns the spectrum in electrons per row with variance, its air wavelengths (after
    the night-sky zero-point correction) and the trace.
    """
    stage = stage or _Stage({})
    geom = cal.geometry
    name = Path(info.path).name
    flags: list[str] = []
    with stage("ccd"):
        raw, hdr = _read_raw(info)
        if raw.shape != geom.shape:
            raise SpecredError(f"{name}: image shape {raw.shape} differs from the set-up's {geom.shape}")
        img = ccdred.process_frame(raw, geom, master_bias=cal.bias, bad_pixels=cal.bad_pixels)
        saturated = (raw >= geom.saturation)[geom.trim_section]
    n_cr = 0
    crmask = np.zeros(geom.trim_shape, bool)
    if cfg["cosmics"]["enabled"]:
        with stage("cosmics"):
            c = cfg["cosmics"]
            crmask = ccdred.detect_cosmics(img, read_noise=geom.read_noise, sigclip=c["sigclip"], objlim=c["objlim"],
                                           sigfrac=c["sigfrac"], niter=c["niter"],
                                           satlevel=geom.saturation * geom.gain)
            n_cr = int(crmask.sum())
            img.mask = img.mask | crmask
    with stage("ccd"):
        if cal.flat is not None:
            img = ccdred.apply_flat(img, cal.flat)
        data, var, mask = img.data.astype(float), img.uncertainty.array.astype(float), img.mask
    with stage("trace"):
        t = cfg["trace"]
        cands = trc.find_objects(data, var, mask, min_snr=t["min_snr"])
        ex = expected_x if expected_x is not None else t["expected_x"]
        pick = trc.choose_object(cands, expected_x=ex)
        if pick is None:
            raise SpecredError(f"{name}: no object found along the slit (no peak above S/N {t['min_snr']})")
        tr = trc.fit_trace(data, var, mask, pick[0], order=t["order"], bin_rows=t["bin_rows"])
    with stage("sky"):
        s = cfg["sky"]
        excl = skysub.object_mask(data.shape, tr, s["object_half_width_fwhm"] * tr.fwhm)
        sky, sky_var = skysub.fit_sky(data, var, mask, excl, order=s["order"],
                                      wavemap=cal.wavemap if s["method"] == "wavelength" else None)
    rows = np.arange(data.shape[0])
    xs = tr.x(rows)
    xi = np.clip(np.round(xs).astype(int), 0, data.shape[1] - 1)
    sky1d = sky[rows, xi]
    wave = cal.wavesol.wavelength(rows.astype(float), xs)
    shift = 0.0
    if cfg["wavecal"]["flexure_from_sky"]:
        off = sky_zero_point(rows, wave, sky1d)
        if off is None:
            flags.append("NO_SKY_ZEROPOINT")
            log.info("%s: night-sky lines too weak for a zero-point check", name)
        elif abs(off) > cfg["wavecal"]["max_flexure_px"]:
            flags.append("SKY_ZEROPOINT_REJECTED")
            log.warning("%s: sky-line zero point %.2f px exceeds %.1f px; not applied", name, off,
                        cfg["wavecal"]["max_flexure_px"])
        else:
            shift = off
            wave = cal.wavesol.wavelength(rows - shift, xs)
    with stage("extract"):
        e = cfg["extract"]
        half = e["half_width_fwhm"] * tr.fwhm
        if e["method"] == "optimal":
            res = extr.optimal_extract(data - sky, var, mask, tr, half_width=half, read_noise=geom.read_noise,
                                       sky=sky, nsigma=e["nsigma"], sky_variance=sky_var)
        else:
            res = extr.boxcar_extract(data - sky, var, mask, tr, half, sky_variance=sky_var)
    rejected = crmask if res.rejected is None else crmask | res.rejected
    # rows where the object's core is saturated: the optimal extraction would rebuild them
    # from the profile wings only; they are masked, and flagged
    core = np.abs(np.arange(data.shape[1])[None, :] - xs[:, None]) <= tr.fwhm
    sat_rows = np.any(saturated & core, axis=1)
    if sat_rows.any():
        flags.append("SATURATED")
        log.warning("%s: saturated in the object's core on %d of %d rows (%.0f %%); those rows are masked",
                    name, int(sat_rows.sum()), len(sat_rows), 100.0 * sat_rows.mean())
    thru = None
    slit = slit_width_arcsec(info.slit)
    if cfg["fluxcal"]["slit_loss"] and slit:
        ref = float(np.interp(0.5 * (tr.y_fit[0] + tr.y_fit[1]), rows, wave)) if tr.y_fit else float(np.median(wave))
        thru = fluxcal.slit_throughput(wave, tr.fwhm * geom.pixel_scale, slit, ref)
    fs = FrameSpectrum(info, hdr, wave, res.flux, res.variance, res.mask | ~np.isfinite(res.flux) | sat_rows, tr,
                       rows, xs, shift, n_cr, sky1d, flags, rejected, thru, make_cutout(data - sky, mask | rejected, xs))
    fs.saturated_fraction = float(sat_rows.mean())
    return fs


def make_cutout(resid: np.ndarray, mask: np.ndarray, xs: np.ndarray, half: int = 30) -> tuple:
    """The sky-subtracted frame within ``half`` columns of the trace (masked pixels NaN), as
    float32, and its first column: the 2D view of the report."""
    x0 = int(np.clip(np.round(np.nanmedian(xs)) - half, 0, max(resid.shape[1] - 2 * half - 1, 0)))
    cut = np.where(mask, np.nan, resid)[:, x0:x0 + 2 * half + 1].astype(np.float32)
    return cut, x0


def _write_cutout(rs: "ReducedSpectrum", fs: FrameSpectrum, out: Path, stem: str, medium: str) -> None:
    cut, x0 = fs.cutout
    h = fits.Header()
    h["OBJECT"] = rs.target
    h["INSTRUME"] = rs.instrument
    h["X0"] = (int(x0), "first column in the trimmed frame")
    h["WAVEMED"] = (medium.upper(), "medium of the WAVE extension")
    h["BUNIT"] = ("electron", "sky-subtracted counts")
    wave = fits.ImageHDU(np.asarray(fs.wave, np.float64), name="WAVE")
    wave.header["BUNIT"] = "Angstrom"
    trace = fits.ImageHDU(np.asarray(fs.x - x0, np.float64), name="TRACE")
    atomic_write_fits(fits.HDUList([fits.PrimaryHDU(cut, header=h), wave, trace]), out / "qc" / f"{stem}_2d.fits")


# ============================================================================ standards
def _model_transmission(fwhm_aa: float) -> telluric.Transmission:
    """Telluric model of ``calib/`` at airmass 1 convolved to the spectral resolution."""
    w = np.arange(3500.0, 9600.0, 1.0)
    t = calib.telluric_transmission(w, airmass=1.0, medium="air")
    t = gaussian_filter1d(t, fwhm_aa / 2.3548)
    bands = [(b[0], b[1], b[2]) for b in fluxcal.telluric_band_list("air")]
    return telluric.Transmission(w, t, np.zeros_like(t), "air", 1.0, bands, "model", {"method": "model"})


def _nominal_sensitivity(gain: float) -> fluxcal.Sensitivity:
    """Nominal EFOSC2 Gr#13 sensitivity (ADU based in ``calib/``) converted to electrons."""
    t = calib.nominal_sensitivity("EFOSC2_GR13")
    w = np.asarray(t["wavelength"], float)
    s = np.asarray(t["sensitivity"], float) + 2.5 * np.log10(gain)
    return fluxcal.Sensitivity(w, s, t.meta.get("medium", "air"), "nominal", float("nan"), float("nan"), Table(),
                               (float(w[0]), float(w[-1])), "nominal")


def calibrate_with_standards(cal: Calibrations, std_frames: list[FrameSpectrum], cfg: dict) -> None:
    """Sensitivity and telluric transmission from the night's best flux standard.

    Falls back to the nominal sensitivity and the model transmission (with flags) when the
    night has no recognised, usable standard.
    """
    best = None
    for fs in std_frames:
        info = fs.info
        star = calib.find_standard(info.ra, info.dec, name=info.object)
        if star is None or star.kind != "flux" or not star.flux_file:
            log.warning("%s: %s is not a spectrophotometric standard known to calib/", Path(info.path).name,
                        info.object)
            continue
        limit = cfg["fluxcal"]["max_saturated_fraction"]
        if getattr(fs, "saturated_fraction", 0.0) > limit:
            msg = (f"{Path(info.path).name}: standard {info.object} saturated on "
                   f"{100 * fs.saturated_fraction:.0f} % of its rows (> {100 * limit:.0f} %); not used for the "
                   f"sensitivity")
            log.warning("%s", msg)
            cal.notes.append(msg)
            continue
        good = ~fs.mask
        snr = float(np.nanmedian(fs.counts[good] / np.sqrt(fs.var[good]))) if good.any() else 0.0
        if best is None or snr > best[2]:
            best = (fs, star, snr)
    if best is None:
        cal.flags += ["NO_STANDARD", "TELLURIC_MODEL"]
        log.warning("%s: no usable flux standard; nominal sensitivity and model telluric absorption", cal.tag)
        cal.sensitivity = _nominal_sensitivity(cal.geometry.gain)
        cal.transmission = _model_transmission(16.0)
        cal.standard = "nominal"
        return
    fs, star, _ = best
    tab = calib.standard_flux(star.name)
    f = cfg["fluxcal"]
    counts, var = fs.counts_above_slit()
    cal.sensitivity = fluxcal.sensitivity_function(
        fs.wave, counts, var, fs.info.exptime, fs.info.airmass, tab["wavelength"], tab["flux"],
        medium="air", std_medium=tab.meta.get("medium", "air"), mask=fs.mask, standard=star.name,
        smoothing=f["smoothing_aa"], stellar_lines="hydrogen" if f["mask_balmer"] else None)
    cal.standard = star.name
    log.info("%s: sensitivity from %s (X = %.3f), RMS %.3f mag", cal.tag, star.name, fs.info.airmass,
             cal.sensitivity.rms_mag)
    if cfg["telluric"]["enabled"]:
        cal.transmission = telluric.transmission_from_standard(fs.wave, fs.counts, fs.var, medium="air",
                                                               airmass=fs.info.airmass, mask=fs.mask)


# ============================================================================ science
def _snr(wave, flux, sigma, mask, window) -> float:
    sel = (wave >= window[0]) & (wave <= window[1]) & ~mask & np.isfinite(flux) & (sigma > 0)
    if sel.sum() < 5:
        return float("nan")
    return float(np.median(flux[sel] / sigma[sel]))


def calibrate_frame(fs: FrameSpectrum, cal: Calibrations, cfg: dict, trans=None):
    """Flux calibration and telluric correction of one extracted frame.

    ``trans`` (default ``cal.transmission``) is the telluric transmission to divide by.
    Returns (flux, variance, mask, telluric_flag) with f_λ in erg s⁻¹ cm⁻² Å⁻¹.
    """
    trans = cal.transmission if trans is None else trans
    counts, var = fs.counts_above_slit()
    flux, fvar, mask = fluxcal.flux_calibrate(fs.wave, counts, var, fs.info.exptime, fs.info.airmass,
                                              cal.sensitivity, medium=cal.medium, mask=fs.mask)
    corrected = np.zeros(flux.shape, bool)
    if cfg["telluric"]["enabled"] and trans is not None:
        shift = 0.0
        if trans.source == "standard":
            try:
                shift = telluric.cross_correlation_shift(fs.wave, np.where(mask, np.nan, flux), trans,
                                                         medium=cal.medium)
            except (SpecredError, ValueError):
                shift = 0.0
        flux, fvar, mask, corrected = telluric.correct_telluric(
            fs.wave, flux, fvar, mask, trans, airmass=fs.info.airmass, shift_px=shift,
            min_transmission=cfg["telluric"]["min_transmission"], medium=cal.medium,
            exponent=cfg["telluric"]["airmass_exponent"])
    return flux, fvar, mask, corrected


def _combine(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
    """Inverse-variance weighted mean of spectra on the first spectrum's wavelengths."""
    w0 = parts[0][0]
    num = np.zeros_like(w0)
    den = np.zeros_like(w0)
    for w, f, v, m in parts:
        fi = np.interp(w0, w, np.where(m, 0.0, f))
        vi = np.interp(w0, w, np.where(m, np.inf, v))
        mi = (np.interp(w0, w, m.astype(float)) > 0) | ~np.isfinite(vi) | (vi <= 0)
        wt = np.where(mi, 0.0, 1.0 / np.where(mi, 1.0, vi))
        num += wt * fi
        den += wt
    ok = den > 0
    flux = np.where(ok, num / np.where(ok, den, 1.0), np.nan)
    var = np.where(ok, 1.0 / np.where(ok, den, 1.0), np.nan)
    return w0, flux, var, ~ok


def _product_header(frames: list[FrameSpectrum], cal: Calibrations, flags: list[str], snr: float,
                    cfg: dict) -> fits.Header:
    h0 = frames[0].header
    info = frames[0].info
    h = fits.Header()
    for k in ("OBJECT", "RA", "DEC", "EQUINOX", "DATE-OBS", "MJD-OBS", "INSTRUME", "TELESCOP"):
        if k in h0:
            h[k] = (h0[k], h0.comments[k])
    h["GRISM"] = (info.grism or "", "grism")
    h["FILTER"] = (info.filter or "", "filter")
    h["SLIT"] = (info.slit or "", "slit")
    h["EXPTIME"] = (float(sum(getattr(f, "total_exptime", f.info.exptime) for f in frames)),
                    "total exposure time (s)")
    raw = [i for f in frames for i in getattr(f, "raw_infos", [f.info])]
    h["NCOMBINE"] = (len(raw), "raw exposures combined")
    h["AIRMASS"] = (round(float(np.mean([f.info.airmass for f in frames])), 4), "mean airmass")
    h["WAVERMS"] = (float(np.round(cal.wavesol.rms_px, 4)) if np.isfinite(cal.wavesol.rms_px) else -1.0,
                    "arc solution RMS (pixels)")
    h["WAVERMSA"] = (float(np.round(cal.wavesol.rms_aa, 4)) if np.isfinite(cal.wavesol.rms_aa) else -1.0,
                     "arc solution RMS (Angstrom)")
    h["SKYSHIFT"] = (round(float(np.mean([f.shift_px for f in frames])), 3), "sky-line zero-point shift (pix)")
    h["STANDARD"] = (cal.standard, "flux standard used")
    h["SENSRMS"] = (float(np.round(cal.sensitivity.rms_mag, 4)) if np.isfinite(cal.sensitivity.rms_mag) else -1.0,
                    "sensitivity fit RMS (mag)")
    h["SNR"] = (round(float(snr), 2) if np.isfinite(snr) else -1.0,
                "median S/N per pixel {:.0f}-{:.0f} A".format(*cfg["snr_window"]))
    h["EXTRACT"] = (cfg["extract"]["method"], "extraction method")
    thr = [np.median(f.slit_throughput) for f in frames if f.slit_throughput is not None]
    h["SLITTHRU"] = (round(float(np.mean(thr)), 4) if thr else -1.0,
                     "slit transmission corrected (-1 none)")
    h["FLAGS"] = (",".join(flags) or "OK", "reduction flags")
    h["HIERARCH SPECRED MASK"] = "True = bad or no data"
    _provenance(h, [i.path for i in raw], cal.files, cfg)
    return h


def target_name(info, cal: Calibrations):
    """(name, match): the catalogue id of the target list entry nearest the pointing (within
    its radius) or, unmatched, the OBJECT keyword."""
    m = cal.catalog.match(info.ra, info.dec) if cal.catalog is not None else None
    return (m.id if m else info.object), m


def _reduce_target(target: str, frames: list[FrameSpectrum], cal: Calibrations, cfg: dict, out: Path,
                   kind: str, trans=None, extra_flags=(), match=None) -> ReducedSpectrum:
    """Flux-calibrate, telluric-correct and combine the frames of one target; write the product.

    ``trans``: one telluric transmission for all frames, or a list (one per frame)."""
    parts = []
    tell_any = np.zeros(0, bool)
    transs = trans if isinstance(trans, list) else [trans] * len(frames)
    for fs, tr in zip(frames, transs):
        f, v, m, corr = calibrate_frame(fs, cal, cfg, tr)
        parts.append((fs.wave, f, v, m))
        tell_any = corr if tell_any.size == 0 else tell_any
    wave, flux, var, mask = parts[0] if len(parts) == 1 else _combine(parts)
    if wave[0] > wave[-1]:       # products always have increasing wavelengths
        wave, flux, var, mask, tell_any = (a[::-1] for a in (wave, flux, var, mask, tell_any))
    sigma = np.sqrt(np.where(np.isfinite(var) & (var > 0), var, np.nan))
    mask = mask | ~np.isfinite(flux) | ~np.isfinite(sigma)
    flux = np.where(mask, np.nan, flux)
    sigma = np.where(mask, np.nan, sigma)
    flags = sorted(set(cal.flags + list(extra_flags) + [fl for fs in frames for fl in fs.flags]))
    snr = _snr(wave, flux, sigma, mask, cfg["snr_window"])
    if not np.isfinite(snr) or snr < 3:
        flags.append("LOW_SNR")
    hdr = _product_header(frames, cal, flags, snr, cfg)
    hdr["HIERARCH SPECRED KIND"] = kind
    hdr["HIERARCH SPECRED TELLURIC"] = (int(np.sum(tell_any)), "pixels corrected")
    if match is not None:
        hdr["HIERARCH SPECRED CATID"] = (match.id, "target-list id")
        hdr["HIERARCH SPECRED CATSEP"] = (round(match.sep_arcsec, 2), "[arcsec] from list")
        if np.isfinite(match.z):
            hdr["HIERARCH SPECRED ZCAT"] = (match.z, "list redshift")
    safe = safe_name(target)
    path = write_spectrum(out / "spectra" / f"{safe}_{cal.instrument}.fits", wave, flux, sigma, mask,
                          medium=cal.medium, header=hdr)
    if frames[0].cutout is not None:
        _write_cutout(ReducedSpectrum(target, cal.instrument, path, wave, flux, sigma, mask, [], [], {}), frames[0],
                      out, f"{safe}_{cal.instrument}", cal.medium)
    return ReducedSpectrum(target, cal.instrument, path, wave, flux, sigma, mask, frames, flags,
                           {"snr": snr, "kind": kind, "telluric_corrected": tell_any,
                            "snr_window": tuple(cfg["snr_window"]), "match": match})


def _row(rs: ReducedSpectrum | None, target: str, frames, cal: Calibrations | None, flags, out: Path,
         kind: str = "") -> dict:
    infos = [f.info if isinstance(f, FrameSpectrum) else f for f in frames]
    return {
        "target": target, "instrument": infos[0].instrument if infos else "", "kind": rs.meta["kind"] if rs else kind,
        "file": str(rs.path.relative_to(out)) if rs else "",
        "raw_files": ",".join(Path(i.path).name for i in infos),
        "date_obs": infos[0].date_obs if infos else "",
        "exptime": float(sum(i.exptime * (i.ndit or 1 if i.instrument == "SOFI" else 1) for i in infos)),
        "airmass": float(np.mean([i.airmass for i in infos if i.airmass])) if infos else np.nan,
        "snr": rs.meta["snr"] if rs else np.nan,
        "snr_window": "{:.0f}-{:.0f}".format(*rs.meta["snr_window"]) if rs else "",
        "wave_rms_px": float(cal.wavesol.rms_px) if cal and cal.wavesol else np.nan,
        "wave_rms_aa": float(cal.wavesol.rms_aa) if cal and cal.wavesol else np.nan,
        "sky_shift_px": float(np.mean([f.shift_px for f in rs.frames])) if rs else np.nan,
        "n_cosmics": int(sum(f.n_cosmics for f in rs.frames)) if rs else 0,
        "standard": cal.standard if cal else "",
        "flags": ",".join(flags) or "OK",
        "match_id": m.id if (m := (rs.meta.get("match") if rs else None)) else "",
        "match_sep_arcsec": m.sep_arcsec if m else np.nan,
        "z_cat": m.z if m else np.nan,
    }


def reduce_efosc2_setup(key, group: dict, cfg: dict, out: Path, timings: dict, progress=None, catalog=None):
    """Reduce one EFOSC2 Gr#13 set-up of one night; returns (spectra, rows, calibrations)."""
    stage = _Stage(timings)
    cal = efosc2_calibrations(group, cfg, out, key, stage)
    cal.catalog = catalog
    spectra, rows = [], []
    # flux standards first: they calibrate the science
    std_frames = []
    for info in group.get("flux_standard", []):
        try:
            std_frames.append(extract_frame(info, cal, cfg, stage=stage))
        except SpecredError as exc:
            log.warning("%s", exc)
            rows.append(_row(None, info.object, [info], cal, [f"FAILED: {exc}"], out, kind="flux_standard"))
    with stage("fluxcal"):
        calibrate_with_standards(cal, std_frames, cfg)
        caldir = out / "calibrations"
        cal.files["sensitivity"] = f"{cal.tag}_sensitivity.ecsv"
        atomic_write_table(cal.sensitivity.to_table(), caldir / cal.files["sensitivity"])
        if cal.transmission is not None:
            tt = Table({"wavelength": cal.transmission.wave, "transmission": cal.transmission.trans,
                        "variance": cal.transmission.variance},
                       meta={"medium": cal.transmission.medium, "airmass": cal.transmission.airmass,
                             "source": cal.transmission.source})
            cal.files["telluric"] = f"{cal.tag}_telluric.ecsv"
            atomic_write_table(tt, caldir / cal.files["telluric"])
    for fs in std_frames:
        with stage("fluxcal"):
            rs = _reduce_target(fs.info.object, [fs], cal, cfg, out, "flux_standard")
        spectra.append(rs)
        rows.append(_row(rs, rs.target, rs.frames, cal, rs.flags, out))
    by_target: dict[str, list] = {}
    matches = {}
    for info in group.get("science", []):           # repeated exposures of a target combine
        name, matches[info.path] = target_name(info, cal)
        by_target.setdefault(name, []).append(info)
    items = list(by_target.items())
    it = items if progress is None else progress(items, desc="EFOSC2 targets", unit="target")
    for target, infos in it:
        frames = []
        for info in infos:
            try:
                frames.append(extract_frame(info, cal, cfg, stage=stage))
            except SpecredError as exc:
                log.warning("%s", exc)
                rows.append(_row(None, target, [info], cal, [f"FAILED: {exc}"], out, kind="science"))
        if not frames:
            continue
        with stage("fluxcal"):
            rs = _reduce_target(target, frames, cal, cfg, out, "science", match=matches[infos[0].path])
        spectra.append(rs)
        rows.append(_row(rs, target, frames, cal, rs.flags, out))
        log.info("%s: S/N %.1f at 6000-6200 Å -> %s", target, rs.meta["snr"], rs.path.name)
    return spectra, rows, cal


NIGHT_COLUMNS = ("target", "instrument", "kind", "file", "raw_files", "date_obs", "exptime", "airmass",
                 "snr", "snr_window", "wave_rms_px", "wave_rms_aa", "sky_shift_px", "n_cosmics", "standard", "flags",
                 "match_id", "match_sep_arcsec", "z_cat")


def _setup_state(key, group: dict, cfg: dict, catalog) -> str:
    """Fingerprint of everything a set-up's products depend on: specred version, parameters,
    target list and the content (sha256) of every input frame."""
    files = sorted({(Path(f.path).name, sha256(f.path)) for fr in group.values() for f in fr})
    blob = json.dumps({"version": __version__, "key": list(key), "cfg": cfg, "files": files,
                       "targets": catalog.fingerprint() if catalog is not None else None}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _state_path(out: Path, key) -> Path:
    name = "_".join(safe_name(k, keep="") for k in key)
    return out / ".specred" / f"{name}.json"


def _reuse(out: Path, key, state: str):
    """Rows and spectra of a set-up whose products are up to date, or None.

    Up to date: the state file written after the set-up's last product has the same
    fingerprint, and every product it lists exists with the recorded checksum."""
    p = _state_path(out, key)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("state") != state:
        return None
    for rel, digest in rec.get("products", {}).items():
        f = out / rel
        if not f.exists() or sha256(f) != digest:
            return None
    from .spectrum_io import read_spectrum

    spectra = []
    for r in rec["rows"]:
        if not r["file"]:
            continue
        spec, medium = read_spectrum(out / r["file"])
        flux = np.asarray(spec.flux.value, float)
        sig = np.asarray(spec.uncertainty.array, float) if spec.uncertainty is not None else np.full(flux.size, np.nan)
        lo, hi = (float(v) for v in r["snr_window"].split("-")) if r["snr_window"] else (np.nan, np.nan)
        spectra.append(ReducedSpectrum(r["target"], r["instrument"], out / r["file"],
                                       np.asarray(spec.spectral_axis.value, float), flux, sig,
                                       np.asarray(spec.mask, bool), [], [f for f in r["flags"].split(",") if f != "OK"],
                                       {"snr": r["snr"], "kind": r["kind"], "snr_window": (lo, hi),
                                        "match": None, "reused": True}))
    rows = [{k: (np.nan if v is None else v) for k, v in r.items()} for r in rec["rows"]]
    return rows, spectra, list(rec.get("notes", []))


def _save_state(out: Path, key, state: str, rows: list[dict], cal: Calibrations | None) -> None:
    """Record a finished set-up (written last, atomically: a run killed before this point
    redoes the set-up)."""
    prods = {r["file"] for r in rows if r["file"]}
    if cal is not None:
        prods |= {f"calibrations/{v}" for v in cal.files.values()}
    prods = {rel: sha256(out / rel) for rel in sorted(prods) if (out / rel).exists()}

    def clean(v):
        if isinstance(v, (np.floating, float)):
            return None if not np.isfinite(v) else float(v)
        if isinstance(v, np.integer):
            return int(v)
        return v

    rec = {"state": state, "key": list(key), "products": prods, "notes": list(cal.notes) if cal else [],
           "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}
    from .io import atomic_write_text

    p = _state_path(out, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(rec, indent=1, sort_keys=True), p)


def _check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".specred_write_test_{__import__('os').getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise SpecredError(f"cannot write to the output folder {out}: {exc.strerror or exc}") from exc
    # temporary files of a run that was killed while writing (see specred.io.atomic_path)
    for part in out.glob("**/.*.part"):
        part.unlink(missing_ok=True)


def _frames_table(found, used: set, raw: Path) -> Table:
    base = raw if raw.is_dir() else raw.parent

    def rel(p):
        try:
            return str(Path(p).resolve().relative_to(base.resolve()))
        except ValueError:
            return str(p)

    rows = []
    for f in found.frames:
        rows.append((rel(f.path), f.instrument, f.night or "", f.setup or "", f.frame_type, f.object or "",
                     float(f.exptime or np.nan), float(f.airmass or np.nan), f.date_obs or "",
                     f.path in used, "; ".join(f.problems)))
    for path, why in found.problems:
        rows.append((rel(path), "", "", "", "unusable", "", np.nan, np.nan, "", False, why))
    names = ("file", "instrument", "night", "setup", "type", "object", "exptime", "airmass", "date_obs", "used",
             "problem")
    t = Table(rows=rows, names=names) if rows else Table(names=names)
    t["exptime"].unit = "s"
    t.meta["description"] = "every file found under the raw folder; used = part of a reduced set-up"
    t.meta["raw"] = str(base)
    return t


def reduce_night(raw, out, *, config=None, targets=None, force: bool = False, report: bool = True,
                 progress=None) -> NightResult:
    """Reduce every EFOSC2 Gr#13 and SofI GB standard and science target found under ``raw``.

    Parameters
    ----------
    raw : path
        Folder (searched recursively; ``.fits``, ``.fits.gz``, ``.fits.Z``) or single FITS file
        of raw ESO frames.  Raw files are only read, never modified.
    out : path
        Output folder (created).
    config : path or dict, optional
        User parameters overriding ``pipelines/efosc2_gr13.yaml`` / ``sofi_gb.yaml``.
    targets : path or TargetList, optional
        Target list (ECSV/CSV with id, ra, dec[, z]); science spectra matched by position are
        named after its ids.  Default: the programme's ``examples/targets.ecsv``.
    force : bool
        Redo every set-up.  By default a set-up whose products are up to date (same inputs,
        parameters, target list and specred version; products unchanged) is reused.
    report : bool
        Write ``OUT/report.html`` and the QC plots in ``OUT/qc/``.
    progress : callable, optional
        ``progress(iterable, desc=, unit=)`` wrapper (see :mod:`specred.progress`).

    Returns
    -------
    NightResult
        Products, the night table (also written to ``out/night.ecsv``), calibrations of the
        set-ups reduced in this run, the one-line problems found, and wall time per stage.
    """
    from .targets import TargetList, load_targets

    t_start = _time.perf_counter()
    out = Path(out)
    raw_p = Path(raw)
    if not raw_p.exists():
        raise SpecredError(f"raw folder {raw} does not exist")
    _check_output(out)
    # OUT/specred.log gets every INFO line of the run whatever the caller's logging set-up;
    # what the caller's handlers see is unchanged (records below its level are not forwarded)
    handler = logging.FileHandler(out / "specred.log", mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    slog = logging.getLogger("specred")
    saved = (slog.level, slog.propagate)
    forward = None
    if slog.getEffectiveLevel() > logging.INFO:
        forward = _Forward(slog.getEffectiveLevel())
        slog.setLevel(logging.INFO)
        slog.propagate = False
        slog.addHandler(forward)
    slog.addHandler(handler)
    try:
        return _reduce_night(raw_p, out, config, targets, force, report, progress, t_start,
                             TargetList, load_targets)
    finally:
        slog.removeHandler(handler)
        handler.close()
        if forward is not None:
            slog.removeHandler(forward)
        slog.setLevel(saved[0])
        slog.propagate = saved[1]


class _Forward(logging.Handler):
    """Pass records at or above the caller's level on to the root logger's handlers."""

    def emit(self, record):
        logging.getLogger().handle(record)


def _reduce_night(raw, out, config, targets, force, report, progress, t_start, TargetList, load_targets):
    log.info("specred %s: reducing %s into %s", __version__, raw, out)
    catalog = targets if isinstance(targets, TargetList) else load_targets(targets)
    log.info("target list %s (%d targets)", catalog.source, len(catalog))
    cfgs: dict[str, dict] = {}          # per instrument, loaded when the night has it
    timings: dict[str, float] = {}
    with _Stage(timings)("discover"):
        found = discover(raw, progress=progress)
    if not found.frames and not found.problems:
        raise SpecredError(f"{raw}: no FITS files found (looked for *.fits, *.fits.gz, *.fits.Z, recursively)")
    problems = [f"{Path(p).name}: {why}" for p, why in found.problems]
    for p in problems:
        log.warning("skipped %s", p)
    spectra, rows, cals = [], [], []
    groups = found.groups()
    used: set = set()
    todo = []
    for key, group in groups.items():
        inst, night, setup = key
        kinds = set(group) - {"bias"}
        if not kinds:
            continue
        if inst == "SOFI" and not setup.startswith("GB/"):
            msg = f"SOFI set-up {setup} on {night}: only the blue grism (GB) is supported; frames skipped"
            log.warning("%s", msg)
            problems.append(msg)
            continue
        if inst == "EFOSC2" and not setup.startswith("Gr#13/"):
            msg = f"EFOSC2 set-up {setup} on {night}: only Grism #13 is supported; frames skipped"
            log.warning("%s", msg)
            problems.append(msg)
            continue
        if not (group.get("science") or group.get("flux_standard") or group.get("telluric_standard")):
            continue
        todo.append((key, group))
    if not todo:
        raise SpecredError(f"{raw}: no EFOSC2 Grism #13 or SofI GB science or standard frames to reduce"
                           + (f" ({len(problems)} file(s) skipped, first: {problems[0]})" if problems else ""))
    for key, group in todo:
        inst = key[0]
        if inst not in cfgs:
            cfgs[inst] = load_config(inst, config)
        cfg = cfgs[inst]
        used |= {f.path for fr in group.values() for f in fr}
        state = _setup_state(key, group, cfg, catalog)
        again = None if force else _reuse(out, key, state)
        if again is not None:
            r, s, notes = again
            log.info("%s %s %s: products up to date, reused (--force to redo)", *key)
            rows += r
            spectra += s
            problems += notes
            continue
        try:
            if inst == "SOFI":
                from .sofi_pipeline import reduce_sofi_setup

                s, r, c = reduce_sofi_setup(key, group, cfg, out, timings, progress=progress, catalog=catalog)
            else:
                s, r, c = reduce_efosc2_setup(key, group, cfg, out, timings, progress=progress, catalog=catalog)
        except CalibrationError as exc:
            # e.g. an arc that cannot be solved: this set-up is lost, the rest of the night is not
            msg = f"{inst} set-up {key[2]} on {key[1]} not reduced: {exc}"
            log.error("%s", msg)
            problems.append(msg)
            continue
        problems += c.notes
        _save_state(out, key, state, r, c)
        spectra += s
        rows += r
        cals.append(c)
    if not rows:
        raise SpecredError(f"{raw}: nothing could be reduced; " + "; ".join(problems[-3:]))
    table = Table(rows=[[r[c] for c in NIGHT_COLUMNS] for r in rows], names=NIGHT_COLUMNS)
    table["exptime"].unit = "s"
    table["wave_rms_aa"].unit = "Angstrom"
    table["match_sep_arcsec"].unit = "arcsec"
    # deterministic content only (a rerun gives the same file); timings go to specred.log
    table.meta.update({"specred_version": __version__, "problems": problems, "target_list": Path(catalog.source).name,
                       "description": "one row per reduced target; flags explained in specred.pipeline"})
    atomic_write_table(table, out / "night.ecsv")
    atomic_write_table(_frames_table(found, used, raw), out / "frames.ecsv")
    if report:
        with _Stage(timings)("report"):
            try:
                from .report import write_report

                write_report(out)
            except Exception as exc:   # the report must never cost the night its products
                msg = f"report.html not written: {type(exc).__name__}: {exc}"
                log.error("%s", msg)
                problems.append(msg)
    timings["total"] = _time.perf_counter() - t_start
    log.info("wall time %.1f s (%s)", timings["total"],
             ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "total"))
    return NightResult(out, spectra, table, cals, problems, timings)
