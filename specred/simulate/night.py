"""Simulate a raw NTT night (EFOSC2 Gr#13 and/or SofI blue grism) with known truth.

``simulate_night(out, night='2018-12-05', instrument='both', seed=0)`` writes

* ``out/raw/`` — one FITS file per exposure, named and structured like ESO archive files;
* ``out/truth/`` — everything needed to test a reduction against: ``frames.ecsv`` (type,
  nod, offsets, seeing, trace, flexure, cosmics per frame), ``targets.ecsv`` (class,
  redshift, metallicity, WR/BAL truth, continuum levels), ``lines.ecsv`` (every injected
  line with its observed flux), ``spectra/<id>_<INST>.ecsv`` (true flux-calibrated
  spectrum above the atmosphere in the instrument's medium), ``optics.yaml`` (dispersion,
  tilt, detector constants), ``cosmics/<file>.npz`` (injected cosmic-ray pixels) and, for
  every object frame, ``expected/<file>.npz``: the noiseless object counts per raw row
  (e-, whole profile), trace centre and Gaussian sigma per row, sky and dark e- per pixel at
  the trace, read noise (e-) — what an optimal extraction's S/N is judged against.

The night is taken from the programme's observing log (Solarz et al. 2020, Tables A.1/A.2):
``night`` is the UT date of the science exposures as the log lists them.  Calibrations are
placed in the evening before (EFOSC2: 11 biases, 5 dome flats, He-Ar arcs; SofI: Xe arcs,
lamp-on/lamp-off flats), a spectrophotometric standard near the start of the night, and for
SofI an A0V telluric standard right after every target at similar airmass.
"""
from __future__ import annotations

import logging
import math
import time as _time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy.special import erf
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time, TimeDelta

from .. import calib
from ..errors import SpecredError
from ..io import atomic_write_fits, atomic_write_table
from . import optics
from .headers import airmass as airmass_at, efosc2_header, sofi_header
from .programme import programme_obslog, programme_targets
from .sources import PAPER_TO_KIND, Source, balnicity_index, build_source

log = logging.getLogger(__name__)

DEFAULT_NIGHT = "2018-12-05"


@dataclass
class FrameSpec:
    """Everything needed to render one raw frame."""

    instrument: str
    kind: str                      # bias, flat, lamp_off_flat, arc, flux_standard, telluric, science
    t: Time
    exptime: float                 # EFOSC2 exposure / SofI DIT (s)
    obj: str
    ra: float
    dec: float
    am_start: float = 1.0
    am_end: float = 1.0
    ndit: int = 1
    source: Source | None = None
    seeing: float = 1.0            # FWHM at 5000 Å, arcsec
    slit_offset: float = 0.0       # arcsec, star centre relative to slit centre
    trace: tuple = (530.0, 0.0, 0.0)   # x at centre row, slope (px/row), curvature (px/row^2)
    flexure: float = 0.0           # rows
    offset_x: float | None = None  # SofI cumulative offset along the slit (arcsec)
    nod: str | None = None
    nodthrow: float | None = None
    jitter: float | None = None
    obs_id: int = 0
    expno: int = 1
    nexp: int = 1
    sky_scale: float = 1.0         # OH / sky-line strength relative to the model
    moon: float = 0.0              # moon continuum factor
    lamp_on: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def airmass(self) -> float:
        return 0.5 * (self.am_start + self.am_end)


# ============================================================================ planning
def _night_rows(night: str, instrument: str):
    obslog = programme_obslog()
    dates = np.array([s[:10] for s in obslog["ut_start"]])
    sel = (dates == night) & (obslog["instrument"] == instrument)
    return obslog[sel]


def _nearest_night(night: str, instrument: str) -> str | None:
    obslog = programme_obslog()
    rows = obslog[obslog["instrument"] == instrument]
    if len(rows) == 0:
        return None
    dates = sorted({s[:10] for s in rows["ut_start"]})
    t0 = Time(night)
    return min(dates, key=lambda d: abs((Time(d) - t0).jd))


def _target_flux_levels(kind: str, rng) -> tuple[float, float]:
    """Continuum f_lambda at 6100 and 12100 Å (erg s^-1 cm^-2 Å^-1): S/N ~ 10-30 in the
    programme's exposures, unknowns at S/N ~ 2-3 (as in the paper)."""
    if kind == "unknown":
        return rng.uniform(1.5e-18, 2.5e-18), rng.uniform(1.2e-17, 2e-17)
    if kind in ("QSO", "LoBAL", "FeQSO"):
        return rng.uniform(1.5e-17, 3e-17), rng.uniform(2e-17, 3.5e-17)
    if kind == "YSO":
        return None, rng.uniform(2.5e-17, 4e-17)
    return rng.uniform(2.5e-17, 4.5e-17), rng.uniform(2.5e-17, 4e-17)


