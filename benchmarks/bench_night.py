"""Wall time and peak memory of `specred reduce` on a whole two-instrument simulated night
(EFOSC2 + SofI, report included), per stage, and of a second run that reuses everything.

Usage: python benchmarks/bench_night.py [--night 2018-12-05] [--seed 0]

Budget (night issue): <= 60 s for the whole night on 2 cores.
"""
from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

import astropy  # noqa: F401  (before configuring its logger)

BUDGET_S = 60.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--night", default="2018-12-05")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from specred.pipeline import reduce_night
    from specred.simulate import simulate_night

    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_night(tmp, night=a.night, instrument="both", seed=a.seed)
        t0 = time.perf_counter()
        res = reduce_night(Path(tmp) / "raw", Path(tmp) / "red")
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        t0 = time.perf_counter()
        reduce_night(Path(tmp) / "raw", Path(tmp) / "red")
        again = time.perf_counter() - t0
    insts = sorted(set(res.table["instrument"]))
    print(f"night {a.night} seed {a.seed}: {len(sim.raw_files)} raw frames ({', '.join(insts)}), "
          f"{len(res.spectra)} spectra")
    print(f"{'stage':14s} {'wall [s]':>9s}")
    for k, v in res.timings.items():
        if k != "total":
            print(f"{k:14s} {v:9.2f}")
    print(f"{'total':14s} {wall:9.2f}   (budget {BUDGET_S:.0f} s, ratio {wall / BUDGET_S:.2f})")
    print(f"peak memory (simulation + reduction) {peak:.2f} GB")
    print(f"second run (everything up to date, report rewritten): {again:.2f} s")


if __name__ == "__main__":
    main()
