"""Survey-scale classification: chunks of spectra, three execution engines, resumable output.

:func:`classify_survey` is what ``specred classify`` runs when it is given a parts folder, a
Dask scheduler or a table of spectra.  The input — FITS files (folders, globs, a text file
listing paths) or tables of spectra on a common wavelength grid (HDF5 or Parquet, see
:func:`write_spectra_table`) — is cut into **chunks** (``chunk_size`` files or table rows;
a Parquet table by its row groups).  Each chunk is one task: its spectra are read one at a
time (a table chunk at once: ``chunk_size`` × pixels), classified with
:func:`~specred.analysis.classify.classify_spectrum`, and written as one Parquet **part**
(``parts/part-NNNNNN.parquet``, written to a temporary name and renamed, so a part is
either complete or absent).  Memory per worker is therefore bounded by one chunk whatever
the size of the input.

The engines run the same task function:

* ``inprocess`` — a loop in this process;
* ``pool`` (default) — a local :class:`concurrent.futures.ProcessPoolExecutor` (workers
  started by the 'forkserver' method where available, so they carry none of the caller's
  memory);
* ``dask`` — :mod:`dask.distributed`: an existing scheduler (``scheduler="tcp://HOST:PORT"``,
  e.g. started by dask-jobqueue on a cluster or in the cloud) or a
  :class:`~distributed.LocalCluster` of ``dask_local`` single-threaded worker processes.
  Dask reschedules the chunk of a worker that dies; the dashboard link is logged.

A run that dies (worker killed, scheduler gone, Ctrl-C) and is started again with the same
inputs and options finds the finished parts and only runs the rest: the chunking is fixed
by the ``manifest.json`` of the first run, so the final table is the same as that of an
uninterrupted run.  :func:`merge_parts` joins the parts in input order, names spectra by
the target list and combines the redshifts of one target's spectra as
:func:`~specred.analysis.classify.classify_spectra` does — with which the merged table agrees
row for row (apart from the per-spectrum ``seconds``).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from .errors import SpecredError
from .io import atomic_path, atomic_write_text

log = logging.getLogger("specred")

FITS_SUFFIXES = (".fits", ".fit", ".fz", ".fits.gz")
HDF5_SUFFIXES = (".h5", ".hdf5")
PARQUET_SUFFIXES = (".parquet", ".pq")
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Chunk:
    """One task: ``paths`` (FITS files) or rows ``start:stop`` of the table ``source``."""

    index: int
    kind: str                   # 'files', 'hdf5' or 'parquet'
    source: str = ""
    start: int = 0
    stop: int = 0
    paths: tuple = ()

    @property
    def n(self) -> int:
        return len(self.paths) if self.kind == "files" else self.stop - self.start


# ============================================================================ inputs
def _expand(inputs) -> tuple[list[str], list[str]]:
    """(FITS files in input order, table files) from paths, folders, globs and list files."""
    files, tables = [], []
    for item in inputs:
        s = str(item)
        p = Path(s)
        if any(ch in s for ch in "*?["):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise SpecredError(f"{s}: the pattern matches no file")
            f2, t2 = _expand(hits)
            files += f2
            tables += t2
        elif p.is_dir():
            files += sorted(str(q) for q in p.rglob("*") if q.name.lower().endswith(FITS_SUFFIXES))
        elif not p.exists():
            raise SpecredError(f"{p}: no such file or folder")
        elif p.suffix.lower() in HDF5_SUFFIXES + PARQUET_SUFFIXES:
            tables.append(str(p))
        elif p.suffix.lower() in LIST_SUFFIXES:
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            f2, t2 = _expand(str(p.parent / ln) if not Path(ln).is_absolute() else ln for ln in lines)
            files += f2
            tables += t2
        else:
            files.append(str(p))
    return files, tables


def plan_chunks(inputs, chunk_size: int = 1000) -> list[Chunk]:
    """The chunks of ``inputs`` (see the module docstring), in input order."""
    if chunk_size < 1:
        raise SpecredError("chunk_size must be >= 1")
    files, tables = _expand(inputs)
    chunks: list[Chunk] = []
    for i in range(0, len(files), chunk_size):
        chunks.append(Chunk(len(chunks), "files", paths=tuple(files[i:i + chunk_size])))
    for t in tables:
        if Path(t).suffix.lower() in HDF5_SUFFIXES:
            import h5py
            with h5py.File(t, "r") as h:
                _check_table_layout(t, h.keys())
                n = int(h["flux"].shape[0])
            for a in range(0, n, chunk_size):
                chunks.append(Chunk(len(chunks), "hdf5", t, a, min(a + chunk_size, n)))
        else:
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(t)
            md = pf.metadata
            _check_table_layout(t, pf.schema_arrow.names)
            a = 0
            for g in range(md.num_row_groups):       # row groups, cut further to chunk_size
                n = md.row_group(g).num_rows
                for b in range(0, n, chunk_size):
                    chunks.append(Chunk(len(chunks), "parquet", t, a + b, a + min(b + chunk_size, n)))
                a += n
    if not chunks:
        raise SpecredError("no spectra to classify")
    return chunks


def _check_table_layout(path, names):
    names = set(names)
    missing = {"id", "flux", "ivar"} - names
    if missing:
        raise SpecredError(f"{path}: a table of spectra needs columns/datasets id, flux, ivar (and a wave grid); "
                           f"missing {sorted(missing)}")


# ============================================================================ tables of spectra
def write_spectra_table(path, wave, flux, ivar, ids, *, medium: str, flux_unit: str = "erg s-1 cm-2 Angstrom-1",
                        lsf_fwhm_aa=None, ra=None, dec=None, instrument: str = "", row_group: int = 1000,
                        dtype=np.float32) -> Path:
    """Write spectra on one wavelength grid as HDF5 (``.h5``) or Parquet (``.parquet``).

    HDF5: datasets ``wave`` (npix), ``flux`` and ``ivar`` (n × npix, float32), ``id`` (n), and
    optionally ``ra``/``dec`` and ``lsf_fwhm_aa``; attributes ``medium``, ``flux_unit``,
    ``instrument`` (the INSTRUME header value, e.g. EFOSC).
    Parquet: columns ``id``, ``flux``, ``ivar`` (lists), optional ``ra``/``dec``; the grid
    and the attributes in the file's key-value metadata (``specred.*``); row groups of
    ``row_group`` spectra (the chunks of a run).  ``lsf_fwhm_aa``: the instrumental FWHM
    (Å), one value or one per pixel; ``dtype`` of flux and ivar (float32 halves the size;
    float64 keeps FITS inputs bit for bit)."""
    path = Path(path)
    wave = np.asarray(wave, float)
    flux = np.asarray(flux, dtype)
    ivar = np.asarray(ivar, dtype)
    ids = np.asarray(ids).astype(str)
    if flux.shape != ivar.shape or flux.ndim != 2 or flux.shape[1] != wave.size or flux.shape[0] != ids.size:
        raise SpecredError(f"write_spectra_table: shapes disagree (wave {wave.shape}, flux {flux.shape}, "
                           f"ivar {ivar.shape}, ids {ids.shape})")
    lsf = np.asarray(lsf_fwhm_aa if lsf_fwhm_aa is not None else np.nan, float)
    if lsf.ndim and lsf.size != wave.size:
        raise SpecredError("write_spectra_table: lsf_fwhm_aa needs one value or one per pixel")
    attrs = {"medium": medium, "flux_unit": flux_unit, "lsf_fwhm_aa": lsf.tolist(), "instrument": str(instrument)}
    suffix = path.suffix.lower()
    if suffix not in HDF5_SUFFIXES + PARQUET_SUFFIXES:
        raise SpecredError(f"{path}: a table of spectra is .h5/.hdf5 or .parquet")
    with atomic_path(path) as tmp:
        _write_spectra(tmp, suffix, wave, flux, ivar, ids, ra, dec, lsf, attrs, row_group)
    return path


def _write_spectra(tmp, suffix, wave, flux, ivar, ids, ra, dec, lsf, attrs, row_group):
    if suffix in HDF5_SUFFIXES:
        import h5py
        with h5py.File(tmp, "w") as h:
            h["wave"] = wave
            h.create_dataset("flux", data=flux, chunks=(min(row_group, len(ids)), wave.size))
            h.create_dataset("ivar", data=ivar, chunks=(min(row_group, len(ids)), wave.size))
            h["id"] = ids.astype("S")
            if ra is not None:
                h["ra"] = np.asarray(ra, float)
                h["dec"] = np.asarray(dec, float)
            h["lsf_fwhm_aa"] = lsf
            h.attrs.update({k: v for k, v in attrs.items() if k != "lsf_fwhm_aa"})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        cols = {"id": pa.array(ids), "flux": pa.array(list(flux)), "ivar": pa.array(list(ivar))}
        if ra is not None:
            cols["ra"] = pa.array(np.asarray(ra, float))
            cols["dec"] = pa.array(np.asarray(dec, float))
        meta = {f"specred.{k}": json.dumps(v) for k, v in attrs.items()}
        meta["specred.wave"] = json.dumps(wave.tolist())
        tab = pa.table(cols).replace_schema_metadata(meta)
        pq.write_table(tab, tmp, row_group_size=row_group)


def _table_spectra(chunk: Chunk):
    """The spectra of a table chunk, as (AnalysisSpectrum, id)."""
    from .analysis.spectrum import make_spectrum

    if chunk.kind == "hdf5":
        import h5py
        with h5py.File(chunk.source, "r") as h:
            wave = h["wave"][:]
            flux = h["flux"][chunk.start:chunk.stop]
            ivar = h["ivar"][chunk.start:chunk.stop]
            ids = [v.decode() if isinstance(v, bytes) else str(v) for v in h["id"][chunk.start:chunk.stop]]
            ra = h["ra"][chunk.start:chunk.stop] if "ra" in h else None
            dec = h["dec"][chunk.start:chunk.stop] if "dec" in h else None
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h.attrs.items()}
            if "lsf_fwhm_aa" in h:
                attrs["lsf_fwhm_aa"] = h["lsf_fwhm_aa"][()]
    else:
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(chunk.source)
        md = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
        wave = np.asarray(json.loads(md["specred.wave"]), float)
        attrs = {k[len("specred."):]: json.loads(v) for k, v in md.items()
                 if k.startswith("specred.") and k != "specred.wave"}
        # the row groups overlapping the chunk, then the rows of the chunk
        ng = pf.metadata.num_row_groups
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(ng)])
        groups = [g for g in range(ng) if starts[g] < chunk.stop and starts[g + 1] > chunk.start]
        t = pf.read_row_groups(groups).slice(chunk.start - int(starts[groups[0]]), chunk.n)
        flux = np.stack(t.column("flux").to_numpy(zero_copy_only=False))
        ivar = np.stack(t.column("ivar").to_numpy(zero_copy_only=False))
        ids = [str(v) for v in t.column("id").to_pylist()]
        ra = t.column("ra").to_numpy() if "ra" in t.column_names else None
        dec = t.column("dec").to_numpy() if "dec" in t.column_names else None
    lsf = np.asarray(attrs.get("lsf_fwhm_aa", np.nan), float)
    lsf = None if not np.all(np.isfinite(lsf)) else (float(lsf) if lsf.ndim == 0 else lsf)
    for k in range(len(ids)):
        iv = np.asarray(ivar[k], float)
        good = np.isfinite(iv) & (iv > 0) & np.isfinite(flux[k])
        sigma = np.where(good, 1.0 / np.sqrt(np.where(good, iv, 1.0)), 1.0)
        meta = {"OBJECT": ids[k]}
        if attrs.get("instrument"):
            meta["INSTRUME"] = str(attrs["instrument"])
        if ra is not None:
            meta.update(RA=float(ra[k]), DEC=float(dec[k]))
        name = f"{chunk.source}#{ids[k]}"
        try:
            spec = make_spectrum(wave, np.where(good, flux[k], 0.0), sigma, medium=str(attrs.get("medium", "")),
                                 flux_unit=str(attrs.get("flux_unit", "erg s-1 cm-2 Angstrom-1")), mask=~good,
                                 lsf_fwhm_aa=lsf, name=name, meta=meta)
        except SpecredError as exc:
            yield exc, name, ids[k]
            continue
        yield spec, name, ids[k]


# ============================================================================ one task
def run_chunk(chunk: Chunk, part: str, opts: dict) -> dict:
    """Classify the spectra of ``chunk`` and write the Parquet part ``part`` (atomically).
    Returns statistics: chunk, n, seconds, peak resident memory of the process (MB)."""
    import multiprocessing

    from .analysis import classify as C
    from .analysis.classify import COLUMNS, Classification, _one

    if multiprocessing.parent_process() is not None and C._BLAS_LIMIT is None:
        C._one_blas_thread()        # a worker process: one BLAS thread (never the caller's own process)
    t0 = time.perf_counter()
    rows = []
    if chunk.kind == "files":
        items = ((p, p, "") for p in chunk.paths)
    else:
        items = _table_spectra(chunk)
    for spec, name, tid in items:
        if isinstance(spec, Exception):
            c = Classification(name, "unknown", f"spectrum not usable: {spec}", flags=("UNREADABLE",), target_id=tid)
            rows.append(c.to_row())
        else:
            rows.append(_one((spec, tid, opts))[0])     # classify_spectrum; a bug becomes a flagged row
    _write_part(rows, COLUMNS, Path(part))
    return {"chunk": chunk.index, "n": len(rows), "seconds": time.perf_counter() - t0,
            "maxrss_mb": _peak_rss_mb(), "pid": os.getpid()}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): VmHWM of /proc/self/status on Linux (the
    peak of this address space; getrusage's ru_maxrss survives exec and would report the
    parent that spawned a Dask worker), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_parquet(columns: dict, path) -> Path:
    """Columns (name -> sequence) as a Parquet file, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.table({c: pa.array(v) for c, v in columns.items()}), tmp)
    return Path(path)


