"""Line-fitting and automatic-redshift speed, against specutils ``fit_lines`` in the same run.

Usage: python benchmarks/bench_line_fit.py [--n 200] [--seed 11] [--out DIR]

Simulates N EFOSC2-like 1D spectra (``specred simulate --spectra``), keeps the emission-line
galaxies (SF, WR, Sy2, S0) and fits the BPT lines (Hβ, [O III] 4959/5007, [O I], [N II]
6548/6584, Hα, [S II] 6717/6731) at the true redshift on one core:

* specred: :func:`specred.analysis.fit_lines` (one vectorised model, variable projection,
  bounded Levenberg-Marquardt on the shift and width);
* baseline: ``specutils.fitting.fit_lines`` on the same pixels with a compound astropy model
  (constant + 9 Gaussian1D, centres and widths tied to Hα in velocity), started at the true
  redshift.

Prints both rates, their ratio and the accuracy of each against the injected fluxes
(median |Δflux|/flux for lines with S/N > 10), then the rate of the full automatic redshift
(:func:`specred.analysis.find_redshift`) over all N spectra.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.modeling import models

from specred.analysis import find_redshift, fit_lines, load_spectrum
from specred.analysis import lines as L
from specred.simulate import simulate_spectra

KEY = ("Hbeta", "OIII_5007", "Halpha", "NII_6584", "SII_6717", "SII_6731")


def specutils_fit(spec, z):
    from specutils import Spectrum
    from specutils.fitting import fit_lines as su_fit
    names = L.BPT_LINES
    lam = L.rest_vac(names) * (1 + z)
    sel = np.zeros(spec.wave.size, bool)
    for x in lam:
        sel |= np.abs(spec.wave - x) < 60
    sel &= spec.good
    scale = 1e17
    flam = u.Unit("erg s-1 cm-2 AA-1")
    sp = Spectrum(flux=spec.flux[sel] * scale * flam, spectral_axis=spec.wave[sel] * u.AA)
    m = models.Const1D(np.median(spec.flux[sel]) * scale * flam)
    for x in lam:
        m = m + models.Gaussian1D(amplitude=1.0 * flam, mean=x * u.AA, stddev=x * 450 / 3e5 * u.AA)
    ia = names.index("Halpha") + 1
    for k, x in enumerate(lam):
        if k + 1 == ia:
            continue
        m[k + 1].mean.tied = (lambda mm, r=x / lam[ia - 1]: mm[ia].mean * r)
        m[k + 1].stddev.tied = (lambda mm, r=x / lam[ia - 1]: mm[ia].stddev * r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = su_fit(sp, m, weights=1.0 / (spec.sigma[sel] * scale))
    out = {}
    for k, n in enumerate(names):
        g = fitted[k + 1]
        out[n] = float(np.sqrt(2 * np.pi) * g.amplitude.value * abs(g.stddev.value)) / scale
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_line_fit_"))
    res = simulate_spectra(out, a.n, seed=a.seed, snr_range=(5.0, 50.0))
    truth = res.truth
    lines = res.lines
    specs = [(load_spectrum(out / "spectra" / f"{r['id']}.fits"), float(r["z"]), r["id"]) for r in truth
             if r["kind"] in ("SF", "WR", "Sy2", "S0")]
    tflux = {(r["id"], r["line"]): float(r["flux"]) for r in lines}

    def accuracy(results):
        rel = []
        for sid, fl in results:
            for n in KEY:
                t = tflux.get((sid, n))
                f, e = fl[n]
                if t and np.isfinite(f) and np.isfinite(e) and t / e > 10:
                    rel.append(abs(f - t) / t)
        return float(np.median(rel)), len(rel)

    t0 = time.perf_counter()
    ours = []
    for s, z, sid in specs:
        r = fit_lines(s, z)
        ours.append((sid, {n: (r[n].flux, r[n].flux_err) for n in KEY}))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = []
    for s, z, sid in specs:
        fl = specutils_fit(s, z)
        base.append((sid, {n: (fl[n], dict(ours)[sid][n][1]) for n in KEY}))
    t_base = time.perf_counter() - t0
    r_ours, r_base = len(specs) / t_ours, len(specs) / t_base
    acc_o, n_o = accuracy(ours)
    acc_b, n_b = accuracy(base)
    print(f"{len(specs)} emission-line galaxies, BPT lines at the true z, one core")
    print(f"  specred fit_lines        : {r_ours:7.1f} spectra/s   median |dF|/F (S/N>10 lines) {acc_o:.3f} ({n_o} lines)")
    print(f"  specutils fit_lines      : {r_base:7.1f} spectra/s   median |dF|/F (S/N>10 lines) {acc_b:.3f} ({n_b} lines)")
    print(f"  ratio specred/specutils  : {r_ours / r_base:7.1f}x  (target >= 20x; >= 50 spectra/s required)")
    t0 = time.perf_counter()
    for r in truth:
        find_redshift(load_spectrum(out / "spectra" / f"{r['id']}.fits"))
    t_z = time.perf_counter() - t0
    print(f"  automatic redshift       : {len(truth) / t_z:7.1f} spectra/s over all {len(truth)} spectra (incl. reading)")


if __name__ == "__main__":
    main()
