"""Discovery: finding files, checking them, classifying, grouping, warnings, nods, report."""
from __future__ import annotations

import gzip
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import specred
from specred.discover import (DiscoveryResult, assign_nods, discover, find_fits, inspect_report,
                              read_header)
from specred.errors import BadFrameError, SpecredError
from specred.instruments import classify_header

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HEADERS = SHARED / "ntt-reference" / "headers"


@pytest.fixture(autouse=True)
def no_calib(monkeypatch):
    """Discovery from the headers alone (no standard-star position matching)."""
    fake = types.ModuleType("specred.calib")
    monkeypatch.setitem(sys.modules, "specred.calib", fake)
    monkeypatch.setattr(specred, "calib", fake, raising=False)


# ============================================================================ synthetic frames
def efosc2_header(date: str, kind: str, obj: str = "", exptime: float = 600.0, filt: str = "Free",
                  obs_id: int = 1) -> fits.Header:
    typ, tech, default_obj = {"bias": ("BIAS", "IMAGE", "BIAS"), "flat": ("FLAT", "SPECTRUM", "FLAT"),
                              "arc": ("WAVE", "SPECTRUM", "WAVE"), "std": ("STD", "SPECTRUM", "GD71"),
                              "science": ("OBJECT", "SPECTRUM", "J0123-4567"),
                              "imaging": ("OBJECT", "IMAGE", "J0123-4567")}[kind]
    h = fits.Header()
    h["TELESCOP"] = "ESO-NTT"
    h["INSTRUME"] = "EFOSC"
    h["OBJECT"] = obj or default_obj
    h["DATE-OBS"] = date
    h["EXPTIME"] = 0.0 if kind == "bias" else exptime
    h["RA"] = 20.0
    h["DEC"] = -30.0
    for k, v in {"OBS ID": obs_id, "DPR TYPE": typ, "DPR TECH": tech,
                 "INS GRIS1 NAME": "Free" if kind == "imaging" else "Gr#13", "INS FILT1 NAME": filt,
                 "INS SLIT1 NAME": "slit#1.0", "DET WIN1 BINX": 2, "DET WIN1 BINY": 2,
                 "TEL AIRM START": 1.1, "TEL AIRM END": 1.2}.items():
        h[f"HIERARCH ESO {k}"] = v
    return h


def sofi_header(date: str, kind: str, obj: str = "", offset: float | None = None, lamp_on: bool = True,
                obs_id: int = 7, grism: str = "GB") -> fits.Header:
    typ, default_obj = {"arc": ("LAMP", "LAMP"), "flat": ("FLAT", "FLAT"), "science": ("OBJECT", "J0123-4567"),
                        "telluric": ("STD,TELLURIC", "HIP12345"), "std": ("STD", "GD71")}[kind]
    h = fits.Header()
    h["TELESCOP"] = "ESO-NTT"
    h["INSTRUME"] = "SOFI"
    h["OBJECT"] = obj or default_obj
    h["DATE-OBS"] = date
    h["EXPTIME"] = 10.0
    h["RA"] = 20.0
    h["DEC"] = -30.0
    eso = {"OBS ID": obs_id, "DPR TYPE": typ, "DPR TECH": "SPECTRUM", "INS OPTI2 NAME": grism,
           "INS FILT1 NAME": grism + "F", "INS OPTI1 NAME": "long_slit_1", "DET NDIT": 2,
           "TEL AIRM START": 1.2, "TEL AIRM END": 1.25}
    if kind == "arc":
        eso.update({"INS LAMP1 NAME": "Xenon", "INS LAMP1 ST": True})
    if kind == "flat":
        eso.update({"INS LAMP3 NAME": "Halogen", "INS LAMP3 ST": lamp_on})
    if offset is not None:
        eso.update({"SEQ CUMOFFSETX": offset, "SEQ CUMOFFSETY": 0.0, "SEQ NODTHROW": 20.0})
    for k, v in eso.items():
        h[f"HIERARCH ESO {k}"] = v
    return h


def write(path: Path, header: fits.Header, shape=(6, 5), output_verify: str = "exception") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(np.zeros(shape, np.int16), header=header).writeto(path, output_verify=output_verify)
    return path