def make_source(row, rng) -> Source:
    kind = PAPER_TO_KIND[str(row["classification"])]
    if kind == "SF" and bool(row["wolf_rayet"]):
        kind = "WR"
    f61, f121 = _target_flux_levels(kind, rng)
    return build_source(str(row["object_id"]), kind, float(row["z"]), rng, f6100=f61, f12100=f121,
                        oh12=float(row["oh12"]), log_nii_oii=float(row["log_nii_oii"]),
                        paper_class=str(row["classification"]))


class _StarSource(Source):
    """A star with a tabulated spectrum (spectrophotometric or A0V telluric standard)."""

    def __init__(self, name, wave, flux, kind):
        super().__init__(name, kind, kind, 0.0)
        self._w = np.asarray(wave, float)
        self._f = np.asarray(flux, float)
        self.truth = {"kind": kind, "z": 0.0, "class": kind, "wr": False}

    def f_lambda(self, w):
        return np.interp(np.asarray(w, float), self._w, self._f)


def _flux_standard_source(name: str) -> _StarSource:
    t = calib.standard_flux(name)
    # standard-star tables are given in air wavelengths (Hamuy et al. convention)
    return _StarSource(name, calib.air_to_vacuum(np.asarray(t["wavelength"], float)),
                       np.asarray(t["flux"], float), "flux_standard")


def _a0v_source(name: str, vmag: float) -> _StarSource:
    t = calib.a0v_model()
    wave = np.asarray(t["wavelength"], float)
    if t.meta.get("medium", "vacuum") == "air":
        wave = calib.air_to_vacuum(wave)
    scale = 10 ** (-0.4 * (vmag - 0.03))
    return _StarSource(name, wave, np.asarray(t["flux"], float) * scale, "telluric")


def _red_end(inst: str) -> float:
    """Reddest wavelength (Å) reaching the detector of a simulated instrument."""
    sim = optics.INSTRUMENTS[inst]
    return float(np.max(sim.row_to_wave(np.array(sim.rows, float))))


def _pick_standard(mjd: float, rng, min_wmax: float = 0.0) -> tuple[str, float, float, float]:
    """The flux standard with a flux table reaching ``min_wmax`` (Å) nearest the zenith."""
    st = calib.standards()
    has = np.array([bool(str(f).strip()) for f in st["flux_file"]])
    has &= np.nan_to_num(np.asarray(st["flux_wmax"], float)) >= min_wmax
    st = st[has]
    am = airmass_at(np.asarray(st["ra"], float), np.asarray(st["dec"], float), mjd)
    i = int(np.argmin(am))
    return str(st["name"][i]), float(st["ra"][i]), float(st["dec"][i]), float(am[i])


def _pick_telluric(mjd: float, target_am: float, ra: float, dec: float):
    tt = calib.telluric_standards()
    ok = np.isfinite(np.asarray(tt["vmag"], float))
    tt = tt[ok]
    am = airmass_at(np.asarray(tt["ra"], float), np.asarray(tt["dec"], float), mjd)
    # closest in airmass, then in position
    sep = np.hypot((np.asarray(tt["ra"]) - ra) * np.cos(np.radians(dec)), np.asarray(tt["dec"]) - dec)
    score = np.abs(am - target_am) + sep / 300.0
    i = int(np.argmin(score))
    return str(tt["name"][i]), float(tt["ra"][i]), float(tt["dec"][i]), float(tt["vmag"][i]), float(am[i])


