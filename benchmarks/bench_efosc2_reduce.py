"""Wall time and peak memory of the EFOSC2 part of a simulated night, per stage, against a
straightforward ccdproc-based reduction of the same frames run in the same process.

Usage: python benchmarks/bench_efosc2_reduce.py [--night 2018-12-05] [--seed 0]

The baseline is what one writes with the field's standard tools and no special care:
``ccdproc.subtract_overscan`` + ``trim_image`` for every frame, ``ccdproc.combine``
(median, sigma-clipped) for the master bias and flat, ``ccd_process`` (gain, read noise,
bias, flat, uncertainty), ``cosmicray_lacosmic`` on every standard/science frame, then a
fixed-width boxcar extraction at the brightest column with the median sky of two side
bands.  It does less than specred (no wavelength solution, no optimal extraction, no flux
calibration) — the ratio is an upper bound on specred's overhead.

Budget (issue): <= 30 s wall and <= 3 GB peak for about 25 frames on 2 cores.
"""
from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

import astropy  # noqa: F401  (before configuring its logger)
import numpy as np

BUDGET_S, BUDGET_GB = 30.0, 3.0


def baseline_ccdproc(raw_dir: Path) -> tuple[float, dict]:
    import astropy.units as u
    import ccdproc
    from astropy.nddata import CCDData

    from specred.discover import discover
    from specred.instruments import get_instrument

    t = {}
    t0 = time.perf_counter()
    found = discover(raw_dir)
    frames = [f for f in found.frames if f.instrument == "EFOSC2"]
    geom = get_instrument("EFOSC2").geometry(__import__("astropy.io.fits").io.fits.getheader(frames[0].path))
    ov_rows = geom.overscan[0]
    tr = "[{}:{},{}:{}]".format(geom.trim_section[1].start + 1, geom.trim_section[1].stop,
                                geom.trim_section[0].start + 1, geom.trim_section[0].stop)

    def basic(f):
        ccd = CCDData.read(f.path, unit="adu")
        ccd = ccdproc.subtract_overscan(ccd, overscan=ccd[ov_rows, :], overscan_axis=0, median=True)
        return ccdproc.trim_image(ccd, fits_section=tr)

    t["discover"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bias = ccdproc.combine([basic(f) for f in frames if f.frame_type == "bias"], method="median",
                           sigma_clip=True, mem_limit=2e9)
    bias.unit = u.adu
    t["bias"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    flats = [ccdproc.subtract_bias(basic(f), bias) for f in frames if f.frame_type == "flat"]
    flat = ccdproc.combine(flats, method="median", sigma_clip=True, scale=lambda a: 1 / np.ma.median(a))
    flat.unit = u.adu
    t["flat"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _ = [ccdproc.subtract_bias(basic(f), bias) for f in frames if f.frame_type == "arc"]
    t["arcs"] = time.perf_counter() - t0
    tc = te = 0.0
    for f in frames:
        if f.frame_type not in ("science", "flux_standard"):
            continue
        t0 = time.perf_counter()
        ccd = ccdproc.ccd_process(basic(f), master_bias=bias, master_flat=flat, gain=geom.gain * u.electron / u.adu,
                                  readnoise=geom.read_noise * u.electron, error=True, gain_corrected=False)
        ccd = ccdproc.cosmicray_lacosmic(ccd, sigclip=5.0, objlim=5.0, readnoise=geom.read_noise)
        tc += time.perf_counter() - t0
        t0 = time.perf_counter()
        data = np.where(ccd.mask, np.nan, ccd.data)
        prof = np.nanmedian(data, axis=0)
        x = int(np.nanargmax(prof - np.nanmedian(prof)))
        sky = np.nanmedian(np.hstack([data[:, max(x - 40, 0):x - 20], data[:, x + 20:x + 40]]), axis=1)
        _ = np.nansum(data[:, x - 8:x + 9] - sky[:, None], axis=1)
        te += time.perf_counter() - t0
    t["ccd+cosmics"] = tc
    t["extract"] = te
    return sum(t.values()), t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--night", default="2018-12-05")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from specred.pipeline import reduce_night
    from specred.simulate import simulate_night

    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_night(tmp, night=a.night, instrument="efosc2", seed=a.seed)
        n = len(sim.raw_files)
        t0 = time.perf_counter()
        res = reduce_night(Path(tmp) / "raw", Path(tmp) / "red")
        ours = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        base, bt = baseline_ccdproc(Path(tmp) / "raw")
    print(f"EFOSC2 night {a.night} seed {a.seed}: {n} raw frames, {len(res.spectra)} spectra")
    print(f"{'specred stage':14s} {'wall [s]':>9s}")
    for k, v in res.timings.items():
        if k != "total":
            print(f"{k:14s} {v:9.2f}")
    print(f"{'total':14s} {ours:9.2f}   (budget {BUDGET_S:.0f} s, ratio {ours / BUDGET_S:.2f})")
    print(f"peak memory (reduction) {peak:.2f} GB (budget {BUDGET_GB:.0f} GB)")
    print(f"\n{'ccdproc baseline':14s} {'wall [s]':>9s}")
    for k, v in bt.items():
        print(f"{k:14s} {v:9.2f}")
    print(f"{'total':14s} {base:9.2f}")
    print(f"\nspecred / ccdproc baseline wall-time ratio: {ours / base:.2f}")


if __name__ == "__main__":
    main()