@pytest.fixture
def night(tmp_path) -> tuple[Path, dict[str, str]]:
    """A small raw folder: good frames in nested folders plus one file per kind of problem.

    Returns the folder and {file name: expected problem fragment}.
    """
    raw = tmp_path / "raw"
    d = "2018-12-0{}T{}"
    # EFOSC2, night 2018-12-04: biases, flats, arcs (Free), standard, science (Free + GG495, no GG495 arc)
    for i in range(3):
        write(raw / "calib" / f"bias{i}.fits", efosc2_header(d.format(4, f"20:0{i}:00"), "bias"))
    for i in range(2):
        write(raw / "calib" / "flats" / f"flat{i}.fits", efosc2_header(d.format(4, f"20:1{i}:00"), "flat", exptime=12))
    write(raw / "calib" / "arc0.fits", efosc2_header(d.format(4, "20:20:00"), "arc", exptime=2.5))
    write(raw / "std.fits", efosc2_header(d.format(5, "01:00:00"), "std", exptime=60, obs_id=2))
    write(raw / "sci_free.fits", efosc2_header(d.format(5, "03:00:00"), "science", obs_id=3))
    write(raw / "sci_gg495.fits", efosc2_header(d.format(5, "04:00:00"), "science", filt="GG495", obs_id=4))
    write(raw / "flat_gg495.fits", efosc2_header(d.format(4, "20:30:00"), "flat", filt="GG495", exptime=12))
    write(raw / "img.fits", efosc2_header(d.format(5, "05:00:00"), "imaging"))
    # gzip-compressed good frame
    buf = fits.HDUList([fits.PrimaryHDU(np.zeros((6, 5), np.int16),
                                        header=efosc2_header(d.format(5, "06:00:00"), "science", obs_id=5))])
    tmp = tmp_path / "tmp.fits"
    buf.writeto(tmp)
    (raw / "more").mkdir(parents=True)
    (raw / "more" / "sci_late.fits.gz").write_bytes(gzip.compress(tmp.read_bytes()))
    # SofI ABBA
    for i, off in enumerate([0.3, -19.8, -20.2, 0.1]):
        write(raw / "sofi" / f"SOFI_sci{i}.fits", sofi_header(d.format(5, f"02:0{i}:00"), "science", offset=off))
    write(raw / "sofi" / "SOFI_arc.fits", sofi_header(d.format(4, "21:00:00"), "arc"))
    write(raw / "sofi" / "SOFI_flat_on.fits", sofi_header(d.format(4, "21:10:00"), "flat", lamp_on=True))
    write(raw / "sofi" / "SOFI_flat_off.fits", sofi_header(d.format(4, "21:11:00"), "flat", lamp_on=False))
    # problems
    good = write(tmp_path / "x.fits", efosc2_header(d.format(5, "07:00:00"), "science"), shape=(200, 100))
    data = good.read_bytes()
    (raw / "truncated.fits").write_bytes(data[: len(data) - 20000])
    (raw / "empty.fits").write_bytes(b"")
    (raw / "notes.fits").write_text("observing notes: seeing 1.2 arcsec\n")
    fors = fits.Header()
    fors["TELESCOP"] = "ESO-VLT-U1"
    fors["INSTRUME"] = "FORS2"
    write(raw / "fors.fits", fors)
    nodate = efosc2_header(d.format(5, "08:00:00"), "science")
    del nodate["DATE-OBS"]
    write(raw / "nodate.fits", nodate)
    (raw / "old.fits.Z").write_bytes(b"\x1f\x9d\x90" + b"\x00" * 200)
    spec1d = efosc2_header(d.format(5, "09:00:00"), "science")
    fits.PrimaryHDU(np.zeros(50, np.float32), header=spec1d).writeto(raw / "spec1d.fits")
    (raw / "readme.txt").write_text("not a FITS name: ignored")
    expected = {"truncated.fits": "truncated FITS file (expected 40000 bytes of data, found",
                "empty.fits": "empty file", "notes.fits": "not a FITS file",
                "fors.fits": "not an NTT frame: TELESCOP='ESO-VLT-U1', INSTRUME='FORS2'",
                "nodate.fits": "DATE-OBS", "old.fits.Z": ".Z", "spec1d.fits": "not a 2D frame"}
    return raw, expected