def plan_efosc2(rows, targets, rng) -> list[FrameSpec]:
    inst = "EFOSC2"
    starts = Time(list(rows["ut_start"]), format="isot", scale="utc")
    first = starts.min()
    december = first.datetime.month == 12
    seeing0 = 1.45 if december else 0.9
    moon = 0.0 if december else 5.0
    frames: list[FrameSpec] = []
    t = first - TimeDelta(7.0 * 3600, format="sec")
    for i in range(11):
        frames.append(FrameSpec(inst, "bias", t, 0.0, "BIAS", 0.0, -29.26, obs_id=100400001, expno=i + 1, nexp=11))
        t = t + TimeDelta(45, format="sec")
    for i in range(5):
        frames.append(FrameSpec(inst, "flat", t, 12.0, "FLAT", 0.0, -29.26, obs_id=100400002, expno=i + 1, nexp=5))
        t = t + TimeDelta(60, format="sec")
    for i in range(2):
        frames.append(FrameSpec(inst, "arc", t, 2.5, "WAVE", 0.0, -29.26, obs_id=100400003, expno=i + 1, nexp=2))
        t = t + TimeDelta(50, format="sec")
    # spectrophotometric standard ~40 min before the first target
    tstd = first - TimeDelta(2400, format="sec")
    name, ra, dec, am = _pick_standard(tstd.mjd, rng)
    star = _flux_standard_source(name)
    frames.append(FrameSpec(inst, "flux_standard", tstd, 0.0, name.replace(" ", ""), ra, dec, am, am + 0.005,
                            source=star, seeing=seeing0 * rng.uniform(0.9, 1.1),
                            slit_offset=rng.uniform(-0.1, 0.1), trace=_random_trace(rng, 530.0, 15.0),
                            flexure=float(rng.normal(0, 0.3)), obs_id=100400010, moon=moon))
    oid = 100400100
    for r, t0 in zip(rows, starts):
        tgt = targets[str(r["object_id"])]
        oid += 1
        frames.append(FrameSpec(inst, "science", t0, float(r["exptime"]), str(r["object_id"]),
                                tgt["ra"], tgt["dec"], float(r["airmass_start"]), float(r["airmass_end"]),
                                source=tgt["source"], seeing=seeing0 * rng.uniform(0.85, 1.15),
                                slit_offset=rng.uniform(-0.15, 0.15), trace=_random_trace(rng, 520.0, 40.0),
                                flexure=float(rng.normal(0, 0.5)), obs_id=oid, moon=moon))
    tend = starts.max() + TimeDelta(float(max(rows["exptime"])) + 900, format="sec")
    frames.append(FrameSpec(inst, "arc", tend, 2.5, "WAVE", 0.0, -29.26, obs_id=100400004))
    return frames


def _random_trace(rng, x0, spread):
    return (x0 + rng.uniform(-spread, spread), rng.uniform(-3.0, 3.0) / 1000.0, rng.uniform(-1.5, 1.5) / 512.0**2)


def plan_sofi(rows, targets, rng) -> list[FrameSpec]:
    inst = "SOFI"
    starts = Time(list(rows["ut_start"]), format="isot", scale="utc")
    first = starts.min()
    december = first.datetime.month == 12
    seeing0 = 1.3 if december else 0.85
    frames: list[FrameSpec] = []
    t = first - TimeDelta(6.0 * 3600, format="sec")
    for i in range(2):
        frames.append(FrameSpec(inst, "arc", t, 10.0, "LAMP", 0.0, -29.26, ndit=3, obs_id=200400001,
                                expno=i + 1, nexp=2))
        t = t + TimeDelta(60, format="sec")
    for i in range(10):
        on = i % 2 == 0
        frames.append(FrameSpec(inst, "flat" if on else "lamp_off_flat", t, 3.0, "FLAT", 0.0, -29.26, ndit=5,
                                obs_id=200400002, expno=i + 1, nexp=10, lamp_on=on))
        t = t + TimeDelta(40, format="sec")
    tstd = first - TimeDelta(1800, format="sec")
    name, ra, dec, am = _pick_standard(tstd.mjd, rng, min_wmax=_red_end(inst))
    frames += _abba(inst, "flux_standard", tstd, _flux_standard_source(name), name.replace(" ", ""), ra, dec,
                    am, am + 0.01, rng, seeing0, obs_id=200400010, n=4, dit=None)
    oid = 200400100
    for r, t0 in zip(rows, starts):
        tgt = targets[str(r["object_id"])]
        oid += 1
        total = float(r["exptime"])
        nexp = 8
        ndit = int(math.ceil(total / nexp / 110.0))
        dit = total / nexp / ndit
        seq = _abba(inst, "science", t0, tgt["source"], str(r["object_id"]), tgt["ra"], tgt["dec"],
                    float(r["airmass_start"]), float(r["airmass_end"]), rng, seeing0, obs_id=oid, n=nexp,
                    dit=dit, ndit=ndit)
        frames += seq
        tt = seq[-1].t + TimeDelta(seq[-1].exptime * seq[-1].ndit + 300, format="sec")
        tname, tra, tdec, vmag, tam = _pick_telluric(tt.mjd, float(r["airmass_end"]), tgt["ra"], tgt["dec"])
        oid += 1
        frames += _abba(inst, "telluric", tt, _a0v_source(tname, vmag), tname.replace(" ", ""), tra, tdec,
                        tam, tam + 0.005, rng, seeing0, obs_id=oid, n=4, dit=None)
    return frames


