"""The ``specred`` command: one sub-command per user task.

Errors a user can cause (``SpecredError``) are printed on one line without a traceback
and give exit status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .errors import SpecredError

log = logging.getLogger("specred")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced,
    e.g. by a notebook or a test harness, after the CLI was first called)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger("specred")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # astropy installs its own logger class on import; import it first so that
    # the level we set here is not replaced later.
    import astropy  # noqa: F401

    for noisy in ("astropy", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # per-step diagnostics of the algorithms only with --verbose; the pipeline's own
    # one-line-per-target progress is always shown
    logging.getLogger("specred.reduce").setLevel(logging.DEBUG if verbose else logging.WARNING)


def cmd_simulate(args) -> int:
    from .progress import progress
    from .simulate import simulate_night, simulate_spectra

    if args.spectra:
        res = simulate_spectra(args.out, args.spectra, seed=args.seed,
                               instrument=args.instrument if args.instrument != "both" else "efosc2",
                               progress=progress)
        print(f"wrote {len(res.files)} spectra to {Path(args.out) / 'spectra'} and truth to "
              f"{Path(args.out) / 'truth'} in {res.seconds:.1f} s")
        return 0
    res = simulate_night(args.out, night=args.night, instrument=args.instrument, seed=args.seed,
                         progress=progress)
    print(f"wrote {len(res.raw_files)} raw frames to {Path(args.out) / 'raw'} and truth to "
          f"{Path(args.out) / 'truth'} in {res.seconds:.1f} s")
    return 0


def cmd_inspect(args) -> int:
    from .discover import discover, inspect_report

    result = discover(args.raw)
    print(inspect_report(result))
    return 0


def _night_summary(res) -> str:
    t = res.table
    lines = [f"{'target':12s} {'inst':6s} {'kind':17s} {'exptime':>7s} {'airmass':>7s} {'S/N':>6s} "
             f"{'at [Å]':11s} {'rms[px]':>7s} {'standard':10s} flags"]
    for r in t:
        lines.append(f"{r['target']:12s} {r['instrument']:6s} {r['kind'] or '-':17s} {r['exptime']:7.0f} "
                     f"{r['airmass']:7.3f} {r['snr']:6.1f} {r['snr_window']:11s} {r['wave_rms_px']:7.3f} "
                     f"{r['standard'][:10]:10s} {r['flags']}")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items() if k != "total")
    lines.append(f"wall time {res.timings['total']:.1f} s ({stages})")
    for p in res.problems:
        lines.append(f"skipped: {p}")
    return "\n".join(lines)


def _catalogue_table(table) -> str:
    """Science targets beside the programme's published redshift and class (Solarz et al.
    2020, Table 2); the recovered values join this table when the analysis lands."""
    from .targets import load_targets

    cat = load_targets()
    cls = dict(zip(cat.ids, cat.cls))
    lines = [f"{'target':12s} {'inst':6s} {'S/N':>6s} {'z (paper)':>9s}  class (paper)"]
    for r in table[table["kind"] == "science"]:
        mid = str(r["match_id"])
        z = f"{r['z_cat']:9.4f}" if mid and r["z_cat"] == r["z_cat"] else f"{'–':>9s}"
        lines.append(f"{r['target']:12s} {r['instrument']:6s} {r['snr']:6.1f} {z}  {cls.get(mid, 'not in the list')}")
    return "\n".join(lines)


def cmd_reduce(args) -> int:
    from .pipeline import reduce_night
    from .progress import progress

    res = reduce_night(args.raw, args.out, config=args.config, targets=args.targets, force=args.force,
                       report=not args.no_report, progress=progress)
    print(_night_summary(res))
    out = Path(args.out)
    print(f"products in {out / 'spectra'}, night table {out / 'night.ecsv'}, log {out / 'specred.log'}"
          + (f", report {out / 'report.html'}" if (out / "report.html").exists() and not args.no_report else ""))
    return 0


def cmd_wavecal(args) -> int:
    from .reduce.wavecal import wavecal_file

    sol = wavecal_file(args.arc, args.out, instrument=args.instrument)
    lo, hi = float(sol.map().min()), float(sol.map().max())
    print(f"{Path(args.arc).name}: {sol.n_lines} lines, RMS {sol.rms_px:.3f} px = {sol.rms_aa:.3f} Å ({sol.medium}), "
          f"{lo:.0f}-{hi:.0f} Å" + (f"; map written to {args.out}" if args.out else ""))
    return 0


def cmd_demo(args) -> int:
    import os

    import numpy as np

    from .discover import discover, inspect_report
    from .progress import progress
    from .simulate import simulate_night

    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"specred {__version__} demo: simulating the programme night 2018-12-05 "
          f"(EFOSC2) and the nearest SofI night into {out}/")
    res = simulate_night(out, night="2018-12-05", instrument="both", seed=args.seed, progress=progress)
    print(f"  {len(res.raw_files)} raw frames in {res.seconds:.1f} s\n")
    print(inspect_report(discover(out / "raw")))
    from .pipeline import reduce_night

    print(f"\nreducing the night (EFOSC2 and SofI) into {out / 'reduced'}/ ...")
    red = reduce_night(out / "raw", out / "reduced", progress=progress)
    print(_night_summary(red))
    print("\n" + _catalogue_table(red.table))
    rep = out / "reduced" / "report.html"
    if rep.exists():
        print(f"\nnight report: {rep.resolve().as_uri()}")
    spectra = sorted((out / "reduced" / "spectra").glob("*.fits"))
    if spectra:
        from .analysis.classify import classify_spectra, write_plots
        from .io import atomic_write_table

        print(f"\nclassifying the {len(spectra)} reduced spectra (redshift, BPT, WR, BAL, R23) ...")
        tab, objs = classify_spectra(spectra, workers=min(2, os.cpu_count() or 1), keep_objects=True)
        atomic_write_table(tab, out / "reduced" / "classes.ecsv")
        write_plots(tab, objs, out / "reduced" / "classes")
        for r in tab:
            z = f"{r['z']:.4f} ± {r['z_err']:.4f}" if np.isfinite(r["z"]) else "—"
            print(f"  {str(r['target_id'] or Path(r['file']).stem):14s} z = {z:18s} {r['class']:22s} "
                  f"{r['flags']}")
        print(f"classes: {out / 'reduced' / 'classes.ecsv'}, plots in {out / 'reduced' / 'classes'}/")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specred", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"specred {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="more log output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("simulate", help="simulate a raw NTT night (or 1D spectra) with known truth")
    s.add_argument("out", help="output folder (raw/ and truth/ are written inside)")
    s.add_argument("--night", default="2018-12-05", help="UT date of the programme night (default 2018-12-05)")
    s.add_argument("--instrument", default="both", choices=["efosc2", "sofi", "both"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spectra", type=int, default=0, metavar="N",
                   help="instead of raw frames, write N flux-calibrated 1D spectra with truth")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("inspect", help="list and check the frames of a raw night")
    s.add_argument("raw", help="folder with raw FITS files (searched recursively)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("reduce", help="reduce a night of EFOSC2 Gr#13 and SofI blue-grism spectra to flux-calibrated 1D spectra")
    s.add_argument("raw", help="folder with raw FITS files (searched recursively)")
    s.add_argument("--out", required=True, help="output folder (spectra/, calibrations/, night.ecsv)")
    s.add_argument("--config", default=None, help="YAML file overriding pipelines/efosc2_gr13.yaml / sofi_gb.yaml "
                   "(top level: the parameters, or efosc2:/sofi: sections)")
    s.add_argument("--targets", default=None,
                   help="target list (ECSV/CSV with id, ra, dec[, z]) to name spectra by position; "
                        "default: the programme's examples/targets.ecsv")
    s.add_argument("--force", action="store_true", help="redo every set-up even if its products are up to date")
    s.add_argument("--no-report", action="store_true", help="skip report.html and the QC plots")
    s.set_defaults(func=cmd_reduce)

    s = sub.add_parser("wavecal", help="wavelength-calibrate one arc frame and write its wavelength map")
    s.add_argument("arc", help="arc FITS file (raw or already trimmed)")
    s.add_argument("--out", default=None,
                   help="wavelength map to write (Å for every pixel of the input; EFOSC2 air, SofI vacuum)")
    s.add_argument("--instrument", default=None, choices=["efosc2", "sofi"],
                   help="override the instrument read from the header")
    s.set_defaults(func=cmd_wavecal)

    s = sub.add_parser("fit", help="fit lines interactively (IRAF splot keys; ? lists them) or, with --batch, "
                                   "fit the catalogue lines and write a table")
    s.add_argument("spectrum", nargs="+",
                   help="1D spectrum: specred product, SDSS spec-*.fits, IRAF 1D image or ECSV table "
                        "(interactive: several spectra of one target on one wavelength axis)")
    s.add_argument("--batch", action="store_true",
                   help="no window: measure the redshift, fit the lines as one tied group, write the table")
    s.add_argument("--log", default=None, metavar="FITS.ecsv",
                   help="interactive: the ECSV log the w key appends to (default SPECTRUM stem + _splot.ecsv)")
    s.add_argument("--catalogue", choices=["galaxy", "QSO", "NIR"], default="galaxy",
                   help="interactive: the first catalogue set marked (c cycles them)")
    s.add_argument("--z", type=float, default=None,
                   help="redshift (batch: to fit at, default measured; interactive: of the line markers, default 0)")
    s.add_argument("--lines", nargs="+", default=None, metavar="LINE",
                   help="catalogue names of the lines to fit as one tied group (default: the BPT lines)")
    s.add_argument("--medium", choices=["air", "vacuum"], default=None,
                   help="wavelength medium when the file does not state it")
    s.add_argument("--mc", type=int, default=0, metavar="N", help="Monte-Carlo errors from N noise realisations")
    s.add_argument("--stellar-continuum", choices=["no", "yes", "auto"], default="auto",
                   help="fit an E-MILES stellar-population continuum first (default auto: used when the "
                        "templates describe the continuum clearly better than a smooth curve)")
    s.add_argument("--balmer-absorption", choices=["no", "yes", "auto"], default="yes",
                   help="without stellar templates: a Gaussian absorption under the Balmer lines "
                        "(default yes; auto keeps it only if it lowers chi2 by > 11.8)")
    s.add_argument("--out", default=None, help="ECSV table to write (default: SPECTRUM stem + _lines.ecsv)")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("classify", help="redshifts and classes (QSO/BAL/LoBAL, BPT, passive, WR, R23 abundance) "
                                        "of many 1D spectra")
    s.add_argument("spectra", nargs="+", help="1D spectra (files or folders searched for *.fits)")
    s.add_argument("--out", required=True, help="table to write, one row per spectrum (.ecsv, or .parquet)")
    s.add_argument("--targets", default=None,
                   help="target list (ECSV/CSV with id, ra, dec) to name spectra by position; without it "
                        "the OBJECT header names them")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--plots", default=None, metavar="DIR",
                   help="write BPT diagrams, WR zooms, BAL troughs and the rest-frame QSO stack here")
    s.add_argument("--mc", type=int, default=200, metavar="N", help="Monte-Carlo draws for BPT/abundance/BAL errors")
    g = s.add_argument_group("survey scale (chunks written as Parquet parts; a rerun skips finished chunks)")
    g.add_argument("--parts", default=None, metavar="DIR",
                   help="run in chunks with resumable parts in DIR (implied by the options below and by "
                        "table inputs .h5/.parquet or path lists .txt; default DIR: OUT stem + _parts)")
    g.add_argument("--chunk-size", type=int, default=1000, metavar="N", help="spectra per chunk (default 1000)")
    g.add_argument("--engine", choices=["inprocess", "pool", "dask"], default=None,
                   help="inprocess, a local process pool (default) or Dask distributed")
    g.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT", help="an existing Dask scheduler")
    g.add_argument("--dask-local", type=int, default=None, metavar="N",
                   help="start a Dask LocalCluster of N single-threaded worker processes")
    g.add_argument("--no-merge", action="store_true",
                   help="keep only the parts (merging holds the whole table in memory; for millions of "
                        "spectra read the parts folder with pyarrow/dask instead)")
    s.set_defaults(func=cmd_classify)

    s = sub.add_parser("demo", help="simulate a programme night of both instruments, reduce it, and write its report")
    s.add_argument("--out", default="specred_demo", help="output folder (default ./specred_demo)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo)
    return p


def cmd_fit(args) -> int:
    import numpy as np
    from astropy.table import QTable

    from .analysis import find_redshift, fit_lines, load_spectrum
    from .io import atomic_write_table

    if not args.batch:
        from .interactive.splot import interactive_backend, splot
        if not interactive_backend():
            import matplotlib
            raise SpecredError(f"matplotlib backend {matplotlib.get_backend()!r} cannot open a window (no display?): "
                               f"set MPLBACKEND (e.g. TkAgg, QtAgg), use Jupyter with %matplotlib widget, "
                               f"or run with --batch")
        specs = [load_spectrum(p, medium=args.medium) for p in args.spectrum]
        splot(*specs, z=args.z, log_path=args.log, catalogue=args.catalogue, block=True)
        return 0
    if len(args.spectrum) > 1:
        raise SpecredError("--batch fits one spectrum at a time")
    args.spectrum = args.spectrum[0]
    spec = load_spectrum(args.spectrum, medium=args.medium)
    zres = None
    if args.z is None:
        zres = find_redshift(spec)
        if not np.isfinite(zres.z):
            raise SpecredError(f"{args.spectrum}: no redshift found (quality {zres.quality}, {zres.flags}); give --z")
        z = zres.z
        log.info(f"z = {zres.z:.5f} ± {zres.z_err:.5f} ({zres.quality}, {zres.template} template, "
                 f"{zres.n_lines} features: {', '.join(zres.lines)})")
    else:
        z = args.z
    choice = {"no": False, "yes": True, "auto": "auto"}
    res = fit_lines(spec, z, args.lines, mc=args.mc, balmer_absorption=choice[args.balmer_absorption],
                    stellar_continuum=choice[args.stellar_continuum])
    if res.stellar is not None:
        sc = res.stellar
        log.info(f"stellar continuum: sigma* = {sc.sigma_star_kms:.0f} km/s, light-weighted age "
                 f"{sc.age_gyr:.1f} Gyr, chi2/dof {sc.redchi:.2f}")
    tab = QTable(res.to_table())
    tab.meta["spectrum"] = str(args.spectrum)
    if zres is not None:
        tab.meta.update({"z": zres.z, "z_err": zres.z_err, "z_scatter": zres.z_scatter, "z_quality": zres.quality,
                         "z_template": zres.template, "z_lines": list(zres.lines), "z_flags": zres.flags})
    out = Path(args.out) if args.out else Path(args.spectrum).with_name(Path(args.spectrum).stem + "_lines.ecsv")
    atomic_write_table(tab, out)
    for ln in res.lines:
        if not ln.covered:
            continue
        val = (f"{ln.flux:10.3e} ± {ln.flux_err:9.2e}" if ln.detected else f"  < {ln.flux_upper_limit:9.2e} (3σ)    ")
        log.info(f"{ln.name:11s} {val}  S/N {ln.snr:6.1f}  EW {ln.ew_rest:7.1f} Å  FWHM {ln.fwhm_kms:6.0f} km/s")
    log.info(f"wrote {out}")
    return 0


def cmd_classify(args) -> int:
    import os

    from .analysis.classify import classify_spectra, write_plots
    from .io import atomic_write_table
    from .progress import progress
    from .targets import load_targets

    from .survey import HDF5_SUFFIXES, LIST_SUFFIXES, PARQUET_SUFFIXES
    survey = (args.parts or args.scheduler or args.dask_local or args.engine
              or any(Path(i).suffix.lower() in HDF5_SUFFIXES + PARQUET_SUFFIXES + LIST_SUFFIXES
                     or any(ch in str(i) for ch in "*?[") for i in args.spectra))
    if survey:
        return _classify_survey(args)
    files = []
    for item in args.spectra:
        p = Path(item)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in (".fits", ".fit", ".fz", ".ecsv"))
        elif p.exists():
            files.append(p)
        else:
            raise SpecredError(f"{p}: no such file or folder")
    if not files:
        raise SpecredError("no spectra to classify")
    targets = load_targets(args.targets) if args.targets else None
    workers = args.workers or os.cpu_count() or 1
    if args.mc < 0:
        raise SpecredError("--mc must be >= 0")
    t0 = time.perf_counter()
    tab, objs = classify_spectra(files, targets=targets, workers=workers, n_mc=args.mc, progress=progress,
                                 keep_objects=bool(args.plots))
    dt = time.perf_counter() - t0
    out = Path(args.out)
    atomic_write_table(tab, out)
    counts = {}
    for c in tab["class"]:
        counts[str(c)] = counts.get(str(c), 0) + 1
    log.info("classified %d spectra in %.1f s (%.1f spectra/s, %d workers): %s", len(tab), dt, len(tab) / dt,
             workers, ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    bad = [r for r in tab if "UNREADABLE" in str(r["flags"]) or "INTERNAL_ERROR" in str(r["flags"])]
    if bad:
        log.warning("%d spectra could not be classified (see the flags column)", len(bad))
    if args.plots:
        files_out = write_plots(tab, [o for o in objs], args.plots)
        log.info("wrote %d plots to %s", len(files_out), args.plots)
    log.info(f"wrote {out}")
    return 0


def _classify_survey(args) -> int:
    import os

    import numpy as np

    from .io import atomic_write_table
    from .progress import progress
    from .survey import PARQUET_SUFFIXES, classify_survey, merge_parts, merge_parts_to_parquet
    from .targets import load_targets

    if args.plots:
        raise SpecredError("--plots needs the measurement objects: run without the survey options for plots")
    if args.mc < 0:
        raise SpecredError("--mc must be >= 0")
    out = Path(args.out)
    parts = Path(args.parts) if args.parts else out.with_name(out.stem + "_parts")
    engine = args.engine or ("dask" if (args.scheduler or args.dask_local) else "pool")
    workers = args.workers or os.cpu_count() or 1
    targets = load_targets(args.targets) if args.targets else None
    res = classify_survey(args.spectra, parts, chunk_size=args.chunk_size, engine=engine, workers=workers,
                          scheduler=args.scheduler, dask_local=args.dask_local, n_mc=args.mc, targets=targets,
                          progress=progress, merge=False)
    n_run = sum(st["n"] for st in res.stats)
    peak = max((st["maxrss_mb"] for st in res.stats), default=float("nan"))
    if not res.stats:
        log.info("all %d chunks were already done", res.n_chunks)
    else:
        log.info("classified %d spectra in %d chunks (%d already done) with %s on %d workers: %.1f spectra/s, peak "
                 "worker memory %.0f MB", n_run, res.n_chunks - res.n_skipped, res.n_skipped, engine, res.workers,
                 res.spectra_per_second, peak)
    if args.no_merge:
        log.info(f"parts in {parts / 'parts'} (not merged)")
        return 0
    if out.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq
        # streamed part by part: memory independent of the number of rows
        n_rows = merge_parts_to_parquet(parts, out, targets=targets)
        flags = pq.read_table(out, columns=["flags"]).column("flags").to_pylist()
    else:
        tab = merge_parts(parts, targets=targets)
        atomic_write_table(tab, out)
        n_rows, flags = len(tab), list(tab["flags"])
    bad = int(np.sum([("UNREADABLE" in str(f)) or ("INTERNAL_ERROR" in str(f)) for f in flags]))
    if bad:
        log.warning("%d spectra could not be classified (see the flags column)", bad)
    log.info(f"wrote {out} ({n_rows} rows; parts in {parts})")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not args.command:
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except SpecredError as exc:
        if args.debug:
            raise
        print(f"specred: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specred: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
