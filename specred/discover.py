"""Find, check and classify the raw frames of a night; the ``specred inspect`` report.

``discover(RAW)`` walks a folder, reads one header per file (no pixel data, except for
compressed files and the size check), classifies every frame with
:mod:`specred.instruments`, assigns SofI nod positions, and returns a
:class:`DiscoveryResult`: the usable frames, the files that are not usable (with a one-line
reason each), the frames grouped by instrument / night / set-up, and set-up level warnings
(missing arcs, flats, biases, standards, incomplete ABBA cycles ...).

A single bad file never stops discovery: it is listed in ``problems`` with a short precise
reason ('truncated FITS file (expected N bytes of data, found M)', 'not a FITS file',
'empty file', ...).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from .errors import BadFrameError, SpecredError
from .instruments import ON_SKY_TYPES, FrameInfo, classify_header
from .instruments.base import image_shape

log = logging.getLogger(__name__)

__all__ = ["FITS_SUFFIXES", "find_fits", "read_header", "DiscoveryResult", "discover", "assign_nods",
           "inspect_report"]

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.z", ".fits.fz")
"""File-name endings recognised as FITS (compared case-insensitively)."""

BLOCK = 2880
GZIP_MAGIC = b"\x1f\x8b"
LZW_MAGIC = b"\x1f\x9d"
NOD_TYPES = ("science", "flux_standard", "telluric_standard")
DEFAULT_NOD_SPLIT = 5.0        # arcsec: minimum gap between the A and B positions without NODTHROW


# ============================================================================ files
def find_fits(root) -> list[Path]:
    """All FITS files under ``root`` (recursive), sorted.

    Recognised endings: ``.fits``, ``.fit``, ``.fts``, ``.fits.gz``, ``.fits.Z``,
    ``.fits.fz`` (any case, plus ``.fit.gz``/``.fts.gz``).  Hidden folders are skipped.
    A path to a single file is returned as is.

    Raises
    ------
    SpecredError
        ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SpecredError(f"{root} does not exist" if not root.exists() else f"{root} is not a folder or a file")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(FITS_SUFFIXES):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _header_end(block: bytes) -> int | None:
    """Index of the END card in a header block (multiple of 80), None if absent."""
    for i in range(0, len(block), 80):
        card = block[i:i + 80]
        if card[:3] == b"END" and card[3:].strip(b" ") == b"":
            return i
    return None


@dataclass
class _HDUSpan:
    header: fits.Header
    header_start: int
    data_start: int
    data_size: int      # bytes of data (unpadded)


def _read_header_at(fh, offset: int, total: int) -> _HDUSpan:
    """Parse the header starting at ``offset``; raises BadFrameError-like ValueErrors."""
    fh.seek(offset)
    chunks = []
    pos = offset
    while True:
        block = fh.read(BLOCK)
        if not block:
            raise ValueError("truncated FITS header (no END card)")
        if len(block) < BLOCK and _header_end(block) is None:
            raise ValueError("truncated FITS header (no END card)")
        chunks.append(block)
        pos += len(block)
        end = _header_end(block)
        if end is not None:
            break
        if pos - offset > 2_000 * BLOCK:
            raise ValueError("FITS header without END card")
    text = b"".join(chunks)
    cut = len(text) - len(block) + end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        header = fits.Header.fromstring(text[:cut].decode("ascii", errors="replace"))
    bitpix = header.get("BITPIX")
    naxis = header.get("NAXIS", 0)
    if not isinstance(bitpix, int) or bitpix not in (8, 16, 32, 64, -32, -64):
        raise ValueError(f"invalid BITPIX {bitpix!r}")
    if not isinstance(naxis, int) or naxis < 0 or naxis > 999:
        raise ValueError(f"invalid NAXIS {naxis!r}")
    size = 0
    if naxis > 0:
        dims = [header.get(f"NAXIS{i}", 0) for i in range(1, naxis + 1)]
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise ValueError(f"invalid NAXISn {dims}")
        start = 1 if dims and dims[0] == 0 and naxis > 1 else 0   # random groups: NAXIS1 = 0
        n = math.prod(dims[start:]) if dims[start:] else 0
        pcount = header.get("PCOUNT", 0) or 0
        gcount = header.get("GCOUNT", 1) or 1
        size = abs(bitpix) // 8 * int(gcount) * (int(pcount) + n)
    return _HDUSpan(header, offset, offset + len(text), size)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _scan(fh, total: int, want_image: bool = True) -> tuple[list[_HDUSpan], str | None]:
    """Walk the HDUs of an uncompressed FITS byte stream.

    Stops after the primary HDU when it holds an image (raw NTT frames), else continues
    until an image extension is found.  Returns the spans read and a truncation message
    (None when the data of every span read are complete).
    """
    spans: list[_HDUSpan] = []
    offset = 0
    while offset < total:
        try:
            span = _read_header_at(fh, offset, total)
        except ValueError:
            if spans:   # junk after a complete HDU: ignore (astropy does the same)
                break
            raise
        spans.append(span)
        found = total - span.data_start
        if found < span.data_size:
            return spans, f"truncated FITS file (expected {span.data_size} bytes of data, found {max(found, 0)})"
        is_image = (span.header.get("NAXIS", 0) or 0) > 0 and (
            len(spans) == 1 or span.header.get("XTENSION", "").strip() == "IMAGE"
            or span.header.get("ZIMAGE", False))
        if want_image and is_image:
            break
        offset = span.data_start + _padded(span.data_size)
    return spans, None