def _abba(inst, kind, t0, source, obj, ra, dec, am0, am1, rng, seeing0, *, obs_id, n, dit, ndit=None):
    """An AutoNodOnSlit sequence: ABBA cycles with random jitter; A at 0", B at -throw."""
    throw, jit = 30.0, 6.0
    pattern = ["A", "B", "B", "A"]
    frames = []
    if dit is None:   # bright star: DIT chosen for a peak of ~ 6000 ADU (min DIT 1.2 s)
        dit, ndit = _star_dit(source, am0, seeing0), 5
    t = t0
    # flexure drifts slowly within a sequence (a few 0.01 px between
    # consecutive frames), so that pair subtraction leaves small OH residuals
    flex = float(rng.normal(0, 0.3))
    for i in range(n):
        nod = pattern[i % 4]
        flex += float(rng.normal(0, 0.04))
        off = (0.0 if nod == "A" else -throw) + rng.uniform(-jit / 2, jit / 2)
        frac = i / max(n - 1, 1)
        a_s = am0 + (am1 - am0) * frac
        a_e = am0 + (am1 - am0) * min(1.0, (i + 1) / max(n, 1))
        x0 = 620.0 + off / 0.288
        frames.append(FrameSpec(inst, kind, t, float(dit), obj, ra, dec, a_s, a_e, ndit=int(ndit), source=source,
                                seeing=seeing0 * rng.uniform(0.85, 1.15), slit_offset=rng.uniform(-0.15, 0.15),
                                trace=(x0, rng.uniform(-2.0, 2.0) / 1000.0, rng.uniform(-1.0, 1.0) / 512.0**2),
                                flexure=flex, offset_x=off, nod=nod, nodthrow=throw,
                                jitter=jit, obs_id=obs_id, expno=i + 1, nexp=n,
                                sky_scale=float(np.clip(rng.normal(1.0, 0.08), 0.7, 1.3))))
        t = t + TimeDelta(float(dit) * int(ndit) + 25.0, format="sec")
    return frames


def _star_dit(source, am, seeing) -> float:
    inst = optics.SOFI
    w = np.linspace(9500, 16000, 200)
    rate = source.f_lambda(w) * optics.sensitivity_factor(inst, w) * 7.0   # ADU/s/px at the peak row
    peak = float(np.max(rate)) * 0.3 * float(optics.slit_loss(seeing))     # ~30 % of the flux in the central column
    return float(np.clip(6000.0 / max(peak, 1e-9), 1.2, 60.0))


def _efosc2_std_exptime(source, seeing) -> float:
    inst = optics.EFOSC2
    w = np.linspace(4000, 9000, 200)
    rate = source.f_lambda(calib.air_to_vacuum(w)) * optics.sensitivity_factor(inst, w) * 5.6
    peak = float(np.max(rate)) * 0.17 * float(optics.slit_loss(seeing))
    return float(np.clip(round(25000.0 / max(peak, 1e-9)), 5.0, 600.0))


