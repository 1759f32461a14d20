"""``specred simulate OUT --spectra N``: flux-calibrated noisy 1D spectra with truth.

The test and benchmark set for the analysis (line fitting, redshifts, classification):
random classes, redshifts 0–3.5 and S/N 3–50, sampled like reduced EFOSC2 Gr#13 (air Å,
~5.6 Å/px, R ~ 355) or SofI blue-grism (vacuum Å, ~6.9 Å/px, R ~ 550) spectra.

Noise model: Gaussian, sky-limited — sigma(λ) ∝ sqrt(sky(λ) / sensitivity(λ)), so noise
rises at the ends of the grism response and on night-sky lines, normalised so the median
continuum S/N per pixel in the reference window (6000–6200 Å EFOSC2, 12000–12200 Å SofI,
observed) equals the drawn S/N.

Output: ``OUT/spectra/sim_NNNNNN.fits`` (specred 1D product format, see
:mod:`specred.spectrum_io`), ``OUT/truth/spectra_truth.ecsv`` (one row per spectrum) and
``OUT/truth/spectra_lines.ecsv`` (every injected line).
"""
from __future__ import annotations

import time as _time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from .. import calib
from ..io import atomic_write_table
from ..spectrum_io import write_spectrum
from . import optics
from .sources import build_source

#: class -> (probability, z range) for EFOSC2-sampled spectra
CLASS_MIX = {
    "SF": (0.24, (0.005, 0.40)), "WR": (0.06, (0.005, 0.30)), "Sy2": (0.08, (0.01, 0.40)),
    "S0": (0.08, (0.005, 0.35)), "E": (0.08, (0.005, 0.35)),
    "QSO": (0.32, (0.10, 3.50)), "LoBAL": (0.05, (1.30, 3.30)), "FeQSO": (0.05, (0.10, 2.20)),
    "unknown": (0.04, (np.nan, np.nan)),
}
#: for SofI-sampled spectra: galaxies shifted so Hα/Paschen fall in 0.93–1.65 µm
CLASS_MIX_SOFI = {
    "SF": (0.25, (0.45, 1.40)), "Sy2": (0.10, (0.45, 1.40)), "QSO": (0.45, (0.40, 3.50)),
    "FeQSO": (0.10, (0.40, 2.20)), "YSO": (0.05, (0.0, 0.0)), "unknown": (0.05, (np.nan, np.nan)),
}
SNR_WINDOW = {"EFOSC2": (6000.0, 6200.0), "SOFI": (12000.0, 12200.0)}


@dataclass
class SpectraResult:
    out: Path
    files: list[Path]
    truth: Table
    lines: Table
    seconds: float


class _Sampler:
    """Sampling of one instrument: wavelength per pixel and LSF convolution."""

    def __init__(self, name: str):
        self.inst = optics.INSTRUMENTS[name]
        self.grid = optics.FineGrid(self.inst)
        self.hires = optics.hires_wave(self.inst, step=0.5)
        self.hires_vac = optics.from_medium(self.hires, self.inst.medium)
        nrow = 1015 if name == "EFOSC2" else 1024
        rows = np.arange(nrow, dtype=float)
        wave = self.inst.row_to_wave(rows)
        order = np.argsort(wave)
        self.rows = rows[order]
        self.wave = wave[order]
        self.dlam = np.abs(np.gradient(self.wave))
        sens = optics.sensitivity_factor(self.inst, self.wave)
        area = self.inst.pixscale
        region = "optical" if self.inst.medium == "air" else "nir"
        sky_rows = self.grid.bin_continuum(self.hires, calib.sky_continuum(
            self.hires if self.inst.medium == "air" else calib.vacuum_to_air(self.hires)) * area)
        lines = calib.sky_lines(region)
        sky_rows = sky_rows + self.grid.bin_lines(np.asarray(lines["wavelength"], float),
                                                  np.asarray(lines["flux"], float) * area)
        sky = self.grid.evaluate(self.grid.convolve(sky_rows), self.rows) / self.dlam
        # relative noise shape: sqrt(sky counts)/sensitivity, plus a floor for read noise
        self.noise_shape = np.sqrt(sky * sens + 0.05 * np.median(sky * sens)) / sens
        lo, hi = SNR_WINDOW[name]
        self.win = (self.wave >= lo) & (self.wave <= hi)

    def observe(self, src) -> np.ndarray:
        """Noiseless LSF-convolved flux density per Å at the pixel wavelengths."""
        f = src.f_lambda(self.hires_vac)
        per_row = self.grid.convolve(self.grid.bin_continuum(self.hires, f))
        return self.grid.evaluate(per_row, self.rows) / self.dlam

    def noisy(self, src, snr: float, rng) -> tuple[np.ndarray, np.ndarray, float]:
        """(flux, sigma, reference continuum) of ``src`` observed with the sky-limited noise
        model, normalised to median continuum S/N ``snr`` per pixel in the reference window."""
        model = self.observe(src)
        cont = src.continuum_flux(optics.from_medium(self.wave, self.inst.medium))
        ref = float(np.median(cont[self.win]))
        sigma = self.noise_shape * (ref / snr / float(np.median(self.noise_shape[self.win])))
        return model + rng.standard_normal(model.size) * sigma, sigma, ref