# ============================================================================ tests
def test_find_fits(night, tmp_path):
    raw, _ = night
    files = find_fits(raw)
    names = [p.name for p in files]
    assert files == sorted(files)
    assert "sci_late.fits.gz" in names and "old.fits.Z" in names and "flat1.fits" in names
    assert "readme.txt" not in names
    (tmp_path / "UPPER.FITS").write_bytes(b"")
    assert find_fits(tmp_path / "UPPER.FITS") == [tmp_path / "UPPER.FITS"]
    assert tmp_path / "UPPER.FITS" in find_fits(tmp_path)


def test_discover_classifies_good_frames_and_reports_each_problem_once(night):
    raw, expected = night
    res = discover(raw)
    by_name = {Path(f.path).name: f for f in res.frames}
    types_ = {n: f.frame_type for n, f in by_name.items()}
    assert types_["bias0.fits"] == "bias" and types_["flat1.fits"] == "flat"
    assert types_["arc0.fits"] == "arc" and types_["std.fits"] == "flux_standard"
    assert types_["sci_free.fits"] == "science" and types_["img.fits"] == "imaging"
    assert types_["sci_late.fits.gz"] == "science"
    assert types_["SOFI_flat_off.fits"] == "lamp_off_flat" and types_["SOFI_arc.fits"] == "arc"
    assert len(res.frames) == 19
    probs = {Path(p).name: r for p, r in res.problems}
    assert len(res.problems) == len(probs) == len(expected)           # each once
    for name, frag in expected.items():
        assert frag in probs[name], (name, probs[name])
    assert res.n_files == 19 + len(expected)


def test_groups_attach_biases_and_sort_by_time(night):
    raw, _ = night
    groups = discover(raw).groups()
    free = groups[("EFOSC2", "2018-12-04", "Gr#13/Free/slit#1.0/2x2")]
    gg = groups[("EFOSC2", "2018-12-04", "Gr#13/GG495/slit#1.0/2x2")]
    assert len(free["bias"]) == 3 and len(gg["bias"]) == 3
    assert ("EFOSC2", "2018-12-04", "2x2") not in groups
    assert [Path(f.path).name for f in free["science"]] == ["sci_free.fits", "sci_late.fits.gz"]
    assert all(a.mjd <= b.mjd for a, b in zip(free["bias"], free["bias"][1:]))
    assert not any("imaging" in g for g in groups.values())
    sofi = groups[("SOFI", "2018-12-04", "GB/GBF/long_slit_1")]
    assert len(sofi["science"]) == 4 and len(sofi["lamp_off_flat"]) == 1
    assert any(k[2].startswith("Free/") for k in discover(raw).groups(include_ignored=True))


def test_warnings(night):
    raw, _ = night
    w = discover(raw).warnings()
    assert "EFOSC2 2018-12-04 Gr#13/GG495/slit#1.0/2x2: no arc frames" in w
    assert not any(x.startswith("EFOSC2 2018-12-04 Gr#13/Free/slit#1.0/2x2: no arc") for x in w)
    assert any("GG495" in x and "no flux standard" in x for x in w)
    assert "SOFI 2018-12-04 GB/GBF/long_slit_1: science frames without a telluric standard" in w
    assert not any("ABBA" in x for x in w)


def test_warnings_for_bad_abba_and_grism_change(tmp_path):
    raw = tmp_path / "raw"
    d = "2018-12-05T02:{:02d}:00"
    for i, off in enumerate([0.3, -19.8, -20.2]):          # ABB: odd, A without its second A
        write(raw / f"s{i}.fits", sofi_header(d.format(i), "science", offset=off))
    write(raw / "r.fits", sofi_header(d.format(10), "science", offset=0.0, grism="GR"))   # same OB, red grism
    for i in range(2):                                      # a sequence at one position
        write(raw / f"t{i}.fits", sofi_header(d.format(20 + i), "telluric", offset=0.5 * i, obs_id=9))
    res = discover(raw)
    w = res.warnings()
    assert any("OB 7 (J0123-4567, science): incomplete ABBA cycle (1 A, 2 B)" in x for x in w)
    assert any("grism changes within the OB (GB, GR)" in x for x in w)
    assert any("OB 9" in x and "single position" in x for x in w)
    assert any("no arc frames" in x for x in w) and any("no flat frames" in x for x in w)