def _merge_primary(primary: fits.Header, ext: fits.Header) -> fits.Header:
    """Extension header completed with the primary header's keywords (ESO MEF / fpack)."""
    out = ext.copy()
    skip = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "END", "XTENSION", "PCOUNT", "GCOUNT", "", "COMMENT",
            "HISTORY", "CHECKSUM", "DATASUM"}
    for card in primary.cards:
        key = card.keyword
        if key in skip or key.startswith("NAXIS") or key in out:
            continue
        try:
            out.append(card, end=True)
        except Exception:   # noqa: BLE001 - a malformed card is not worth failing for
            continue
    return out


def _header_from_bytes(fh, total: int, path: Path) -> fits.Header:
    """Primary (or first image) header of an uncompressed FITS stream, size checked."""
    fh.seek(0)
    head = fh.read(80)
    if not head.startswith(b"SIMPLE  ="):
        raise BadFrameError(path, "not a FITS file")
    try:
        spans, trunc = _scan(fh, total)
    except ValueError as exc:
        raise BadFrameError(path, str(exc)) from None
    if trunc:
        raise BadFrameError(path, trunc)
    primary = spans[0].header
    last = spans[-1].header
    if len(spans) > 1:
        if last.get("ZIMAGE", False):
            return None   # type: ignore[return-value]  # tile-compressed: the caller uses astropy
        if str(last.get("XTENSION", "")).strip() == "IMAGE" and (last.get("NAXIS", 0) or 0) > 0:
            return _merge_primary(primary, last)
    return primary


def _decompress_gzip(data: bytes) -> tuple[bytes, str | None]:
    """Gunzip as much as possible; returns (bytes, error message or None)."""
    out = []
    err = None
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            out.append(d.decompress(data))
            out.append(d.flush())
        except zlib.error as exc:
            err = f"corrupt gzip data ({exc})"
            break
        if not d.eof:
            err = "truncated gzip file (compressed stream ends early)"
            break
        data = d.unused_data
        if data[:2] != GZIP_MAGIC:
            break
    return b"".join(out), err