# ============================================================================ rendering
class Renderer:
    """Renders FrameSpecs of one instrument into raw ADU arrays (vectorised over pixels)."""

    def __init__(self, inst: optics.SimInstrument):
        self.inst = inst
        self.grid = optics.FineGrid(inst)
        self.hires = optics.hires_wave(inst)        # in the instrument medium
        self.hires_vac = optics.from_medium(self.hires, inst.medium)
        self.sens = optics.sensitivity_factor(inst, self.hires)
        self.illum = optics.slit_illumination(inst)
        self.defects = optics.detector_defects(inst.name)
        ny, nx = inst.shape
        self.yy, self.xx = np.mgrid[0:ny, 0:nx]
        self.light = np.zeros((ny, nx), bool)
        self.light[inst.rows[0]:inst.rows[1], inst.cols[0]:inst.cols[1]] = True
        self._sky_cache = {}
        self._lamp_cache = {}

    # -- spectra in counts (ADU) per second per row on the fine grid, LSF-convolved
    def _sky_rows(self, scale: float, moon: float) -> np.ndarray:
        inst = self.inst
        area = inst.pixscale * 1.0          # arcsec^2 per pixel (1" slit)
        cont = calib.sky_continuum(optics.to_medium(self.hires_vac, "air") if inst.medium == "air" else self.hires)
        if moon > 0:
            cont = cont * (1.0 + moon * (self.hires / 5000.0) ** -2.0)
        rows = self.grid.bin_continuum(self.hires, cont * self.sens * area)
        region = "optical" if inst.medium == "air" else "nir"
        lines = calib.sky_lines(region)
        lw = np.asarray(lines["wavelength"], float)
        lf = np.asarray(lines["flux"], float)
        sens_l = optics.sensitivity_factor(inst, lw)
        rows = rows + scale * self.grid.bin_lines(lw, lf * sens_l * area)
        if inst.name == "SOFI":   # thermal background of telescope + instrument (weak in GB)
            th = 2.0e-18 * np.exp((self.hires - 16000.0) / 600.0)
            rows = rows + self.grid.bin_continuum(self.hires, th * self.sens * area)
        return self.grid.convolve(rows)

    def _lamp_rows(self, kind: str) -> np.ndarray:
        if kind in self._lamp_cache:
            return self._lamp_cache[kind]
        inst = self.inst
        if kind == "arc":
            lines = calib.arc_lines("HeAr" if inst.name == "EFOSC2" else "Xe")
            lw = np.asarray(lines["wavelength"], float)
            li = np.asarray(lines["intensity"], float)
            rows = self.grid.convolve(self.grid.bin_lines(lw, li))
            # brightest lines saturate, as in real EFOSC2 arcs (2600-4600 px above 60000 ADU)
            target_peak = 1.4 * inst.saturation if inst.name == "EFOSC2" else 0.5 * inst.saturation
            rows = rows / rows.max() * target_peak
        else:  # flat lamp: quartz-halogen ~3000 K through the instrument response
            lam_cm = self.hires * 1e-8
            bb = 1.0 / (lam_cm**5 * np.expm1(1.438777 / (lam_cm * 3000.0)))
            dens = bb / bb.max() * self.sens / self.sens.max()
            rows = self.grid.convolve(self.grid.bin_continuum(self.hires, dens))
            rows = rows / rows.max()
        self._lamp_cache[kind] = rows
        return rows

    def _object_rows(self, spec: FrameSpec) -> np.ndarray:
        inst = self.inst
        f = spec.source.f_lambda(self.hires_vac)
        see = optics.seeing_at(self.hires, spec.seeing)
        thru = self.sens * optics.atmosphere(inst, self.hires, spec.airmass) \
            * optics.slit_loss(see, 1.0, spec.slit_offset)
        return self.grid.convolve(self.grid.bin_continuum(self.hires, f * thru))

    def expected_counts_rows(self, spec: FrameSpec) -> np.ndarray:
        """ADU/s per row at the centre-column dispersion (for truth / tests)."""
        return self._object_rows(spec)

    def render(self, spec: FrameSpec, rng: np.random.Generator):
        """Return (raw ADU array (float), truth dict)."""
        inst = self.inst
        ny, nx = inst.shape
        t_int = spec.exptime * (spec.ndit if inst.name == "SOFI" else 1)    # total integration
        t_frame = spec.exptime                                              # counts per frame (SofI: average of NDIT)
        u2d = inst.effective_row(self.yy, self.xx, spec.flexure)
        light = np.zeros((ny, nx))                                          # ADU per frame, before response
        truth = {"n_cosmics": 0}
        if spec.kind in ("flat", "lamp_off_flat", "arc"):
            if spec.kind != "lamp_off_flat":
                rows = self._lamp_rows(spec.kind)
                level = 1.0 if spec.kind == "arc" else (28000.0 if inst.name == "EFOSC2" else 4000.0)
                light += level * self.grid.evaluate(rows, u2d) * self.illum[None, :]
            if inst.name == "SOFI":   # thermal glow of the dome/instrument seen in lamp-off and on
                light += 150.0 * (t_frame / 3.0) * self.illum[None, :] * np.exp(-(self.yy / 400.0))
        if spec.kind in ("science", "flux_standard", "telluric"):
            sky = self._sky_rows(spec.sky_scale, spec.moon)
            light += t_frame * self.grid.evaluate(sky, u2d) * self.illum[None, :]
            obj_rows = self._object_rows(spec)
            x0, s1, s2 = spec.trace
            yc = ny / 2.0
            y = np.arange(ny, dtype=float)
            xc = x0 + s1 * (y - yc) + s2 * (y - yc) ** 2
            u1d = inst.effective_row(y, xc, spec.flexure)
            per_row = t_frame * self.grid.evaluate(obj_rows, u1d)
            fwhm_px = optics.seeing_at(inst.row_to_wave(u1d), spec.seeing) / inst.pixscale
            sig = (fwhm_px / 2.3548)[:, None]
            half = 0.5 / (np.sqrt(2.0) * sig)
            dx = (self.xx - xc[:, None]) / (np.sqrt(2.0) * sig)
            frac = 0.5 * (erf(dx + half) - erf(dx - half))
            light += per_row[:, None] * frac
            truth["trace_x_centre"] = float(x0)
            # noiseless expectation along the trace (raw rows, electrons per frame), from
            # which tests derive the S/N an optimal extraction can reach
            xi = np.clip(np.round(xc).astype(int), 0, nx - 1)
            truth["expected"] = {
                "object_e": per_row * inst.gain, "x_centre": xc, "sigma_px": sig[:, 0],
                "sky_e": (light[np.arange(ny), xi] - per_row * frac[np.arange(ny), xi]) * inst.gain,
                "dark_e": np.full(ny, inst.dark * t_frame),
                "read_noise_e": np.float64(inst.read_noise / (np.sqrt(spec.ndit) if inst.name == "SOFI" else 1.0)),
                "ndit": np.int64(spec.ndit if inst.name == "SOFI" else 1)}
        # detector: response, dark, noise (in electrons), cosmics, read noise, bias
        d = self.defects
        e = light * inst.gain * d.prnu
        e = e + inst.dark * t_frame * d.hot
        e[~self.light] = 0.0
        if inst.name == "EFOSC2":
            noisy = rng.poisson(np.clip(e, 0, None)).astype(float)
        else:   # average of NDIT reads: variance e/NDIT (Gaussian limit of Poisson)
            noisy = e + rng.standard_normal(e.shape) * np.sqrt(np.clip(e, 0, None) / spec.ndit)
        ncr_expected = inst.cr_rate * (t_int + (22.0 if inst.name == "EFOSC2" else 0.0))
        cr = _cosmic_rays(rng, ncr_expected, (ny, nx), self.light, ndit=spec.ndit if inst.name == "SOFI" else 1)
        if cr is not None:
            np.add.at(noisy, (cr["y"], cr["x"]), cr["e"])
            truth["cosmics"] = cr
            truth["n_cosmics"] = int(cr["event"].max() + 1) if cr["y"].size else 0
        ron = inst.read_noise / (np.sqrt(spec.ndit) if inst.name == "SOFI" else 1.0)
        adu = noisy / inst.gain + rng.normal(0.0, ron / inst.gain, (ny, nx))
        if inst.name == "EFOSC2":
            offset = float(rng.normal(0.0, 1.2))
            adu += inst.bias_level + offset + d.bias_pattern
            truth["bias_offset"] = offset
            adu = np.clip(np.round(adu), 0, 65535)
        else:
            adu += float(rng.normal(0.0, 2.0))          # reset pedestal drift
        return adu, truth


