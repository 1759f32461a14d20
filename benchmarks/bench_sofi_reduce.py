"""Wall time and peak memory of the SofI blue-grism part of a simulated night, per stage.

Usage: python benchmarks/bench_sofi_reduce.py [--night 2018-12-07] [--seed 0] [--repeat 1]

The night holds the programme's SofI targets of that date, each an ABBA sequence, their
A0V telluric stars (ABBA), a spectrophotometric standard, lamp-on/off flats and Xe arcs.
Stages: discover, flat (lamp-on − lamp-off), wavecal (Xe), abba (process, pair-subtract,
shift, median-combine), trace, sky (residual along the slit), extract (optimal), telluric,
fluxcal (sensitivity, products).

Budget (SofI issue): <= 20 s wall for the SofI part of a night on 2 cores (report.html not
included: see benchmarks/bench_night.py).
"""
from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

import astropy  # noqa: F401  (before configuring its logger)

BUDGET_S = 20.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--night", default="2018-12-07")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="reduce the same frames N times, report the best")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from specred.pipeline import reduce_night
    from specred.simulate import simulate_night

    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_night(tmp, night=a.night, instrument="sofi", seed=a.seed)
        n = len(sim.raw_files)
        best = None
        for k in range(a.repeat):
            t0 = time.perf_counter()
            res = reduce_night(Path(tmp) / "raw", Path(tmp) / f"red{k}", report=False)
            wall = time.perf_counter() - t0
            if best is None or wall < best[0]:
                best = (wall, res)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    wall, res = best
    kinds = [s.meta["kind"] for s in res.spectra]
    print(f"SofI GB night {a.night} seed {a.seed}: {n} raw frames, {len(res.spectra)} spectra "
          f"({kinds.count('science')} science, {kinds.count('telluric_standard')} telluric, "
          f"{kinds.count('flux_standard')} flux standard)")
    print(f"{'specred stage':14s} {'wall [s]':>9s}")
    for k, v in res.timings.items():
        if k != "total":
            print(f"{k:14s} {v:9.2f}")
    print(f"{'total':14s} {wall:9.2f}   (budget {BUDGET_S:.0f} s, ratio {wall / BUDGET_S:.2f})")
    print(f"peak memory (simulation + reduction) {peak:.2f} GB")


if __name__ == "__main__":
    main()
