"""Time and peak memory of `specred simulate` for a full two-instrument night.

Usage: python benchmarks/bench_simulate.py [--seed N] [--night DATE]

Prints wall time per instrument and for the whole night, frames per second, and the peak
resident memory of the process (ru_maxrss), against the issue's budget (60 s, 4 GB).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

from specred.simulate import simulate_night, simulate_spectra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--night", default="2018-12-05")
    ap.add_argument("--spectra", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for inst in ("efosc2", "sofi", "both"):
            night = a.night if inst != "sofi" else "2018-12-07"
            t0 = time.perf_counter()
            res = simulate_night(f"{tmp}/{inst}", night=night, instrument=inst, seed=a.seed)
            dt = time.perf_counter() - t0
            rows.append((inst, len(res.raw_files), dt))
        t0 = time.perf_counter()
        simulate_spectra(f"{tmp}/spec", a.spectra, seed=a.seed)
        dts = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"{'part':10s} {'frames':>6s} {'wall [s]':>9s} {'frames/s':>9s}")
    for inst, n, dt in rows:
        print(f"{inst:10s} {n:6d} {dt:9.1f} {n / dt:9.2f}")
    print(f"1D spectra: {a.spectra} in {dts:.1f} s ({a.spectra / dts:.0f} spectra/s)")
    both = rows[-1][2]
    print(f"full night: {both:.1f} s of the 60 s budget (ratio {both / 60:.2f}); "
          f"peak memory {peak_gb:.2f} GB of 4 GB (ratio {peak_gb / 4:.2f})")


if __name__ == "__main__":
    main()