def _draw_class(rng, mix):
    names = list(mix)
    p = np.array([mix[n][0] for n in names])
    k = names[rng.choice(len(names), p=p / p.sum())]
    lo, hi = mix[k][1]
    z = float(rng.uniform(lo, hi)) if np.isfinite(lo) else float("nan")
    return k, z


def simulate_spectra(out, n: int, seed: int = 0, instrument: str = "efosc2", snr_range=(3.0, 50.0),
                     progress=None) -> SpectraResult:
    """Write ``n`` simulated 1D spectra with truth (see module docstring).

    ``instrument``: 'efosc2', 'sofi' or 'both' (80 % EFOSC2, 20 % SofI sampling).
    """
    t0 = _time.perf_counter()
    out = Path(out)
    (out / "spectra").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    samplers = {}
    ss = np.random.SeedSequence(seed)
    rows, line_rows, files = [], [], []
    it = range(n) if progress is None else progress(range(n), desc="simulate spectra", unit="spec")
    for i, child in zip(it, ss.spawn(n)):
        rng = np.random.default_rng(child)
        inst = instrument.upper()
        if inst == "BOTH":
            inst = "EFOSC2" if rng.random() < 0.8 else "SOFI"
        if inst not in samplers:
            samplers[inst] = _Sampler(inst)
        smp = samplers[inst]
        kind, z = _draw_class(rng, CLASS_MIX if inst == "EFOSC2" else CLASS_MIX_SOFI)
        sid = f"sim_{i:06d}"
        src = build_source(sid, kind, z, rng, f6100=1e-16 if inst == "EFOSC2" and kind != "YSO" else None,
                           f12100=1e-16 if inst == "SOFI" else None)
        snr = float(np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]))))
        flux, sigma, ref = smp.noisy(src, snr, rng)
        path = out / "spectra" / f"{sid}.fits"
        write_spectrum(path, smp.wave, flux, sigma, medium=smp.inst.medium,
                       header={"OBJECT": sid, "INSTRUME": "EFOSC" if inst == "EFOSC2" else "SOFI",
                               "ORIGIN": "specred simulate --spectra", "SIMSEED": seed,
                               "LSFPIX": (smp.inst.lsf_fwhm_px, "[pixel] instrumental line-spread FWHM")})
        files.append(path)
        tr = src.truth
        rows.append({"id": sid, "file": path.name, "instrument": inst, "kind": kind, "z": src.z, "snr": snr,
                     "medium": smp.inst.medium, "wr": bool(tr.get("wr", False)), "bal": bool(src.troughs),
                     "lobal": bool(src.troughs), "oh12": float(tr.get("oh12", np.nan) or np.nan),
                     "ebv": float(tr.get("ebv", np.nan)), "log_nii_oii": float(tr.get("log_nii_oii", np.nan)),
                     "noise_at_ref": float(np.median(sigma[smp.win])), "cont_at_ref": ref})
        for r in src.line_table_rows():
            r["id"] = sid
            line_rows.append(r)
    truth = Table(rows=rows)
    truth.meta["description"] = "Truth of simulated 1D spectra (snr: median continuum S/N per pixel in the reference window)."
    truth.meta["seed"] = seed
    lines = Table(rows=line_rows)
    lines.meta["description"] = "Injected lines: rest and observed vacuum wavelength (Å), flux (erg/s/cm2), FWHM (km/s)."
    atomic_write_table(truth, out / "truth" / "spectra_truth.ecsv")
    atomic_write_table(lines, out / "truth" / "spectra_lines.ecsv")
    return SpectraResult(out, files, truth, lines, _time.perf_counter() - t0)