def test_assign_nods_abba():
    frames = [classify_header(sofi_header(f"2018-12-05T02:0{i}:00", "science", offset=o), f"f{i}.fits")
              for i, o in enumerate([0.3, -19.8, -20.2, 0.1])]
    for f in frames:
        assert f.nod is None
    shuffled = [frames[2], frames[0], frames[3], frames[1]]
    out = assign_nods(shuffled)
    assert [f.path for f in out] == [f.path for f in shuffled]          # input order kept
    assert {f.path: f.nod for f in out} == {"f0.fits": "A", "f1.fits": "B", "f2.fits": "B", "f3.fits": "A"}
    assert all(f is not g for f, g in zip(out, shuffled))               # new objects
    # first frame at the B-like offset: it is still 'A'
    rev = [classify_header(sofi_header(f"2018-12-05T02:0{i}:00", "science", offset=o), f"g{i}.fits")
           for i, o in enumerate([-20.0, 0.2, 0.0, -19.7])]
    assert [f.nod for f in assign_nods(rev)] == ["A", "B", "B", "A"]


def test_assign_nods_without_throw_and_single_position():
    frames = []
    for i, o in enumerate([0.3, -19.8, -20.2, 0.1]):
        h = sofi_header(f"2018-12-05T02:0{i}:00", "science", offset=o)
        del h["HIERARCH ESO SEQ NODTHROW"]
        frames.append(classify_header(h, f"f{i}.fits"))
    assert [f.nod for f in assign_nods(frames)] == ["A", "B", "B", "A"]
    one = [classify_header(sofi_header(f"2018-12-05T02:0{i}:00", "science", offset=o), f"h{i}.fits")
           for i, o in enumerate([0.3, -1.0, 1.2])]
    out = assign_nods(one)
    assert all(f.nod is None for f in out)
    assert all(any("one position" in p for p in f.problems) for f in out)
    # EFOSC2 frames pass through untouched
    e = classify_header(efosc2_header("2018-12-05T03:00:00", "science"), "e.fits")
    assert assign_nods([e]) == [e]


def test_inspect_report(night):
    raw, expected = night
    res = discover(raw)
    text = inspect_report(res)
    assert "Traceback" not in text
    assert "EFOSC2  night 2018-12-04  Gr#13/Free/slit#1.0/2x2" in text
    assert "SOFI  night 2018-12-04  GB/GBF/long_slit_1" in text
    for name, frag in expected.items():
        lines = [ln for ln in text.splitlines() if name in ln]
        assert len(lines) == 1, (name, lines)
        assert frag in lines[0]
    sci_line = next(ln for ln in text.splitlines() if "SOFI_sci1.fits" in ln)
    assert sci_line.split()[-1] == "B" and "science" in sci_line
    assert "no arc frames" in text


def test_read_header_reasons(tmp_path):
    p = write(tmp_path / "ok.fits", efosc2_header("2018-12-05T03:00:00", "science"), shape=(100, 100))
    h = read_header(p)
    assert h["NAXIS1"] == 100 and h["INSTRUME"] == "EFOSC"
    data = p.read_bytes()
    cut = tmp_path / "cut.fits"
    header_bytes = len(data) - 20160                                    # 20000 bytes padded to 7 blocks
    cut.write_bytes(data[:header_bytes + 5000])
    with pytest.raises(BadFrameError, match=r"truncated FITS file \(expected 20000 bytes of data, found 5000\)"):
        read_header(cut)
    cut.write_bytes(data[:1000])
    with pytest.raises(BadFrameError, match="truncated FITS header"):
        read_header(cut)
    gz = tmp_path / "ok.fits.gz"
    gz.write_bytes(gzip.compress(data))
    assert read_header(gz)["NAXIS2"] == 100
    gz.write_bytes(gzip.compress(data)[:-400])
    with pytest.raises(BadFrameError, match="truncated"):
        read_header(gz)
    with pytest.raises(BadFrameError, match="unreadable"):
        read_header(tmp_path / "missing.fits")


