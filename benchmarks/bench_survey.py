"""Survey-scale throughput: ``classify_survey`` on N simulated spectra with 1 and 2 workers.

Usage: python benchmarks/bench_survey.py [--n 100000] [--chunk 500] [--engine pool|dask] [--out DIR]
                                         [--report FILE.md] [--workers 1 2]

Simulates N EFOSC2-like 1D spectra (the ``simulate --spectra`` mix: random classes, z 0-3.5,
S/N 5-50) straight into Parquet tables of spectra (5000 per file, row groups of ``--chunk``),
then classifies them with 1 and with 2 workers into fresh part folders and prints
throughput, the 2-worker scaling efficiency (rate2 / (2 rate1)), the peak resident memory
of any worker and an extrapolation from the measured per-core rate: spectra per hour per
core and the cores needed for 4 million spectra in one 10-hour night.  ``--report`` also
writes that as a Markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def simulate_tables(out: Path, n: int, seed: int, per_file: int, row_group: int) -> list[Path]:
    from specred.simulate.sources import build_source
    from specred.simulate.spectra1d import CLASS_MIX, _draw_class, _Sampler
    from specred.survey import write_spectra_table

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(out.glob("spectra_*.parquet"))
    if len(files) * per_file >= n:
        return files[: -(-n // per_file)]
    smp = _Sampler("EFOSC2")
    lsf = smp.inst.lsf_fwhm_px * np.abs(np.gradient(smp.wave))
    ss = np.random.SeedSequence(seed).spawn(n)
    files = []
    for f0 in range(0, n, per_file):
        flux, ivar, ids = [], [], []
        for i in range(f0, min(f0 + per_file, n)):
            rng = np.random.default_rng(ss[i])
            kind, z = _draw_class(rng, CLASS_MIX)
            src = build_source(f"sim_{i:07d}", kind, z, rng, f6100=1e-16)
            snr = float(np.exp(rng.uniform(np.log(5.0), np.log(50.0))))
            f, s, _ = smp.noisy(src, snr, rng)
            flux.append(f)
            ivar.append(1.0 / s ** 2)
            ids.append(f"sim_{i:07d}")
        files.append(write_spectra_table(out / f"spectra_{f0 // per_file:04d}.parquet", smp.wave, flux, ivar, ids,
                                         medium=smp.inst.medium, lsf_fwhm_aa=lsf, instrument="EFOSC",
                                         row_group=row_group))
    return files


def main():
    from specred.survey import classify_survey

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--engine", default="pool", choices=["pool", "dask"])
    ap.add_argument("--mc", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="worker counts to run (default 1 2; the efficiency needs both)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_survey_"))
    t0 = time.perf_counter()
    tables = simulate_tables(out / "input", a.n, a.seed, per_file=5000, row_group=a.chunk)
    print(f"{a.n} simulated spectra in {len(tables)} Parquet tables ready in {time.perf_counter() - t0:.0f} s ({out})")
    rates, peaks = {}, {}
    for w in a.workers:
        run = out / f"run_{w}w_{time.strftime('%H%M%S')}"
        res = classify_survey(tables, run, chunk_size=a.chunk, engine=a.engine, workers=w, dask_local=w,
                              n_mc=a.mc, merge=True)
        n = len(res.table)
        rates[w] = n / res.seconds
        peaks[w] = max(s["maxrss_mb"] for s in res.stats)
        print(f"{w} worker(s): {n} spectra in {res.seconds:.0f} s = {rates[w]:.1f} spectra/s; "
              f"peak worker memory {peaks[w]:.0f} MB")
    if not (1 in rates and 2 in rates):
        return
    eff = rates[2] / (2 * rates[1])
    per_core_h = rates[2] / 2 * 3600
    night_h = 10.0
    cores = int(np.ceil(4e6 / (per_core_h * night_h)))
    lines = ["| quantity | value |", "|---|---|",
             f"| spectra | {a.n} (EFOSC2 mix, S/N 5-50, {a.mc} MC draws) |",
             f"| 1 worker | {rates[1]:.1f} spectra/s |",
             f"| 2 workers | {rates[2]:.1f} spectra/s |",
             f"| scaling efficiency (2 workers) | {100 * eff:.0f} % |",
             f"| peak memory per worker | {max(peaks.values()):.0f} MB |",
             f"| spectra per hour per core (2-worker rate / 2) | {per_core_h:,.0f} |",
             f"| cores for 4 million spectra in a {night_h:.0f}-hour night | {cores:.0f} |"]
    print("\n".join(lines))
    if a.report:
        Path(a.report).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