def _write_part(rows, columns, part: Path) -> None:
    """The rows of one chunk as a Parquet part."""
    _write_parquet({c: [r[c] for r in rows] if rows else np.array([], str) for c in columns}, part)


def write_table_parquet(tab: Table, path) -> Path:
    """An astropy table (the merged classification) as Parquet, written atomically."""
    return _write_parquet({c: np.asarray(tab[c]) for c in tab.colnames}, path)


def _read_part(part: Path) -> Table:
    import pyarrow.parquet as pq

    t = pq.read_table(part)
    return Table({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names})


# ============================================================================ the run
@dataclass
class SurveyResult:
    table: Table | None
    out: Path
    n_chunks: int
    n_skipped: int
    stats: list
    seconds: float
    engine: str
    workers: int

    @property
    def spectra_per_second(self) -> float:
        n = sum(s["n"] for s in self.stats)
        return n / self.seconds if self.seconds > 0 else float("nan")


def _part(out: Path, chunk: Chunk) -> Path:
    return out / "parts" / f"part-{chunk.index:06d}.parquet"


def _manifest(out: Path, chunks, opts) -> None:
    """Write the run's manifest, or check that an existing one describes the same run."""
    man = {"chunks": [asdict(c) | {"paths": list(c.paths)} for c in chunks], "options": opts}
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(man)):
            raise SpecredError(f"{out} holds the parts of a different run (other inputs, chunking or options); "
                               f"use a new output folder or remove {out / 'parts'} and {path}")
        return
    (out / "parts").mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(man, indent=1), path)