def _cosmic_rays(rng, n_expected, shape, light_mask, ndit=1):
    n = int(rng.poisson(n_expected))
    if n == 0:
        return None
    ny, nx = shape
    y0 = rng.uniform(0, ny - 1, n)
    x0 = rng.uniform(0, nx - 1, n)
    length = rng.choice([1, 1, 1, 2, 2, 3, 4], n)
    angle = rng.uniform(0, np.pi, n)
    energy = rng.lognormal(np.log(2500.0), 0.6, n) / ndit
    ev = np.repeat(np.arange(n), length)
    step = np.concatenate([np.arange(k) for k in length])
    ys = np.clip(np.round(y0[ev] + step * np.sin(angle[ev])).astype(int), 0, ny - 1)
    xs = np.clip(np.round(x0[ev] + step * np.cos(angle[ev])).astype(int), 0, nx - 1)
    es = energy[ev] / length[ev]
    ok = light_mask[ys, xs]
    return {"y": ys[ok], "x": xs[ok], "e": es[ok], "event": ev[ok]}


# ============================================================================ writing
def _hdu(spec: FrameSpec, adu: np.ndarray) -> fits.PrimaryHDU:
    if spec.instrument == "EFOSC2":
        kind = {"flux_standard": "standard"}.get(spec.kind, spec.kind)
        hdr = efosc2_header(t=spec.t, exptime=spec.exptime + (0.0006 if spec.exptime > 0 else 0.0), kind=kind,
                            obj=spec.obj, ra=spec.ra, dec=spec.dec, am_start=spec.am_start, am_end=spec.am_end,
                            obs_id=spec.obs_id, expno=spec.expno, nexp=spec.nexp)
        # uint16 data are written by astropy as BITPIX=16, BZERO=32768, as the
        # EFOSC2 raw files are (the full 0..65535 ADC range is preserved)
        hdu = fits.PrimaryHDU(adu.astype(np.uint16), header=hdr)
    else:
        kind = "flat" if spec.kind == "lamp_off_flat" else spec.kind
        hdr = sofi_header(t=spec.t, dit=spec.exptime, ndit=spec.ndit, kind=kind, obj=spec.obj, ra=spec.ra,
                          dec=spec.dec, am_start=spec.am_start, am_end=spec.am_end, obs_id=spec.obs_id,
                          expno=spec.expno, nexp=spec.nexp, offset_x=spec.offset_x, nodthrow=spec.nodthrow,
                          jitter=spec.jitter, lamp_on=spec.lamp_on)
        hdu = fits.PrimaryHDU(adu.astype(np.float32), header=hdr)
    return hdu


