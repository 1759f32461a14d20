"""The simulated instruments: optics, detector and atmosphere models (the *truth* side).

These are the models the simulator uses to make raw frames.  The reduction never imports
this module: it has to recover everything from the frames (and ``calib/``), which is the
point of a simulation with known truth.

EFOSC2 Grism #13 dispersion: a cubic through the reference points of the real PESSTO
solution for the middle column of a Gr#13 slit#1.0 arc (3638 Å at row 1, 4912 Å at 250,
6296 Å at 500, 7720 Å at 750, 9154 Å at 1000, 9240 Å at 1015; air), line tilt of ~2 px
across the slit.  SofI blue grism: 16459 Å at row 1 to 9356 Å at row 1024 (vacuum),
about -6.94 Å/px, line tilt ~4 px across the slit.  Detector values from the ESO headers
(EFOSC2: CONAD 1.10 e-/ADU, RON 7.8 e-, 1030x1030 binned 2x2 with 6 prescan columns and
6 overscan rows) and from the SofI manual / PESSTO pipeline (gain 5.4 e-/ADU).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import erf

from .. import calib


@dataclass(frozen=True)
class SimInstrument:
    name: str
    shape: tuple[int, int]            # raw (ny, nx)
    rows: tuple[int, int]             # light-sensitive rows [r0, r1)
    cols: tuple[int, int]             # light-sensitive columns [c0, c1)
    slit_cols: tuple[int, int]        # columns illuminated through the slit
    gain: float                       # e-/ADU
    read_noise: float                 # e-
    bias_level: float                 # ADU (0 for SofI: reset-subtracted read-out)
    dark: float                       # e-/s/px
    saturation: float                 # ADU (digitiser / linearity limit)
    pixscale: float                   # arcsec per pixel along the slit
    wave_points: tuple                # (rows, wavelengths) anchoring the centre-column dispersion
    x_centre: float                   # column of the reference dispersion
    tilt: tuple[float, float]         # line shift in rows: t1*(x-xc) + t2*(x-xc)^2
    lsf_fwhm_px: float                # instrumental line-spread FWHM in pixels
    medium: str                       # 'air' or 'vacuum'
    sens_setup: str                   # key for calib.nominal_sensitivity
    cr_rate: float                    # cosmic-ray events per second over the whole detector

    @property
    def dispersion_poly(self) -> np.ndarray:
        return _fit_dispersion(self.wave_points)

    def row_to_wave(self, u):
        """Wavelength (Å, in ``medium``) at effective centre-column row ``u``."""
        return np.polyval(self.dispersion_poly, u)

    def effective_row(self, y, x, shift: float = 0.0):
        """u(y, x): the centre-column row with the same wavelength as pixel (y, x)."""
        dx = np.asarray(x, dtype=float) - self.x_centre
        return np.asarray(y, dtype=float) - (self.tilt[0] * dx + self.tilt[1] * dx**2) - shift

    def wavelength_map(self, shift: float = 0.0) -> np.ndarray:
        """True wavelength (Å) of every raw pixel for a frame with flexure ``shift`` (rows)."""
        ny, nx = self.shape
        y, x = np.mgrid[0:ny, 0:nx]
        return self.row_to_wave(self.effective_row(y, x, shift))


@lru_cache(maxsize=None)
def _fit_dispersion(points) -> np.ndarray:
    rows, waves = (np.asarray(p, dtype=float) for p in points)
    return np.polyfit(rows, waves, 3)


EFOSC2 = SimInstrument(
    name="EFOSC2", shape=(1030, 1030), rows=(0, 1024), cols=(6, 1030), slit_cols=(70, 985),
    gain=1.10, read_noise=7.8, bias_level=212.4, dark=0.0005, saturation=65535.0,
    pixscale=0.24,
    wave_points=((0.0, 249.0, 499.0, 749.0, 999.0, 1014.0),
                 (3638.0, 4912.0, 6296.0, 7720.0, 9154.0, 9240.0)),
    x_centre=530.0, tilt=(2.2e-3, 1.5e-6), lsf_fwhm_px=3.2, medium="air",
    sens_setup="EFOSC2_GR13", cr_rate=0.30,
)

SOFI = SimInstrument(
    name="SOFI", shape=(1024, 1024), rows=(0, 1024), cols=(0, 1024), slit_cols=(25, 1005),
    gain=5.4, read_noise=11.3, bias_level=0.0, dark=0.08, saturation=10000.0,
    pixscale=0.288,
    wave_points=((0.0, 255.75, 511.5, 767.25, 1023.0),
                 (16459.0, 14666.0, 12896.0, 11122.0, 9356.0)),
    x_centre=512.0, tilt=(-4.0e-3, 2.0e-6), lsf_fwhm_px=3.4, medium="vacuum",
    sens_setup="SOFI_GB", cr_rate=0.11,
)

INSTRUMENTS = {"EFOSC2": EFOSC2, "SOFI": SOFI}


# --------------------------------------------------------------------------- detector
@dataclass(frozen=True)
class Defects:
    prnu: np.ndarray          # pixel response (mean 1)
    dead: np.ndarray          # bool
    hot: np.ndarray           # dark-current multiplier map (1 = normal)
    bias_pattern: np.ndarray  # ADU, fixed bias structure (EFOSC2)


@lru_cache(maxsize=None)
def detector_defects(name: str) -> Defects:
    """Fixed detector cosmetics (same for every simulated night, as on a real detector)."""
    inst = INSTRUMENTS[name]
    rng = np.random.default_rng(20181205 if name == "EFOSC2" else 20181207)
    ny, nx = inst.shape
    prnu = 1.0 + rng.normal(0.0, 0.012 if name == "EFOSC2" else 0.02, (ny, nx))
    # low-order structure of the response (coating / illumination of the CCD)
    yy, xx = np.mgrid[0:ny, 0:nx] / max(ny, nx)
    prnu *= 1.0 + 0.02 * np.sin(3.1 * xx + 1.0) * np.cos(2.3 * yy)
    dead = np.zeros((ny, nx), bool)
    hot = np.ones((ny, nx))
    bias_pattern = np.zeros((ny, nx), np.float32)
    if name == "EFOSC2":
        for col in (221, 702):                       # two bad (low-response) columns
            prnu[300:, col] *= 0.35
        dead[rng.integers(0, ny, 40), rng.integers(0, nx, 40)] = True
        hot_idx = (rng.integers(0, ny, 60), rng.integers(0, nx, 60))
        hot[hot_idx] = rng.uniform(500, 5000, 60)
        bias_pattern += (1.5 * np.exp(-np.arange(nx) / 25.0))[None, :].astype(np.float32)
        bias_pattern += rng.normal(0, 0.4, nx).astype(np.float32)[None, :]
    else:
        n = int(0.004 * ny * nx)
        dead[rng.integers(0, ny, n // 3), rng.integers(0, nx, n // 3)] = True
        hot[rng.integers(0, ny, n), rng.integers(0, nx, n)] = rng.uniform(50, 3000, n)
    prnu[dead] = 0.0
    for arr in (prnu, dead, hot, bias_pattern):
        arr.setflags(write=False)
    return Defects(prnu, dead, hot, bias_pattern)


def slit_illumination(inst: SimInstrument) -> np.ndarray:
    """Relative illumination along the slit (columns): a gentle gradient and ripple with
    vignetted ends — the 'illumination' part of a flat."""
    x = np.arange(inst.shape[1], dtype=float)
    c0, c1 = inst.slit_cols
    t = (x - c0) / (c1 - c0)
    illum = (1.0 + 0.04 * (t - 0.5) + 0.015 * np.sin(2 * np.pi * 2.3 * t)) \
        * 0.5 * (1 + erf((x - c0) / 6.0)) * 0.5 * (1 + erf((c1 - x) / 6.0))
    return illum


# --------------------------------------------------------------------------- spectra
class FineGrid:
    """A sub-pixel grid in effective row u on which spectra are binned and convolved."""

    def __init__(self, inst: SimInstrument, oversample: int = 4, pad: int = 40):
        self.inst = inst
        self.step = 1.0 / oversample
        ny = inst.shape[0]
        self.edges = np.arange(-pad, ny + pad + self.step / 2, self.step) - self.step / 2
        self.u = 0.5 * (self.edges[1:] + self.edges[:-1])
        self.wave = inst.row_to_wave(self.u)
        self.wave_edges = inst.row_to_wave(self.edges)
        order = np.argsort(self.wave)
        self._w_sorted = self.wave[order]
        self._u_sorted = self.u[order]

    def wave_to_u(self, wave):
        return np.interp(wave, self._w_sorted, self._u_sorted, left=np.nan, right=np.nan)

    def bin_continuum(self, wave_hi, dens_hi):
        """Bin a density (counts/s/Å) sampled on a fine wavelength grid into row bins:
        returns counts/s per row (flux conserving)."""
        dw = np.gradient(wave_hi)
        u = self.wave_to_u(wave_hi)
        ok = np.isfinite(u)
        h, _ = np.histogram(u[ok], bins=self.edges, weights=(dens_hi * dw)[ok])
        return h / self.step

    def bin_lines(self, wave, counts):
        """Delta-function lines (counts/s each) -> counts/s per row of the fine grid.

        Each line's flux is shared linearly between the two grid points around it, so the
        rendered line's centroid is exactly where the truth formula puts it (putting it in
        the nearest bin would move it by up to half a grid step, ~0.6 Å for EFOSC2).
        """
        u = self.wave_to_u(np.asarray(wave, dtype=float))
        c = np.asarray(counts, dtype=float)
        ok = np.isfinite(u)
        t = (u[ok] - self.u[0]) / self.step
        i = np.floor(t).astype(int)
        f = t - i
        n = len(self.u)
        out = np.zeros(n)
        for idx, w in ((i, 1.0 - f), (i + 1, f)):
            good = (idx >= 0) & (idx < n)
            out += np.bincount(idx[good], weights=(c[ok] * w)[good], minlength=n)
        return out / self.step

    def convolve(self, per_row):
        sigma = self.inst.lsf_fwhm_px / 2.3548 / self.step
        return gaussian_filter1d(per_row, sigma, mode="constant")

    def evaluate(self, per_row, u):
        return np.interp(u, self.u, per_row, left=0.0, right=0.0)


def hires_wave(inst: SimInstrument, step: float = 0.25) -> np.ndarray:
    lo, hi = sorted((inst.row_to_wave(-40.0), inst.row_to_wave(inst.shape[0] + 40.0)))
    return np.arange(lo, hi, step)


def to_medium(wave_vac, medium):
    return calib.vacuum_to_air(wave_vac) if medium == "air" else np.asarray(wave_vac, dtype=float)


def from_medium(wave, medium):
    return calib.air_to_vacuum(wave) if medium == "air" else np.asarray(wave, dtype=float)


def sensitivity_factor(inst: SimInstrument, wave) -> np.ndarray:
    """10^(0.4 S): (ADU s^-1 Å^-1) per (erg s^-1 cm^-2 Å^-1), full aperture, outside the
    atmosphere; wave in the instrument medium."""
    t = calib.nominal_sensitivity(inst.sens_setup)
    s = np.interp(wave, np.asarray(t["wavelength"], float), np.asarray(t["sensitivity"], float))
    # roll-off of the order-sorting filter / CCD beyond the tabulated range
    lo, hi = float(np.min(t["wavelength"])), float(np.max(t["wavelength"]))
    s = s - 2.5 * np.clip((lo - wave) / 80.0, 0, None) - 2.5 * np.clip((wave - hi) / 80.0, 0, None)
    return 10 ** (0.4 * s)


def atmosphere(inst: SimInstrument, wave, airmass: float, h2o_scale: float = 1.0) -> np.ndarray:
    """Extinction x telluric transmission at ``airmass`` (wave in the instrument medium)."""
    wave_air = wave if inst.medium == "air" else calib.vacuum_to_air(wave)
    ext = 10 ** (-0.4 * calib.extinction(wave_air) * airmass)
    tel = calib.telluric_transmission(wave, airmass=airmass, h2o_scale=h2o_scale, medium=inst.medium)
    return ext * tel


def slit_loss(seeing_fwhm_arcsec, slit_width: float = 1.0, offset: float = 0.0):
    """Fraction of a Gaussian PSF passing a slit of width ``slit_width`` (arcsec)
    whose centre is ``offset`` arcsec from the star."""
    s = np.asarray(seeing_fwhm_arcsec, dtype=float) / 2.3548 * np.sqrt(2.0)
    return 0.5 * (erf((slit_width / 2 - offset) / s) + erf((slit_width / 2 + offset) / s))


def seeing_at(wave, seeing_5000: float):
    """Seeing FWHM (arcsec) scaling as λ^-0.2 (Kolmogorov)."""
    return seeing_5000 * (np.asarray(wave, dtype=float) / 5000.0) ** -0.2