def simulate_programme_spectra(out, seed: int = 0, instruments=("EFOSC2", "SOFI"), snr_range=(10.0, 30.0),
                               unknown_snr=(2.0, 3.0)) -> SpectraResult:
    """1D spectra of the programme's 36 targets (Solarz et al. 2020, Table 2/3: class,
    redshift, WR flag, abundance) as if reduced: ``OUT/spectra/<object_id>_<INSTRUMENT>.fits``
    with OBJECT, RA and DEC in the header, and the truth tables.  S/N per pixel in the
    reference window drawn from ``snr_range`` (the programme's exposures gave 10–30), the
    unidentified objects from ``unknown_snr`` (~2–3 in the paper).  SofI spectra only for the
    targets of the SofI observing log."""
    from .night import make_source
    from .programme import programme_obslog, programme_targets

    t0 = _time.perf_counter()
    out = Path(out)
    (out / "spectra").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    targets = programme_targets()
    obslog = programme_obslog()
    sofi_ids = {str(r["object_id"]) for r in obslog if str(r["instrument"]).upper() == "SOFI"}
    samplers = {}
    rows, line_rows, files = [], [], []
    for k, (row, child) in enumerate(zip(targets, np.random.SeedSequence(seed).spawn(len(targets)))):
        rng = np.random.default_rng(child)
        oid = str(row["object_id"])
        src = make_source(row, rng)
        for inst in instruments:
            inst = inst.upper()
            if inst == "SOFI" and oid not in sofi_ids:
                continue
            if inst == "EFOSC2" and src.kind == "YSO":
                continue             # the paper's YSO was observed in the near-IR only
            smp = samplers.setdefault(inst, _Sampler(inst))
            lo, hi = unknown_snr if src.kind == "unknown" else snr_range
            snr = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            flux, sigma, _ = smp.noisy(src, snr, rng)
            path = out / "spectra" / f"{oid}_{inst}.fits"
            write_spectrum(path, smp.wave, flux, sigma, medium=smp.inst.medium,
                           header={"OBJECT": oid, "RA": float(row["ra"]), "DEC": float(row["dec"]),
                                   "INSTRUME": "EFOSC" if inst == "EFOSC2" else "SOFI",
                                   "ORIGIN": "specred simulate (programme 1D)", "SIMSEED": seed,
                                   "LSFPIX": (smp.inst.lsf_fwhm_px, "[pixel] instrumental line-spread FWHM")})
            files.append(path)
            tr = src.truth
            rows.append({"id": f"{oid}_{inst}", "object_id": oid, "file": path.name, "instrument": inst,
                         "kind": src.kind, "paper_class": str(row["classification"]), "z": src.z, "snr": snr,
                         "wr": bool(tr.get("wr", False)), "lobal": bool(src.troughs),
                         "oh12": float(tr.get("oh12", np.nan) or np.nan)})
            for r in src.line_table_rows():
                r["id"] = f"{oid}_{inst}"
                line_rows.append(r)
    truth = Table(rows=rows)
    truth.meta["description"] = "Truth of the simulated programme 1D spectra (Solarz et al. 2020 targets)."
    truth.meta["seed"] = seed
    lines = Table(rows=line_rows)
    atomic_write_table(truth, out / "truth" / "programme_truth.ecsv")
    atomic_write_table(lines, out / "truth" / "programme_lines.ecsv")
    return SpectraResult(out, files, truth, lines, _time.perf_counter() - t0)
