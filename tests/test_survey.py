"""Survey-scale classification: engines agree exactly, killed runs resume, tables of spectra."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from astropy.io import fits

from specred.analysis.classify import classify_spectra
from specred.errors import SpecredError
from specred.simulate import simulate_spectra
from specred.survey import classify_survey, plan_chunks, write_spectra_table

N = 200
MC = 20


def same_table(a, b, skip=("seconds",), rtol=0.0):
    """Column by column equality (NaN == NaN; floats within ``rtol``); the differing columns."""
    diff = []
    for c in a.colnames:
        if c in skip:
            continue
        # (ECSV reads empty strings back as masked: compare them as '')
        x, y = (np.asarray(t[c].filled("") if hasattr(t[c], "filled") and t[c].dtype.kind in "US" else t[c])
                for t in (a, b))
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            ok = (np.array_equal(x.astype(float), y.astype(float), equal_nan=True) if rtol == 0 else
                  np.allclose(x.astype(float), y.astype(float), rtol=rtol, atol=0.0, equal_nan=True))
        else:
            ok = np.array_equal(x.astype(str), y.astype(str))
        if not ok:
            diff.append(c)
    return diff


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("survey")
    simulate_spectra(out, N, seed=21, snr_range=(5.0, 50.0))
    files = sorted((out / "spectra").glob("*.fits"))
    ref, _ = classify_spectra(files, workers=1, n_mc=MC)
    return files, ref


def test_a_dask_local_cluster_gives_exactly_the_in_process_result(sample, tmp_path):
    pytest.importorskip("distributed")
    files, ref = sample
    res = classify_survey(files, tmp_path / "run", chunk_size=40, engine="dask", dask_local=2, n_mc=MC)
    assert res.n_chunks == N // 40 and res.workers == 2 and len(res.table) == N
    assert same_table(ref, res.table) == []
    # the parts were made by two different worker processes, each well below 1 GB
    assert len({s["pid"] for s in res.stats}) == 2
    assert all(s["maxrss_mb"] < 1024 for s in res.stats)


def test_pool_and_inprocess_engines_agree_too(sample, tmp_path):
    files, ref = sample
    for engine in ("pool", "inprocess"):
        res = classify_survey(files[:60], tmp_path / engine, chunk_size=25, engine=engine, workers=2, n_mc=MC)
        assert same_table(ref[:60], res.table) == [], engine


def test_a_killed_run_resumes_and_gives_the_same_table(sample, tmp_path):
    """The whole run is killed (SIGKILL) once some parts exist; the rerun skips them."""
    files, ref = sample
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(str(f) for f in files))
    run = tmp_path / "run"
    parts = run / "parts"
    out = tmp_path / "t.ecsv"
    cmd = [sys.executable, "-m", "specred", "classify", str(listing), "--parts", str(run), "--chunk-size", "10",
           "--engine", "pool", "--workers", "2", "--mc", str(MC), "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.time()
    while len(list(parts.glob("part-*.parquet"))) < 3 and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1].decode()[-2000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = sorted(parts.glob("part-*.parquet"))
    assert 3 <= len(done) < N // 10, "the kill must land mid-run"
    assert not out.exists()
    stamp = {q: q.stat().st_mtime_ns for q in done}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} of {N // 10} chunks already done" in r.stderr
    assert all(q.stat().st_mtime_ns == t for q, t in stamp.items())       # finished parts were not redone
    from astropy.table import Table
    assert same_table(ref, Table.read(out)) == []


def test_a_worker_killed_mid_run_is_replaced_by_dask(sample, tmp_path):
    distributed = pytest.importorskip("distributed")
    files, ref = sample
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = distributed.Client(cluster)
    pids = list(client.run(os.getpid).values())
    killed = []

    def killer():
        t0 = time.time()
        while not list((tmp_path / "run" / "parts").glob("part-*.parquet")) and time.time() - t0 < 120:
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    th = threading.Thread(target=killer)
    th.start()
    try:
        res = classify_survey(files, tmp_path / "run", chunk_size=20, engine="dask", scheduler=cluster.scheduler_address,
                              n_mc=MC)
    finally:
        th.join()
        client.close()
        cluster.close()
    assert killed
    assert same_table(ref, res.table) == []


def test_tables_of_spectra_hdf5_and_parquet(sample, tmp_path):
    pytest.importorskip("h5py")
    pytest.importorskip("pyarrow")
    files, ref = sample
    sub = files[:50]
    waves, flux, ivar, ids = None, [], [], []
    for f in sub:
        d = fits.getdata(f, 1)
        waves = np.asarray(d["wavelength"], float) if waves is None else waves
        assert np.array_equal(waves, d["wavelength"])                  # one grid for all
        good = d["mask"] == 0
        flux.append(np.asarray(d["flux"], float))
        ivar.append(np.where(good, 1.0 / np.asarray(d["uncertainty"], float) ** 2, 0.0))
        ids.append(fits.getheader(f)["OBJECT"])
    lsf = fits.getheader(sub[0])["LSFPIX"] * np.abs(np.gradient(waves))
    results = {}
    for suffix in (".h5", ".parquet"):
        t = write_spectra_table(tmp_path / f"spectra{suffix}", waves, flux, ivar, ids, medium="air", lsf_fwhm_aa=lsf,
                                instrument="EFOSC", row_group=20, dtype=np.float64)
        chunks = plan_chunks([t], chunk_size=15)
        assert sum(c.n for c in chunks) == 50
        res = classify_survey([t], tmp_path / f"run{suffix}", chunk_size=15, engine="pool", workers=2, n_mc=MC)
        results[suffix] = res.table
        assert list(res.table["target_id"]) == ids
        # the same spectra as the FITS files: the same classification (only the names differ;
        # σ -> ivar -> σ rounds at 1e-16, the fits carry that to ~1e-12)
        mc = ("absorption_index_err", "balnicity_index_err")     # MC scatter of thresholded sums
        assert same_table(ref[:50], res.table, skip=("seconds", "file") + mc, rtol=1e-9) == [], suffix
        assert same_table(ref[:50][mc], res.table[mc], rtol=1e-2) == [], suffix
    assert same_table(results[".h5"], results[".parquet"], skip=("seconds", "file")) == []


def test_a_different_run_in_the_same_folder_is_refused(sample, tmp_path):
    files, _ = sample
    classify_survey(files[:10], tmp_path / "run", chunk_size=5, engine="inprocess", n_mc=MC)
    with pytest.raises(SpecredError, match="different run"):
        classify_survey(files[:10], tmp_path / "run", chunk_size=4, engine="inprocess", n_mc=MC)
    with pytest.raises(SpecredError, match="no such file"):
        plan_chunks([tmp_path / "nope.fits"])
    bad = tmp_path / "bad.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a"], "flux": [[1.0, 2.0]]}), bad)
    with pytest.raises(SpecredError, match="ivar"):
        plan_chunks([bad])


def test_cli_parquet_output_and_parts_only(sample, tmp_path):
    import pyarrow.parquet as pq

    from specred.cli import main
    files, ref = sample
    out = tmp_path / "c.parquet"
    args = [str(f) for f in files[:12]]
    assert main(["classify", *args, "--engine", "inprocess", "--chunk-size", "5", "--mc", str(MC), "--parts",
                 str(tmp_path / "r1"), "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.num_rows == 12 and list(t.column("class").to_pylist()) == list(ref["class"][:12])
    out2 = tmp_path / "d.parquet"
    assert main(["classify", *args, "--engine", "inprocess", "--chunk-size", "5", "--mc", str(MC), "--parts",
                 str(tmp_path / "r2"), "--out", str(out2), "--no-merge"]) == 0
    assert not out2.exists() and len(list((tmp_path / "r2" / "parts").glob("part-*.parquet"))) == 3


def test_streamed_parquet_merge_equals_the_in_memory_merge(tmp_path):
    """The programme's spectra (three targets with EFOSC2 and SofI spectra, in different
    chunks) merged part by part into Parquet: the same rows as merge_parts, including the
    redshifts combined over both instruments and the names from the target list."""
    import pyarrow.parquet as pq

    from specred.simulate.programme import programme_targets
    from specred.simulate.spectra1d import simulate_programme_spectra
    from specred.survey import merge_parts, merge_parts_to_parquet
    from specred.targets import TargetList

    res = simulate_programme_spectra(tmp_path / "sim", seed=2)
    from astropy.table import Table
    t = programme_targets()
    targets = TargetList(Table({"id": t["object_id"], "ra": np.asarray(t["ra"], float),
                                "dec": np.asarray(t["dec"], float)}))
    files = sorted(res.files)
    import shutil
    for f in files[:3]:                    # a second spectrum of three targets, in another chunk
        files.append(shutil.copy(f, tmp_path / f"{f.stem}_again.fits"))
    run = tmp_path / "run"
    classify_survey(files, run, chunk_size=7, engine="inprocess", n_mc=MC, merge=False)
    ref = merge_parts(run, targets=targets)
    n = merge_parts_to_parquet(run, tmp_path / "m.parquet", targets=targets)
    got = pq.read_table(tmp_path / "m.parquet")
    assert n == len(ref) == got.num_rows and got.column_names == ref.colnames
    got = Table({c: got.column(c).to_numpy(zero_copy_only=False) for c in got.column_names})
    assert same_table(ref, got) == []
    combined = [f for f in ref["flags"] if "Z_COMBINED_2" in str(f)]
    assert len(combined) >= 4          # at least two of the three repeated targets combined
    assert set(ref["target_id"]) <= set(t["object_id"])
    with pytest.raises(SpecredError, match="not finished"):
        (run / "parts" / "part-000002.parquet").unlink()
        merge_parts_to_parquet(run, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_pool_workers_do_not_carry_the_callers_memory(sample, tmp_path):
    """Pool workers start from a fork server: a caller holding 600 MB (e.g. the merged table
    of an earlier run) does not show up in the workers' peak memory, as it did with fork."""
    files, _ = sample
    big = np.ones(75_000_000)                           # 600 MB, touched
    res = classify_survey(files[:6], tmp_path / "r", chunk_size=3, engine="pool", workers=1, n_mc=MC)
    assert big.sum() == 75_000_000
    peak = max(s["maxrss_mb"] for s in res.stats)
    assert peak < 550, peak