def _file_name(spec: FrameSpec) -> str:
    prefix = "EFOSC" if spec.instrument == "EFOSC2" else "SOFI"
    return f"{prefix}.{spec.t.isot}.fits"


@dataclass
class NightResult:
    out: Path
    raw_files: list[Path]
    frames: Table
    targets: Table
    seconds: float


def simulate_night(out, night: str = DEFAULT_NIGHT, instrument: str = "both", seed: int = 0,
                   progress=None) -> NightResult:
    """Simulate a raw night into ``out/raw`` with truth in ``out/truth`` (see module doc)."""
    t_start = _time.perf_counter()
    instrument = instrument.lower()
    if instrument not in ("efosc2", "sofi", "both"):
        raise SpecredError(f"--instrument must be efosc2, sofi or both, not {instrument!r}")
    try:
        Time(night)
    except ValueError as exc:
        raise SpecredError(f"--night must be a date YYYY-MM-DD, not {night!r}") from exc
    out = Path(out)
    raw_dir, truth_dir = out / "raw", out / "truth"
    for d in (raw_dir, truth_dir / "spectra", truth_dir / "cosmics", truth_dir / "expected"):
        d.mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence(seed)
    plan_ss, src_ss, frame_seq = ss.spawn(3)
    plan_rng = np.random.default_rng(plan_ss)
    src_rng = np.random.default_rng(src_ss)

    tg = programme_targets()
    nights_used = {}
    plans: list[FrameSpec] = []
    targets: dict[str, dict] = {}
    for inst in (["EFOSC2", "SOFI"] if instrument == "both" else [instrument.upper()]):
        rows = _night_rows(night, inst)
        used = night
        if len(rows) == 0:
            used = _nearest_night(night, inst)
            if instrument != "both" or used is None:
                raise SpecredError(f"the programme log has no {inst} observations on {night}"
                                   + (f" (nearest {inst} night: {used})" if used else ""))
            rows = _night_rows(used, inst)
            log.info("no %s observations on %s; simulating the nearest %s night %s", inst, night, inst, used)
        nights_used[inst] = used
        # the log holds an exposure of a target that Table 2 does not list (J083104.69 on
        # 2018-12-06 in Solarz et al. 2020, Table A.1): no position or class to simulate it by
        known = np.isin(np.asarray(rows["object_id"], str), np.asarray(tg["object_id"], str))
        for oid in np.asarray(rows["object_id"], str)[~known]:
            log.warning("%s (%s log, %s) is not in the programme's target table: not simulated", oid, inst, used)
        rows = rows[known]
        for r in rows:
            oid = str(r["object_id"])
            if oid not in targets:
                trow = tg[tg["object_id"] == oid][0]
                targets[oid] = {"ra": float(trow["ra"]), "dec": float(trow["dec"]),
                                "source": make_source(trow, src_rng), "instruments": []}
            targets[oid]["instruments"].append(inst)
        plans += plan_efosc2(rows, targets, plan_rng) if inst == "EFOSC2" else plan_sofi(rows, targets, plan_rng)

    for spec in plans:   # EFOSC2 standard exposure time from its brightness
        if spec.instrument == "EFOSC2" and spec.kind == "flux_standard":
            spec.exptime = _efosc2_std_exptime(spec.source, spec.seeing)

    renderers = {name: Renderer(optics.INSTRUMENTS[name]) for name in {p.instrument for p in plans}}
    frame_seeds = frame_seq.spawn(len(plans))
    frame_rows, raw_files = [], []
    iterator = plans if progress is None else progress(plans, desc="simulate", unit="frame")
    for spec, fss in zip(iterator, frame_seeds):
        rng = np.random.default_rng(fss)
        adu, tr = renderers[spec.instrument].render(spec, rng)
        name = _file_name(spec)
        path = raw_dir / name
        atomic_write_fits(fits.HDUList([_hdu(spec, adu)]), path)
        raw_files.append(path)
        expected = tr.pop("expected", None)
        if expected is not None:
            np.savez_compressed(truth_dir / "expected" / (name[:-5] + ".npz"), **expected)
        cr = tr.pop("cosmics", None)
        if cr is not None:
            np.savez_compressed(truth_dir / "cosmics" / (name[:-5] + ".npz"), **cr)
        frame_rows.append({
            "file": name, "instrument": spec.instrument, "type": spec.kind, "object": spec.obj,
            "date_obs": spec.t.isot, "exptime": spec.exptime, "ndit": spec.ndit,
            "airmass": spec.airmass, "seeing": spec.seeing, "slit_offset": spec.slit_offset,
            "trace_x0": spec.trace[0], "trace_slope": spec.trace[1], "trace_curv": spec.trace[2],
            "flexure_px": spec.flexure, "nod": spec.nod or "", "offset_x": spec.offset_x if spec.offset_x is not None else np.nan,
            "sky_scale": spec.sky_scale, "n_cosmics": tr.get("n_cosmics", 0),
            "bias_offset": tr.get("bias_offset", 0.0),
        })
    frames = Table(rows=frame_rows)
    frames.meta["description"] = "Truth for every simulated raw frame (flexure in rows; trace in raw columns)."
    frames.meta["seed"] = seed
    frames.meta["nights"] = nights_used
    atomic_write_table(frames, truth_dir / "frames.ecsv")
    tt = _write_source_truth(targets, plans, renderers, truth_dir)
    _write_optics(renderers, truth_dir)
    dt = _time.perf_counter() - t_start
    return NightResult(out, raw_files, frames, tt, dt)


