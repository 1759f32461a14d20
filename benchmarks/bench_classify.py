"""Batch classification speed: ``specred classify`` over simulated 1D spectra.

Usage: python benchmarks/bench_classify.py [--n 10000] [--workers 2] [--seed 5] [--out DIR]

Simulates N EFOSC2-like spectra (``simulate --spectra``: random classes, z 0-3.5, S/N 5-50),
then classifies them all with :func:`specred.analysis.classify.classify_spectra` (what the
CLI runs) on ``--workers`` processes, and prints the rate (target: >= 30 spectra/s on the
2-core reference machine), the time per spectrum by class and the class mix against truth.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from specred.analysis.classify import classify_spectra
from specred.simulate import simulate_spectra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--mc", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_classify_"))
    t0 = time.perf_counter()
    if not (out / "truth" / "spectra_truth.ecsv").exists():
        simulate_spectra(out, a.n, seed=a.seed, snr_range=(5.0, 50.0))
    files = sorted((out / "spectra").glob("*.fits"))[:a.n]
    print(f"{len(files)} simulated spectra ready in {time.perf_counter() - t0:.0f} s ({out})")
    t0 = time.perf_counter()
    tab, _ = classify_spectra(files, workers=a.workers, n_mc=a.mc)
    dt = time.perf_counter() - t0
    print(f"specred classify: {len(tab) / dt:.1f} spectra/s on {a.workers} workers "
          f"({dt:.0f} s for {len(tab)}; target >= 30 spectra/s)")
    sec = np.asarray(tab["seconds"], float)
    for c in sorted(set(tab["class"])):
        m = tab["class"] == c
        print(f"  {c:22s} n={int(m.sum()):6d}  median {1e3 * np.median(sec[m]):6.1f} ms/spectrum (one core)")
    print(f"  all                    median {1e3 * np.median(sec):6.1f} ms, mean {1e3 * np.mean(sec):6.1f} ms")


if __name__ == "__main__":
    main()