def test_read_header_tile_compressed_and_mef(tmp_path):
    h = efosc2_header("2018-12-05T03:00:00", "science")
    img = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    fz = tmp_path / "a.fits.fz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(img, header=h)]).writeto(fz)
    got = read_header(fz)
    assert got["NAXIS1"] == 64 and got["INSTRUME"] == "EFOSC"
    assert classify_header(got).frame_type == "science"
    raw = fz.read_bytes()
    fz.write_bytes(raw[: len(raw) - 3000])
    with pytest.raises(BadFrameError, match="truncated|unreadable"):
        read_header(fz)
    tab = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(header=h), fits.BinTableHDU.from_columns(
        [fits.Column(name="a", format="E", array=np.zeros(3))])]).writeto(tab)
    assert read_header(tab)["NAXIS"] == 0                          # the primary, not the table
    mef = tmp_path / "mef.fits"
    fits.HDUList([fits.PrimaryHDU(header=h), fits.ImageHDU(img)]).writeto(mef)
    got = read_header(mef)
    assert got["NAXIS1"] == 64 and got["INSTRUME"] == "EFOSC"      # primary keywords merged


def test_read_header_unix_compress(tmp_path, monkeypatch):
    z = tmp_path / "a.fits.Z"
    z.write_bytes(b"\x1f\x9d\x90" + b"\x00" * 100)
    monkeypatch.setitem(sys.modules, "uncompresspy", None)              # not installed
    with pytest.raises(BadFrameError, match="uncompresspy"):
        read_header(z)
    # with the optional package: the decompressed stream is checked like any FITS file
    p = write(tmp_path / "ok.fits", efosc2_header("2018-12-05T03:00:00", "science"))
    content = p.read_bytes()

    class LZWFile:
        def __init__(self, path, mode="rb"):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return content

    monkeypatch.setitem(sys.modules, "uncompresspy", types.SimpleNamespace(LZWFile=LZWFile))
    assert read_header(z)["INSTRUME"] == "EFOSC"


def test_discover_errors(tmp_path):
    with pytest.raises(SpecredError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(SpecredError, match="no FITS files found under"):
        discover(tmp_path / "empty")


def test_discover_single_file_and_duplicates(tmp_path):
    h = efosc2_header("2018-12-05T03:00:00", "science")
    a = write(tmp_path / "a.fits", h)
    res = discover(a)
    assert len(res.frames) == 1 and not res.problems
    write(tmp_path / "sub" / "copy.fits", h)
    res = discover(tmp_path)
    assert len(res.frames) == 1
    assert len(res.problems) == 1 and "duplicate of" in res.problems[0][1]


def test_discover_progress_callback(night):
    raw, _ = night
    seen = []

    def progress(it, desc="", unit=""):
        for x in it:
            seen.append(x)
            yield x

    discover(raw, progress=progress)
    assert len(seen) == len(find_fits(raw))


def test_discover_real_headers_as_files(tmp_path):
    """Real NTT headers written with tiny data arrays are classified like the headers."""
    if not HEADERS.is_dir():
        pytest.skip(f"reference data not available: {HEADERS} is absent (CI provides ../shared)")
    cases = {"arc_20120825_Gr13_Free_slit1.0_56442_1": ("EFOSC2", "arc"),
             "arc_GD71_2_GR_20120121": ("SOFI", "arc"),
             "other_frames/flat_20120410_J_56089_1": ("SOFI", "imaging"),
             "other_frames/sky_atmo2": None, "vega": None}
    for name, want in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = fits.Header.fromstring((HEADERS / f"{name}.header.txt").read_text(), sep="\n")
            for k in list(h):
                if k.startswith(("NAXIS", "BITPIX", "SIMPLE", "EXTEND", "BZERO", "BSCALE")):
                    h.remove(k, ignore_missing=True, remove_all=True)
            write(tmp_path / (Path(name).name + ".fits"), h, shape=(8, 8), output_verify="silentfix")
    res = discover(tmp_path)
    got = {Path(f.path).name[:-5]: (f.instrument, f.frame_type) for f in res.frames}
    for name, want in cases.items():
        if want:
            assert got[Path(name).name] == want
    assert {Path(p).name for p, _ in res.problems} == {"sky_atmo2.fits", "vega.fits"}


def test_discovery_result_of_nothing_is_empty():
    res = DiscoveryResult([], [])
    assert res.groups() == {} and res.warnings() == []
    assert "Warnings (0)" in inspect_report(res)