def _write_source_truth(targets, plans, renderers, truth_dir: Path) -> Table:
    rows, line_rows = [], []
    for oid, tg in targets.items():
        src: Source = tg["source"]
        tr = src.truth
        rows.append({
            "object_id": oid, "kind": src.kind, "paper_class": src.paper_class, "z": src.z,
            "instruments": ",".join(tg["instruments"]), "ra": tg["ra"], "dec": tg["dec"],
            "oh12": tr.get("oh12", np.nan) if tr.get("oh12") is not None else np.nan,
            "log_nii_oii": tr.get("log_nii_oii", np.nan), "ebv": tr.get("ebv", np.nan),
            "wr": bool(tr.get("wr", False)), "bal": bool(src.troughs),
            "lobal": bool(any(t.line in ("MgII_2800", "AlIII_1857") for t in src.troughs)),
            "balnicity_civ": balnicity_index(src) if src.troughs else 0.0,
            "f6100": float(src.f_lambda(np.array([6100.0]))[0]),
            "f12100": float(src.f_lambda(np.array([12100.0]))[0]),
        })
        line_rows += list(src.line_table_rows())
        for inst in tg["instruments"]:
            r = renderers[inst]
            wave = np.arange(r.hires[0], r.hires[-1], 1.0)
            flux = src.f_lambda(optics.from_medium(wave, r.inst.medium))
            t = Table({"wavelength": wave, "flux": flux})
            t["wavelength"].unit = "Angstrom"
            t["flux"].unit = "erg / (s cm2 Angstrom)"
            t.meta = {"object": oid, "instrument": inst, "medium": r.inst.medium,
                      "description": "true source spectrum above the atmosphere (no noise, no LSF)"}
            atomic_write_table(t, truth_dir / "spectra" / f"{oid}_{inst}.ecsv")
    stds = {}
    for p in plans:
        if p.kind in ("flux_standard", "telluric") and p.obj not in stds:
            stds[p.obj] = p
    for name, p in stds.items():
        rows.append({"object_id": name, "kind": p.kind, "paper_class": p.kind, "z": 0.0,
                     "instruments": p.instrument, "ra": p.ra, "dec": p.dec, "oh12": np.nan,
                     "log_nii_oii": np.nan, "ebv": np.nan, "wr": False, "bal": False, "lobal": False,
                     "balnicity_civ": 0.0, "f6100": float(p.source.f_lambda(np.array([6100.0]))[0]),
                     "f12100": float(p.source.f_lambda(np.array([12100.0]))[0])})
    t = Table(rows=rows)
    t.meta["description"] = "Truth per simulated source (f6100/f12100: f_lambda at observed vacuum 6100/12100 A)."
    atomic_write_table(t, truth_dir / "targets.ecsv")
    lt = Table(rows=line_rows) if line_rows else Table(names=("object_id", "line"), dtype=(str, str))
    lt.meta["description"] = "Every injected line: observed-frame vacuum wavelength and flux (erg/s/cm2)."
    atomic_write_table(lt, truth_dir / "lines.ecsv")
    return t


def _write_optics(renderers, truth_dir: Path) -> None:
    doc = {}
    for name, r in renderers.items():
        i = r.inst
        doc[name] = {
            "dispersion_poly": [float(c) for c in i.dispersion_poly], "x_centre": i.x_centre,
            "tilt": list(i.tilt), "medium": i.medium, "lsf_fwhm_px": i.lsf_fwhm_px, "gain": i.gain,
            "read_noise": i.read_noise, "pixscale": i.pixscale, "shape": list(i.shape),
            "note": "lambda(y, x) = polyval(dispersion_poly, y - tilt0*(x-xc) - tilt1*(x-xc)^2 - flexure_px); 0-based raw pixels",
        }
    with open(truth_dir / "optics.yaml", "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