def _read_fz(path: Path) -> fits.Header:
    """Header of the first image HDU of a tile-compressed (fpack) file; data read to check."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                primary = hdul[0].header
                for hdu in hdul:
                    if hdu.is_image and (hdu.header.get("NAXIS", 0) or 0) > 0:
                        _ = hdu.data   # decompress: this is the data check
                        header = hdu.header if hdu is hdul[0] else _merge_primary(primary, hdu.header)
                        break
                else:
                    raise BadFrameError(path, "no image data in the file")
        for w in caught:
            msg = str(w.message)
            if "truncated" in msg.lower():
                raise BadFrameError(path, f"truncated FITS file ({msg.strip()})")
    except BadFrameError:
        raise
    except Exception as exc:   # noqa: BLE001 - any failure of a compressed file is a bad file
        raise BadFrameError(path, f"unreadable: {exc.__class__.__name__}: {exc}") from None
    return header


def read_header(path) -> fits.Header:
    """Primary header of a FITS file, after checking that the file is complete.

    For tile-compressed files (``.fz``) the header of the first image extension is
    returned (completed with the primary header's keywords); for gzip (``.gz``) and unix
    compress (``.Z``) files the stream is decompressed first.  The data size implied by
    the header is compared with the bytes present; compressed data are decompressed
    (which checks them).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    astropy.io.fits.Header

    Raises
    ------
    BadFrameError
        With a short reason: ``'empty file'``, ``'not a FITS file'``,
        ``'truncated FITS file (expected N bytes of data, found M)'``, ``'truncated gzip
        file ...'``, ``'unix-compressed (.Z) file: needs the optional package
        uncompresspy ...'``, ``'unreadable: <error>'``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise BadFrameError(path, "empty file")
        with open(path, "rb") as fh:
            magic = fh.read(80)
            if magic[:2] == GZIP_MAGIC:
                data, err = _decompress_gzip(magic + fh.read())
                if not data.startswith(b"SIMPLE  ="):
                    raise BadFrameError(path, err or "not a FITS file (gzip file without FITS content)")
                try:
                    header = _header_from_bytes(io.BytesIO(data), len(data), path)
                except BadFrameError as exc:
                    raise BadFrameError(path, exc.reason + (f"; {err}" if err else "")) from None
                if err:
                    raise BadFrameError(path, err)
                if header is None:
                    raise BadFrameError(path, "tile-compressed FITS inside gzip is not supported")
                return header
            if magic[:2] == LZW_MAGIC:
                return _read_lzw(path)
            if not magic.startswith(b"SIMPLE  ="):
                raise BadFrameError(path, "not a FITS file")
            header = _header_from_bytes(fh, size, path)
        if header is None:
            return _read_fz(path)
        return header
    except BadFrameError:
        raise
    except OSError as exc:
        raise BadFrameError(path, f"unreadable: {exc.strerror or exc}") from None
    except Exception as exc:   # noqa: BLE001 - never a traceback for one bad file
        raise BadFrameError(path, f"unreadable: {exc.__class__.__name__}: {exc}") from None


def _read_lzw(path: Path) -> fits.Header:
    """Header of a unix-compress (.Z, LZW) file, via the optional ``uncompresspy``."""
    try:
        import uncompresspy
    except ImportError:
        raise BadFrameError(path, "unix-compressed (.Z) file: needs the optional package uncompresspy "
                                  "(pip install uncompresspy) or decompress it first (gzip -d FILE.Z)") from None
    try:
        with uncompresspy.LZWFile(path, mode="rb") as lz:
            data = lz.read()
    except Exception as exc:   # noqa: BLE001
        raise BadFrameError(path, f"corrupt unix-compressed (.Z) file ({exc.__class__.__name__}: {exc})") from None
    try:
        header = _header_from_bytes(io.BytesIO(data), len(data), path)
    except BadFrameError as exc:
        raise BadFrameError(path, f"unix-compressed (.Z) file: decompressed content is {exc.reason}") from None
    if header is None:
        raise BadFrameError(path, "tile-compressed FITS inside .Z is not supported")
    return header


# ============================================================================ nods
def _sequence_key(f: FrameInfo) -> tuple:
    return (f.instrument, f.night, f.obs_id if f.obs_id is not None else -1, f.object, f.frame_type)


def assign_nods(frames: Iterable[FrameInfo]) -> list[FrameInfo]:
    """Label SofI nodding frames A or B.

    Frames of one sequence — same ESO OBS ID and OBJECT (and night, frame type) — are
    sorted by MJD and their ``ESO SEQ CUMOFFSETX`` values (or Y when the Y offsets span a
    wider range) are split into two positions at the largest gap, provided that gap
    exceeds half the nod throw (``ESO SEQ NODTHROW``; 5 arcsec without it).  The position
    of the first frame is 'A'.  A sequence at a single position gets ``nod = None`` and a
    problem note.  Frames of other instruments or types, or without offsets, are returned
    unchanged.

    Parameters
    ----------
    frames : iterable of FrameInfo

    Returns
    -------
    list of FrameInfo
        New objects (``dataclasses.replace``) in the input order.
    """
    frames = list(frames)
    seqs: dict[tuple, list[int]] = defaultdict(list)
    for i, f in enumerate(frames):
        if f.instrument == "SOFI" and f.frame_type in NOD_TYPES and f.offset_x is not None:
            seqs[_sequence_key(f)].append(i)
    out = list(frames)
    for idx in seqs.values():
        idx.sort(key=lambda i: frames[i].mjd)
        seq = [frames[i] for i in idx]
        ox = np.array([f.offset_x for f in seq], float)
        oy = np.array([f.offset_y if f.offset_y is not None else 0.0 for f in seq], float)
        off = oy if np.ptp(oy) > np.ptp(ox) else ox
        throws = [f.nod_throw for f in seq if f.nod_throw]
        split = 0.5 * float(np.median(throws)) if throws else DEFAULT_NOD_SPLIT
        labels: list[str | None]
        note = None
        if len(seq) >= 2:
            order = np.sort(off)
            gaps = np.diff(order)
            k = int(np.argmax(gaps))
            if gaps[k] > split:
                cut = 0.5 * (order[k] + order[k + 1])
                first_low = off[0] < cut
                labels = ["A" if (o < cut) == first_low else "B" for o in off]
            else:
                labels = [None] * len(seq)
                note = (f"nodding: all {len(seq)} frames of the sequence at one position "
                        f"(offsets span {np.ptp(off):.1f} arcsec)")
        else:
            labels = [None]
            note = "nodding: single frame, no B position"
        for i, f, lab in zip(idx, seq, labels):
            probs = f.problems + ((note,) if note and note not in f.problems else ())
            out[i] = dataclasses.replace(f, nod=lab, problems=probs)
    return out


# ============================================================================ result
def _binning_of(setup: str) -> str:
    return setup.rsplit("/", 1)[-1]


@dataclass
class DiscoveryResult:
    """Outcome of :func:`discover`.

    Attributes
    ----------
    frames : list of FrameInfo
        Every usable NTT frame (imaging frames included, as type 'imaging').
    problems : list of (str, str)
        ``(path, reason)`` of every file that is not a usable frame.
    root : Path or None
        The folder that was searched (for relative names in the report).
    n_files : int
        Number of FITS files found.
    """

    frames: list[FrameInfo]
    problems: list[tuple[str, str]]
    root: Path | None = None
    n_files: int = 0

    # -------------------------------------------------------------- grouping
    def groups(self, include_ignored: bool = False) -> dict[tuple[str, str, str], dict[str, list[FrameInfo]]]:
        """Frames by ``(instrument, night, setup)`` then by frame type, sorted by MJD.

        EFOSC2 bias frames (set-up = binning, e.g. ``'2x2'``) are attached to every
        EFOSC2 spectroscopic set-up of the same night with that binning; biases of a
        night/binning without any spectroscopic set-up stay in a group of their own.
        'imaging' and 'unknown' frames are left out unless ``include_ignored``.
        """
        raw: dict[tuple[str, str, str], dict[str, list[FrameInfo]]] = defaultdict(lambda: defaultdict(list))
        biases: dict[tuple[str, str, str], list[FrameInfo]] = defaultdict(list)
        for f in self.frames:
            if f.frame_type in ("imaging", "unknown") and not include_ignored:
                continue
            if f.instrument == "EFOSC2" and f.frame_type == "bias":
                biases[(f.instrument, f.night, f.setup)].append(f)
                continue
            raw[(f.instrument, f.night, f.setup)][f.frame_type].append(f)
        for bkey, blist in biases.items():
            inst, night, binning = bkey
            targets = [k for k, g in raw.items()
                       if k[0] == inst and k[1] == night and k[2] != binning and _binning_of(k[2]) == binning
                       and any(t not in ("imaging", "unknown") for t in g)]
            for k in targets or [bkey]:
                raw[k]["bias"].extend(blist)
        out: dict[tuple[str, str, str], dict[str, list[FrameInfo]]] = {}
        for key in sorted(raw):
            out[key] = {t: sorted(v, key=lambda f: f.mjd) for t, v in sorted(raw[key].items())}
        return out

    # -------------------------------------------------------------- warnings
    def warnings(self) -> list[str]:
        """Set-up level issues, one line each (``'EFOSC2 2018-12-04 Gr#13/Free/slit#1.0/2x2:
        no arc frames'``)."""
        out: list[str] = []
        groups = self.groups()
        std_elsewhere: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for (inst, night, setup), g in groups.items():
            if g.get("flux_standard"):
                std_elsewhere[(inst, night, setup.split("/")[0])].add(setup)
        for (inst, night, setup), g in groups.items():
            tag = f"{inst} {night} {setup}"
            on_sky = [t for t in ("science", "flux_standard", "telluric_standard") if g.get(t)]
            if not on_sky:
                if set(g) == {"bias"}:
                    out.append(f"{tag}: bias frames only (no spectroscopic frames with this binning)")
                else:
                    out.append(f"{tag}: calibrations only (no science or standard frames)")
                continue
            if not g.get("arc"):
                out.append(f"{tag}: no arc frames")
            if not g.get("flat"):
                out.append(f"{tag}: no flat frames")
            if inst == "EFOSC2" and not g.get("bias"):
                out.append(f"{tag}: no bias frames (overscan level only)")
            if inst == "SOFI" and g.get("flat") and not g.get("lamp_off_flat"):
                out.append(f"{tag}: no lamp-off flat frames (flat not corrected for thermal background)")
            if g.get("science") and not g.get("flux_standard"):
                others = sorted(std_elsewhere.get((inst, night, setup.split("/")[0]), set()) - {setup})
                extra = f" (only in {', '.join(others)})" if others else ""
                out.append(f"{tag}: no flux standard{extra}")
            if inst == "SOFI" and g.get("science") and not g.get("telluric_standard"):
                out.append(f"{tag}: science frames without a telluric standard")
            if inst == "SOFI":
                out.extend(f"{tag}: {w}" for w in _abba_warnings(g))
        out.extend(_grism_change_warnings(self.frames))
        return out

    def summary(self) -> str:
        """One line: files, frames, problems."""
        per = defaultdict(int)
        for f in self.frames:
            per[f.instrument] += 1
        inst = ", ".join(f"{k} {v}" for k, v in sorted(per.items()))
        return (f"{self.n_files or len(self.frames) + len(self.problems)} FITS files: {len(self.frames)} frames"
                f"{' (' + inst + ')' if inst else ''}, {len(self.problems)} unusable")


def _abba_warnings(g: dict[str, list[FrameInfo]]) -> list[str]:
    out = []
    seqs: dict[tuple, list[FrameInfo]] = defaultdict(list)
    for t in NOD_TYPES:
        for f in g.get(t, []):
            seqs[_sequence_key(f)].append(f)
    for key, fr in seqs.items():
        obs = f"OB {key[2]}" if key[2] != -1 else "no OB id"
        who = f"{obs} ({fr[0].object}, {fr[0].frame_type})"
        nods = [f.nod for f in fr]
        if all(n is None for n in nods):
            if any(f.offset_x is not None for f in fr):
                out.append(f"{who}: no nodding (single position): sky subtraction by A-B impossible")
            else:
                out.append(f"{who}: no nod offsets (ESO SEQ CUMOFFSETX) in the headers")
            continue
        na, nb = nods.count("A"), nods.count("B")
        if na != nb or len(fr) % 2:
            out.append(f"{who}: incomplete ABBA cycle ({na} A, {nb} B)")
        elif na == 0 or nb == 0:
            out.append(f"{who}: incomplete ABBA cycle (A without B)")
    return out


def _grism_change_warnings(frames: list[FrameInfo]) -> list[str]:
    out = []
    obs: dict[tuple, list[FrameInfo]] = defaultdict(list)
    for f in frames:
        if f.obs_id is not None and f.frame_type in NOD_TYPES:
            obs[(f.instrument, f.obs_id)].append(f)
    for (inst, oid), fr in sorted(obs.items()):
        grisms = sorted({f.grism or "?" for f in fr})
        setups = sorted({f.setup for f in fr})
        if len(grisms) > 1:
            out.append(f"{inst} {fr[0].night}: OB {oid} ({fr[0].object}): grism changes within the OB "
                       f"({', '.join(grisms)})")
        elif len(setups) > 1:
            out.append(f"{inst} {fr[0].night}: OB {oid} ({fr[0].object}): set-up changes within the OB "
                       f"({', '.join(setups)})")
    return out


# ============================================================================ discover
def discover(root, progress: Callable | None = None) -> DiscoveryResult:
    """Find and classify every FITS file under ``root``.

    Parameters
    ----------
    root : str or Path
        Folder (searched recursively) or a single file.
    progress : callable, optional
        ``progress(iterable, desc=..., unit=...)`` wrapper (e.g.
        :func:`specred.progress.progress`).

    Returns
    -------
    DiscoveryResult

    Raises
    ------
    SpecredError
        ``root`` does not exist or holds no FITS file.  Bad single files never raise:
        they are listed in :attr:`DiscoveryResult.problems`.
    """
    root = Path(root)
    paths = find_fits(root)
    if not paths:
        raise SpecredError(f"no FITS files found under {root}")
    frames: list[FrameInfo] = []
    problems: list[tuple[str, str]] = []
    seen: dict[tuple[str, str], str] = {}
    it = paths if progress is None else progress(paths, desc="inspect", unit="file")
    for p in it:
        try:
            header = read_header(p)
            info = classify_header(header, str(p))
            shape = image_shape(header)
            if len(shape) != 2:
                what = "1D spectrum" if len(shape) == 1 else ("no image data" if not shape else f"{len(shape)}D array")
                raise BadFrameError(p, f"not a 2D frame (NAXIS={len(shape)}: {what})")
            key = (info.instrument, info.date_obs)
            if key in seen:
                raise BadFrameError(p, f"duplicate of {seen[key]} (same instrument and DATE-OBS)")
            seen[key] = str(p)
        except BadFrameError as exc:
            problems.append((str(p), exc.reason))
            log.debug("%s: %s", p, exc.reason)
            continue
        except Exception as exc:   # noqa: BLE001 - one bad file never stops discovery
            problems.append((str(p), f"unreadable: {exc.__class__.__name__}: {exc}"))
            log.debug("%s: unexpected error", p, exc_info=True)
            continue
        frames.append(info)
    frames = assign_nods(frames)
    frames.sort(key=lambda f: (f.instrument, f.mjd))
    log.info("discovered %d frames and %d unusable files under %s", len(frames), len(problems), root)
    return DiscoveryResult(frames, problems, root=root, n_files=len(paths))


# ============================================================================ report
def _rel(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        base = root if root.is_dir() else root.parent
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def _fmt(v, spec: str, width: int) -> str:
    return f"{v:{spec}}".rjust(width) if v is not None else "-".rjust(width)


def inspect_report(result: DiscoveryResult) -> str:
    """The text ``specred inspect RAW/`` prints.

    One block per instrument / night / set-up with the counts per frame type and one line
    per frame (file, type, object, exposure, airmass, nod); EFOSC2 biases in a block of
    their binning; then the warnings, the per-frame notes and the unusable files, one
    line each.
    """
    root = result.root
    lines = [f"specred inspect {root if root is not None else ''}".rstrip(), result.summary(), ""]
    blocks: dict[tuple[str, str, str], list[FrameInfo]] = defaultdict(list)
    for f in result.frames:
        blocks[(f.instrument, f.night, f.setup)].append(f)
    names = {id(f): _rel(f.path, root) for f in result.frames}
    wname = max([len(n) for n in names.values()] + [4])
    wobj = max([len(f.object) for f in result.frames] + [6])
    order = ["bias", "flat", "lamp_off_flat", "arc", "flux_standard", "telluric_standard", "science",
             "imaging", "unknown"]
    for (inst, night, setup), fr in sorted(blocks.items()):
        fr = sorted(fr, key=lambda f: f.mjd)
        counts = defaultdict(int)
        for f in fr:
            counts[f.frame_type] += 1
        ignored = all(f.frame_type in ("imaging", "unknown") for f in fr)
        title = f"{inst}  night {night}  {setup}"
        if inst == "EFOSC2" and all(f.frame_type == "bias" for f in fr):
            title += f"  (bias frames, used by every {setup} set-up of the night)"
        elif ignored:
            title += "  (not used)"
        lines.append(title)
        lines.append("  " + ", ".join(f"{counts[t]} {t}" for t in order if counts[t]))
        lines.append(f"  {'file'.ljust(wname)}  {'type'.ljust(17)}  {'object'.ljust(wobj)}  "
                     f"{'exptime'.rjust(10)}  {'airmass'.rjust(7)}  nod")
        for f in fr:
            exp = f"{f.exptime:.1f}" + (f"x{f.ndit}" if f.instrument == "SOFI" and f.ndit else "")
            am = f.airmass if f.frame_type in ON_SKY_TYPES else None
            lines.append(f"  {names[id(f)].ljust(wname)}  {f.frame_type.ljust(17)}  {f.object.ljust(wobj)}  "
                         f"{exp.rjust(10)}  {_fmt(am, '.3f', 7)}  {f.nod or '-'}")
        lines.append("")
    warns = result.warnings()
    lines.append(f"Warnings ({len(warns)}):")
    if warns:
        lines.extend(f"  {w}" for w in warns)
    else:
        lines.append("  none")
    by_note: dict[str, list[str]] = defaultdict(list)
    for f in result.frames:
        for p in f.problems:
            by_note[p].append(names[id(f)])
    if by_note:
        lines.append(f"Notes ({sum(len(v) for v in by_note.values())}):")
        for note, files in by_note.items():
            if len(files) <= 3:
                lines.extend(f"  {n}: {note}" for n in files)
            else:
                lines.append(f"  {len(files)} files ({files[0]}, {files[1]}, ...): {note}")
    lines.append(f"Unusable files ({len(result.problems)}):")
    if result.problems:
        lines.extend(f"  {_rel(p, root)}: {r}" for p, r in result.problems)
    else:
        lines.append("  none")
    return "\n".join(lines)
