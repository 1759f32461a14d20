"""Time of find_objects + fit_trace + fit_sky + optimal extraction on one 1024 x 850 frame.

Usage: python benchmarks/bench_trace_extract.py [--repeat N] [--nx 850] [--ny 1024]

The synthetic frame (tilted/curved trace, emission lines, tilted sky lines, cosmic rays)
comes from ``tests/test_trace_extract.make_frame``.  Prints the best-of-N wall time of
each step, for both sky methods, and the ratio of the whole chain to the 1 s budget of the
issue (baseline: 1.0 s per frame).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_trace_extract import RN, make_frame  # noqa: E402

from specred.reduce import extract, skysub, trace  # noqa: E402

BUDGET_S = 1.0


def best_of(n, fn):
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--nx", type=int, default=850)
    ap.add_argument("--ny", type=int, default=1024)
    a = ap.parse_args()
    fr = make_frame(1, ny=a.ny, nx=a.nx, objects=((a.nx / 2, 1.0),), n_cr=80)
    d, v, m = fr["data"], fr["var"], fr["mask"]
    t_find, cands = best_of(a.repeat, lambda: trace.find_objects(d, v, m))
    t_trace, tr = best_of(a.repeat, lambda: trace.fit_trace(d, v, m, cands[0][0]))
    excl = skysub.object_mask(d.shape, tr, 3 * tr.fwhm)
    t_wave, (sky, svar) = best_of(a.repeat, lambda: skysub.fit_sky(d, v, m, excl, wavemap=fr["wavemap"]))
    t_rows, _ = best_of(a.repeat, lambda: skysub.fit_sky(d, v, m, excl))
    hw = 2.5 * tr.fwhm
    t_opt, _ = best_of(a.repeat, lambda: extract.optimal_extract(d - sky, v + svar, m, tr, half_width=hw,
                                                                 read_noise=RN, sky=sky))
    t_box, _ = best_of(a.repeat, lambda: extract.boxcar_extract(d - sky, v + svar, m, tr, hw))
    print(f"frame {a.ny} x {a.nx}, best of {a.repeat}")
    for name, t in (("find_objects", t_find), ("fit_trace", t_trace), ("fit_sky (wavelength)", t_wave),
                    ("fit_sky (rows)", t_rows), ("optimal_extract", t_opt), ("boxcar_extract", t_box)):
        print(f"  {name:22s} {t * 1e3:8.1f} ms")
    for label, tsky in (("wavelength sky", t_wave), ("rows sky", t_rows)):
        tot = t_find + t_trace + tsky + t_opt
        print(f"whole chain ({label}): {tot:.3f} s, ratio to the {BUDGET_S:.0f} s budget {tot / BUDGET_S:.2f}")


if __name__ == "__main__":
    main()