def classify_survey(inputs, out, *, chunk_size: int = 1000, engine: str = "pool", workers: int = 2,
                    scheduler: str | None = None, dask_local: int | None = None, n_mc: int = 200, seed: int = 0,
                    targets=None, merge: bool = True, progress=None) -> SurveyResult:
    """Classify ``inputs`` chunk by chunk into ``out/parts`` (resumable) and merge them.

    ``engine``: 'inprocess', 'pool' (``workers`` processes) or 'dask' (``scheduler`` address,
    else a LocalCluster of ``dask_local`` or ``workers`` processes).  ``targets``: a
    :class:`~specred.targets.TargetList` applied at the merge.  ``progress``: a wrapper like
    :func:`specred.progress.progress`.  Returns a :class:`SurveyResult` (``table`` None when
    ``merge`` is False; the in-memory merge needs ~8 KB per row — for millions of rows run
    with ``merge=False`` and stream the parts with :func:`merge_parts_to_parquet`)."""
    if engine not in ("inprocess", "pool", "dask"):
        raise SpecredError(f"engine must be inprocess, pool or dask, not {engine!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chunks = plan_chunks(inputs, chunk_size)
    opts = {"n_mc": int(n_mc), "seed": int(seed)}
    _manifest(out, chunks, {"chunk_size": chunk_size, **opts})
    todo = [c for c in chunks if not _part(out, c).exists()]
    skipped = len(chunks) - len(todo)
    if skipped:
        log.info("%d of %d chunks already done in %s; running the other %d", skipped, len(chunks), out, len(todo))
    wrap = progress or (lambda it, **k: it)
    stats = []
    t0 = time.perf_counter()
    n_workers = 1
    if todo and engine == "inprocess":
        for c in wrap(todo, desc="classify", unit="chunk", total=len(todo)):
            stats.append(run_chunk(c, str(_part(out, c)), opts))
    elif todo and engine == "pool":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        n_workers = max(1, int(workers))
        # workers forked from a small server process, not from this one: a forked child
        # shares (and counts in its resident memory) whatever the caller holds — a merged
        # table of an earlier run made a 220 MB worker report 794 MB
        ctx = (multiprocessing.get_context("forkserver")
               if "forkserver" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as ex:
            futs = [ex.submit(run_chunk, c, str(_part(out, c)), opts) for c in todo]
            for f in wrap(as_completed(futs), desc="classify", unit="chunk", total=len(futs)):
                stats.append(f.result())
    elif todo:
        stats, n_workers = _run_dask(todo, out, opts, scheduler, dask_local or workers, wrap)
    dt = time.perf_counter() - t0
    tab = merge_parts(out, chunks, targets=targets) if merge else None
    return SurveyResult(tab, out, len(chunks), skipped, sorted(stats, key=lambda s: s["chunk"]), dt, engine,
                        n_workers)


def _run_dask(todo, out, opts, scheduler, n_local, wrap):
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=int(n_local), threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.WARNING)
        client = Client(cluster)
    try:
        log.info("Dask: %d workers, dashboard %s", len(client.scheduler_info()["workers"]), client.dashboard_link)
        futs = client.map(run_chunk, todo, [str(_part(out, c)) for c in todo], [opts] * len(todo), pure=False,
                          retries=2)
        stats = [f.result() for f in wrap(as_completed(futs), desc="classify", unit="chunk", total=len(futs))]
        n = len(client.scheduler_info()["workers"])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return stats, n


def merge_parts(out, chunks=None, *, targets=None) -> Table:
    """The parts of ``out`` as one table in input order, named by ``targets`` and with the
    redshifts of one target's spectra combined (as :func:`classify_spectra`)."""
    from astropy.table import vstack

    from .analysis.classify import COLUMNS, _combine_redshifts, _match_target

    out = Path(out)
    chunks = _chunks_of(out, chunks)
    parts = [_read_part(_part(out, c)) for c in chunks]
    tab = vstack(parts, metadata_conflicts="silent") if parts else Table(names=list(COLUMNS))
    tab.meta = {}
    for col in ("target_id", "file", "instrument", "flags", "lines", "class", "class_reason"):
        if col in tab.colnames:
            tab[col] = np.asarray(tab[col]).astype(str)
    if targets is not None:
        tab["target_id"] = [_match_target(targets, r["ra"], r["dec"], str(r["target_id"])) or str(r["target_id"])
                            for r in tab]
    if len(tab):
        _combine_redshifts(tab)
    tab.meta["description"] = ("specred classify (survey run): one row per spectrum; class decision logic in "
                               "specred.analysis.classify; z combined over the spectra of one target")
    return tab


def merge_parts_to_parquet(out, path, chunks=None, *, targets=None) -> int:
    """:func:`merge_parts` streamed into one Parquet file: the same rows and values, with
    memory that does not grow with the full table (millions of rows).

    Pass 1 reads four small columns of every part (target id, RA/Dec for ``targets``, z,
    z_err) and works out the combined redshifts (:func:`~specred.analysis.classify.
    redshift_groups`) and the merged line lists of those targets; pass 2 rewrites part by
    part, one row group each.  Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .analysis.classify import _add_flag, _match_target, redshift_groups

    out = Path(out)
    chunks = _chunks_of(out, chunks)
    files = [_part(out, c) for c in chunks]
    # ---- pass 1: ids, z, z_err of every row (a few tens of bytes per row)
    ids, z, ze, sizes = [], [], [], []
    for f in files:
        t = pq.read_table(f, columns=["target_id", "ra", "dec", "z", "z_err"])
        tid = np.asarray(t.column("target_id").to_pylist(), dtype=object).astype(str)
        if targets is not None:
            ra, dec = t.column("ra").to_numpy(), t.column("dec").to_numpy()
            tid = np.array([_match_target(targets, a, d, str(n)) or str(n) for a, d, n in zip(ra, dec, tid)], dtype=str)
        ids.append(tid)
        z.append(t.column("z").to_numpy())
        ze.append(t.column("z_err").to_numpy())
        sizes.append(t.num_rows)
    n_rows = int(sum(sizes))
    ids = np.concatenate(ids) if ids else np.array([], str)
    combined, disagree = redshift_groups(ids, np.concatenate(z) if z else [], np.concatenate(ze) if ze else [])
    # per touched row: (z, z_err, group number) or a disagreement; line lists read for these rows only
    new_z = {}
    for g, (keep, zbar, err) in enumerate(combined):
        for i in keep:
            new_z[int(i)] = (zbar, err, g)
    bad = {int(i) for idx in disagree for i in idx}
    touched = np.array(sorted(set(new_z) | bad), dtype=np.int64)
    bounds = np.cumsum([0, *sizes])
    lo_hi = np.searchsorted(touched, bounds)              # the touched rows of part k: lo_hi[k]:lo_hi[k+1]
    lines_of = [set() for _ in combined]
    for k, f in enumerate(files):
        rows = [int(i) for i in touched[lo_hi[k]:lo_hi[k + 1]] if int(i) in new_z]
        if rows:
            col = pq.read_table(f, columns=["lines"]).column("lines").to_pylist()
            for i in rows:
                lines_of[new_z[i][2]].update(x for x in str(col[i - bounds[k]] or "").split(",") if x)
    merged = [",".join(sorted(s_)) for s_ in lines_of]
    # ---- pass 2: stream the parts out
    writer = None
    desc = ("specred classify (survey run): one row per spectrum; class decision logic in "
            "specred.analysis.classify; z combined over the spectra of one target")
    with atomic_path(path) as tmp:
        try:
            for part_no, (f, n) in enumerate(zip(files, sizes)):
                if n == 0:
                    continue
                start = int(bounds[part_no])
                t = pq.read_table(f)
                cols = {c: t.column(c).to_pylist() for c in t.column_names}
                cols["target_id"] = list(ids[start:start + n])
                cols["z_spectrum"], cols["z_err_spectrum"] = list(cols["z"]), list(cols["z_err"])
                for i in touched[lo_hi[part_no]:lo_hi[part_no + 1]]:
                    i = int(i)
                    k = i - start
                    if i in bad:
                        cols["flags"][k] = _add_flag(cols["flags"][k] or "", "Z_DISAGREES_BETWEEN_SPECTRA")
                    elif i in new_z:
                        zbar, err, g = new_z[i]
                        cols["z"][k], cols["z_err"][k] = zbar, err
                        cols["lines"][k] = merged[g]
                        cols["n_lines"][k] = len(lines_of[g])
                        cols["flags"][k] = _add_flag(cols["flags"][k] or "", f"Z_COMBINED_{len(combined[g][0])}")
                table = pa.table({c: pa.array(v, type=(pa.string() if c in _STRING_COLUMNS else
                                                        t.schema.field(c).type if c in t.column_names
                                                        else pa.float64()))
                                  for c, v in cols.items()})
                if writer is None:
                    schema = table.schema.with_metadata({"description": desc})
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(writer.schema))
            if writer is None:                     # no rows at all
                from .analysis.classify import COLUMNS
                pq.write_table(pa.table({c: pa.array([], pa.string()) for c in COLUMNS}), tmp)
        finally:
            if writer is not None:
                writer.close()
    return n_rows


def _chunks_of(out: Path, chunks):
    """The run's chunks (from its manifest unless given); an error when a part is missing."""
    if chunks is None:
        man = json.loads((out / "manifest.json").read_text())
        chunks = [Chunk(**(c | {"paths": tuple(c["paths"])})) for c in man["chunks"]]
    missing = [c.index for c in chunks if not _part(out, c).exists()]
    if missing:
        raise SpecredError(f"{out}: {len(missing)} chunk(s) not finished (first: {missing[0]}); run again to finish")
    return chunks


#: text columns of the classification table (typed as strings in every part, empty or not)
_STRING_COLUMNS = ("target_id", "file", "instrument", "z_quality", "template", "lines", "class", "class_reason",
                   "bpt_nii", "bpt_sii", "bpt_oi", "bpt_class", "r23_branch", "flags")


__all__ = ["Chunk", "plan_chunks", "run_chunk", "classify_survey", "merge_parts", "merge_parts_to_parquet",
           "write_spectra_table", "write_table_parquet", "SurveyResult"]
