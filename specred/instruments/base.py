"""Instrument-independent parts of the instrument layer.

Everything that reads an ESO header lives in :mod:`specred.instruments`; the rest of
specred sees only the two frozen dataclasses defined here:

* :class:`DetectorGeometry` — where the pixels are (data, prescan, overscan, trim
  sections as numpy slices), which way the wavelength runs, gain, read noise,
  saturation, pixel scale;
* :class:`FrameInfo` — what a file is (instrument, frame type, setup, night, exposure,
  airmass, position, OB, SofI nod offsets, ...).

:class:`Instrument` is the abstract base of :class:`~specred.instruments.efosc2.EFOSC2`
and :class:`~specred.instruments.sofi.SOFI`.  It implements the keyword handling both
instruments share (essential keywords, dates, night label, airmass, coordinates, OB) and
leaves the frame-type rules, the setup key and the detector geometry to the subclasses.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any

from astropy.io import fits

from ..errors import BadFrameError, SpecredError

log = logging.getLogger(__name__)

FRAME_TYPES = ("bias", "flat", "lamp_off_flat", "arc", "flux_standard", "telluric_standard",
               "science", "imaging", "unknown")
"""Every frame type a :class:`FrameInfo` can carry."""

ON_SKY_TYPES = ("flux_standard", "telluric_standard", "science")
"""Frame types pointed at the sky (airmass and coordinates matter)."""

NIGHT_OFFSET_HOURS = 16.0
"""The ESO night label is the UTC date of (DATE-OBS - 16 h): La Silla local noon is at
about 16:43 UT, so the afternoon/evening calibrations, the night and the next morning's
calibrations all share one label."""

MJD_UNIX_EPOCH = 40587.0   # MJD of 1970-01-01T00:00:00 UTC


# ============================================================================ dataclasses
@dataclass(frozen=True)
class DetectorGeometry:
    """Where the pixels of a frame are and what they measure.

    All sections are numpy ``(rows, columns)`` slices, 0-based, in the array as stored in
    the file (raw or already trimmed, see :meth:`Instrument.is_raw`).

    Attributes
    ----------
    shape : tuple of int
        ``(ny, nx)`` numpy shape of the array in the file.
    data_section : tuple of slice
        Pixels that can receive light (no prescan/overscan).
    prescan, overscan : tuple of slice or None
        Regions holding the bias level (EFOSC2: 6 prescan columns on the left, 6 overscan
        rows on the top); None when absent (SofI, processed frames).
    trim_section : tuple of slice
        Region kept for the reduction (the part of the detector the slit illuminates).
    dispersion_axis : int
        Numpy axis along which the wavelength changes (0 = rows for both instruments).
    wavelength_increases : bool
        True when the wavelength grows with the row index (EFOSC2), False (SofI).
    binning : tuple of int
        ``(bin along axis 0, bin along axis 1)`` = ``(BINY, BINX)``, numpy order.
    gain : float
        e-/ADU.
    read_noise : float
        e- per read.
    saturation : float
        ADU in the raw frame above which a pixel is unusable.
    pixel_scale : float
        arcsec per (binned) pixel along the slit (axis 1).
    """

    shape: tuple[int, int]
    data_section: tuple[slice, slice]
    prescan: tuple[slice, slice] | None
    overscan: tuple[slice, slice] | None
    trim_section: tuple[slice, slice]
    dispersion_axis: int
    wavelength_increases: bool
    binning: tuple[int, int]
    gain: float
    read_noise: float
    saturation: float
    pixel_scale: float

    @property
    def trim_shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the array after trimming to :attr:`trim_section`."""
        return tuple(len(range(*s.indices(n))) for s, n in zip(self.trim_section, self.shape))  # type: ignore[return-value]


@dataclass(frozen=True)
class FrameInfo:
    """What one FITS file is, read from its header only.

    Attributes
    ----------
    path : str
        File path as found by discovery.
    instrument : str
        ``'EFOSC2'`` or ``'SOFI'``.
    frame_type : str
        One of :data:`FRAME_TYPES`.
    setup : str
        Grouping key, human readable: EFOSC2 ``'Gr#13/Free/slit#1.0/2x2'`` (bias frames:
        the binning only, ``'2x2'``), SofI ``'GB/GBF/long_slit_1'``.
    object : str
        ``OBJECT``.
    date_obs : str
        ``DATE-OBS`` (UTC, ISO).
    mjd : float
        ``MJD-OBS`` (computed from DATE-OBS when absent).
    night : str
        ESO night label ``YYYY-MM-DD`` = UTC date of (DATE-OBS - 16 h).
    exptime : float
        ``EXPTIME`` in s (SofI: one DIT; the total is ``exptime * ndit``).
    airmass : float or None
        Mean of ``ESO TEL AIRM START/END``, else ``AIRMASS``, else None.
    ra, dec : float or None
        Pointing in degrees (``RA``/``DEC``).
    obs_id : int or None
        ``ESO OBS ID``.
    ndit : int or None
        SofI ``ESO DET NDIT``.
    offset_x, offset_y : float or None
        SofI ``ESO SEQ CUMOFFSETX/Y`` (arcsec); None for EFOSC2.
    nod : str or None
        ``'A'``/``'B'`` for SofI nodding frames (set by
        :func:`specred.discover.assign_nods`).
    lamp : str or None
        Arc lamp(s) (``'HeAr'``, ``'Xenon'``) or flat lamp state (``'Halogen'``,
        ``'off'``).
    problems : tuple of str
        Non-fatal issues found in the header.
    nod_throw, jitter_width : float or None
        SofI ``ESO SEQ NODTHROW`` and ``ESO SEQ JITTER WIDTH`` (arcsec) when present.
    grism, filter, slit : str or None
        Instrument set-up elements the setup key is built from.
    dpr_type, tpl_id : str or None
        ``ESO DPR TYPE`` and ``ESO TPL ID``.
    tpl_expno, tpl_nexp : int or None
        Exposure number within the template and number of exposures of the template.
    standard : str or None
        Name of the standard star matched by position (``calib.find_standard``).
    """

    path: str
    instrument: str
    frame_type: str
    setup: str
    object: str
    date_obs: str
    mjd: float
    night: str
    exptime: float
    airmass: float | None
    ra: float | None
    dec: float | None
    obs_id: int | None
    ndit: int | None
    offset_x: float | None
    offset_y: float | None
    nod: str | None
    lamp: str | None
    problems: tuple[str, ...] = ()
    nod_throw: float | None = None
    jitter_width: float | None = None
    grism: str | None = None
    filter: str | None = None
    slit: str | None = None
    dpr_type: str | None = None
    tpl_id: str | None = None
    tpl_expno: int | None = None
    tpl_nexp: int | None = None
    standard: str | None = None

    @property
    def filename(self) -> str:
        """The file name without its folder."""
        return re.split(r"[\\/]", self.path)[-1]

    @property
    def total_exptime(self) -> float:
        """Total integration time in s (SofI: DIT x NDIT; EFOSC2: EXPTIME)."""
        return self.exptime * (self.ndit or 1) if self.instrument == "SOFI" else self.exptime

    def to_row(self) -> dict[str, Any]:
        """A flat dict for an astropy Table (ECSV).

        Missing values become table-friendly: None floats -> NaN, None integers -> -1,
        None strings -> ``''``; ``problems`` is joined with ``'; '``.
        """
        row: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "problems":
                v = "; ".join(v)
            elif v is None:
                t = str(f.type)
                v = math.nan if "float" in t else (-1 if "int" in t else "")
            row[f.name] = v
        return row

    def as_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (None kept)."""
        return asdict(self)


# ============================================================================ header helpers
def hget(header: fits.Header, key: str, default: Any = None) -> Any:
    """``header.get`` that tolerates malformed cards and strips string values."""
    try:
        v = header.get(key, default)
    except Exception:   # noqa: BLE001 - a malformed card must not stop classification
        return default
    if isinstance(v, str):
        v = v.strip()
    if v is None or v is fits.card.UNDEFINED:
        return default
    return v


def hstr(header: fits.Header, key: str) -> str | None:
    """String value of ``key`` (stripped), None when absent or empty."""
    v = hget(header, key)
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def hfloat(header: fits.Header, key: str) -> float | None:
    """Float value of ``key``, None when absent or not numeric."""
    v = hget(header, key)
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def hint(header: fits.Header, key: str) -> int | None:
    """Integer value of ``key``, None when absent or not integral."""
    f = hfloat(header, key)
    if f is None or f != int(f):
        return None
    return int(f)


def hbool(header: fits.Header, key: str) -> bool | None:
    """Boolean value of ``key`` (FITS logical or strings T/F, ON/OFF, YES/NO)."""
    v = hget(header, key)
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    s = str(v).strip().upper()
    if s in ("T", "TRUE", "ON", "YES", "1"):
        return True
    if s in ("F", "FALSE", "OFF", "NO", "0"):
        return False
    return None


def dpr_tokens(value: str | None) -> set[str]:
    """``'LAMP,FLAT'`` -> ``{'LAMP', 'FLAT'}`` (upper case, blanks dropped)."""
    if not value:
        return set()
    return {t.strip().upper() for t in re.split(r"[,\s]+", value) if t.strip()}


def parse_date_obs(value: Any) -> datetime:
    """DATE-OBS (ISO 8601, UTC) as an aware datetime; raises ValueError."""
    if not isinstance(value, str) or len(value) < 10 or value[4] != "-":
        raise ValueError(f"not an ISO date-time: {value!r}")
    s = value.strip().rstrip("Z")
    dt = datetime.fromisoformat(s)
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def night_label(date_obs: str | datetime) -> str:
    """ESO night label ``YYYY-MM-DD``: the UTC date of (DATE-OBS - 16 h).

    Examples
    --------
    >>> night_label('2018-12-05T03:10:00')
    '2018-12-04'
    >>> night_label('2018-12-04T21:00:00')   # evening calibrations
    '2018-12-04'
    >>> night_label('2018-12-05T10:30:00')   # next morning's arcs
    '2018-12-04'
    """
    dt = parse_date_obs(date_obs) if isinstance(date_obs, str) else date_obs
    return (dt - timedelta(hours=NIGHT_OFFSET_HOURS)).strftime("%Y-%m-%d")


def mjd_from_datetime(dt: datetime) -> float:
    """MJD (UTC) of an aware datetime."""
    return MJD_UNIX_EPOCH + dt.timestamp() / 86400.0


def parse_coordinate(value: Any, hours: bool) -> float | None:
    """Header RA/DEC in degrees: float degrees or a sexagesimal string."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    s = str(value).strip()
    try:
        return float(s)
    except ValueError:
        pass
    m = re.fullmatch(r"([+-]?)(\d+)[:\s]+(\d+)[:\s]+(\d+(?:\.\d*)?)", s)
    if not m:
        return None
    sign = -1.0 if m.group(1) == "-" else 1.0
    v = sign * (float(m.group(2)) + float(m.group(3)) / 60.0 + float(m.group(4)) / 3600.0)
    return v * 15.0 if hours else v


def radec(header: fits.Header) -> tuple[float | None, float | None]:
    """Pointing ``(RA, DEC)`` in degrees from the ``RA``/``DEC`` keywords (None if absent)."""
    return (parse_coordinate(hget(header, "RA"), hours=True),
            parse_coordinate(hget(header, "DEC"), hours=False))


def parse_section(value: str) -> tuple[int, int, int, int]:
    """IRAF/FITS section ``'[x1:x2,y1:y2]'`` -> ``(x1, x2, y1, y2)``, 1-based inclusive."""
    m = re.fullmatch(r"\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*", str(value))
    if not m:
        raise ValueError(f"not a section: {value!r}")
    x1, x2, y1, y2 = (int(g) for g in m.groups())
    return x1, x2, y1, y2


def image_shape(header: fits.Header) -> tuple[int, ...]:
    """Numpy shape from NAXIS/NAXISn (``()`` when NAXIS = 0 or absent)."""
    n = hint(header, "NAXIS") or 0
    return tuple(hint(header, f"NAXIS{i}") or 0 for i in range(n, 0, -1))


def section_in_array(raw_region: tuple[int, int, int, int], stored_region: tuple[int, int, int, int],
                     shape: tuple[int, int]) -> tuple[slice, slice]:
    """Intersect a raw-frame region with the raw region a processed array holds.

    Parameters
    ----------
    raw_region : (x1, x2, y1, y2)
        Wanted region in raw-frame pixels (1-based, inclusive).
    stored_region : (x1, x2, y1, y2)
        Raw-frame region the stored array covers (its ``CCDSEC``).
    shape : (ny, nx)
        Shape of the stored array.

    Returns
    -------
    (slice, slice)
        The intersection in 0-based numpy indices of the stored array (clipped to it).
    """
    ny, nx = shape
    x1 = max(raw_region[0], stored_region[0]) - stored_region[0]
    x2 = min(raw_region[1], stored_region[1]) - stored_region[0] + 1
    y1 = max(raw_region[2], stored_region[2]) - stored_region[2]
    y2 = min(raw_region[3], stored_region[3]) - stored_region[2] + 1
    x1, x2 = min(max(x1, 0), nx), min(max(x2, 0), nx)
    y1, y2 = min(max(y1, 0), ny), min(max(y2, 0), ny)
    return slice(y1, max(y1, y2)), slice(x1, max(x1, x2))


def stored_region(header: fits.Header, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Raw-frame region (1-based, inclusive) covered by a processed array.

    From ``CCDSEC`` when present, else from ``LTV1/LTV2`` (raw = array - LTV), else the
    array itself.
    """
    ny, nx = shape
    ccdsec = hstr(header, "CCDSEC")
    if ccdsec:
        try:
            x1, x2, y1, y2 = parse_section(ccdsec)
            if x2 - x1 + 1 == nx and y2 - y1 + 1 == ny:
                return x1, x2, y1, y2
            log.debug("CCDSEC %s does not match the array shape %s; using LTV", ccdsec, shape)
        except ValueError:
            log.debug("unparsable CCDSEC %r; using LTV", ccdsec)
    ltv1 = hfloat(header, "LTV1") or 0.0
    ltv2 = hfloat(header, "LTV2") or 0.0
    x1, y1 = 1 - int(round(ltv1)), 1 - int(round(ltv2))
    return x1, x1 + nx - 1, y1, y1 + ny - 1


# ============================================================================ Instrument
class Instrument:
    """Abstract instrument: header -> frame type, setup key and detector geometry.

    Subclasses set the class attributes and implement :meth:`matches`,
    :meth:`setup_key`, :meth:`geometry`, :meth:`raw_shape` and :meth:`_classify_type`.

    Attributes
    ----------
    name : str
        ``'EFOSC2'`` or ``'SOFI'``.
    instrume : tuple of str
        Accepted values of the ``INSTRUME`` keyword (upper case).
    required_keywords : tuple of str
        Keywords without which a file is rejected (:class:`BadFrameError`); in addition
        at least one of ``ESO DPR TYPE`` and ``OBJECT`` must be present.
    wavelength_medium : str
        ``'air'`` (EFOSC2) or ``'vacuum'`` (SofI).
    arc_lamp : str
        Arc lamp whose line list calibrates the instrument (``'HeAr'``, ``'Xe'``).
    """

    name: str = ""
    instrume: tuple[str, ...] = ()
    required_keywords: tuple[str, ...] = ("INSTRUME", "DATE-OBS", "EXPTIME")
    wavelength_medium: str = ""
    arc_lamp: str = ""

    # -- to implement -------------------------------------------------------------
    def matches(self, header: fits.Header) -> bool:
        """True when the header belongs to this instrument (``INSTRUME``)."""
        v = hstr(header, "INSTRUME")
        return v is not None and v.upper() in self.instrume

    def setup_key(self, header: fits.Header) -> str:
        """Human-readable grouping key of the instrument set-up."""
        raise NotImplementedError

    def geometry(self, header: fits.Header) -> DetectorGeometry:
        """Detector geometry of the array the header describes (raw or processed)."""
        raise NotImplementedError

    def raw_shape(self, header: fits.Header) -> tuple[int, int]:
        """``(ny, nx)`` of a raw frame of this instrument in this read-out mode."""
        raise NotImplementedError

    def _classify_type(self, header: fits.Header, info: dict[str, Any],
                       problems: list[str]) -> str:
        """Frame type from the header; may fill ``info`` (lamp, standard, setup, ...)
        and append to ``problems``."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------
    def is_raw(self, header: fits.Header) -> bool:
        """True when the array has the raw read-out shape (not trimmed by processing)."""
        shape = image_shape(header)
        if len(shape) != 2:
            return False
        return tuple(shape) == tuple(self.raw_shape(header))

    def check_essential(self, header: fits.Header, path: str = "") -> None:
        """Raise :class:`BadFrameError` naming every missing essential keyword."""
        missing = [k for k in self.required_keywords if hget(header, k) is None]
        if hget(header, "ESO DPR TYPE") is None and hget(header, "OBJECT") is None:
            missing.append("ESO DPR TYPE and OBJECT")
        if missing:
            word = "keyword" if len(missing) == 1 else "keywords"
            raise BadFrameError(path, f"missing essential {word} {', '.join(missing)}")

    def classify(self, header: fits.Header, path: str = "") -> FrameInfo:
        """Read everything specred needs to know about a frame from its header.

        Parameters
        ----------
        header : astropy.io.fits.Header
            Primary header (or the image extension header of a compressed file).
        path : str
            File path, for messages and :attr:`FrameInfo.path`.

        Returns
        -------
        FrameInfo

        Raises
        ------
        BadFrameError
            An essential keyword (INSTRUME, DATE-OBS, EXPTIME, DPR TYPE/OBJECT) is
            missing or unparsable.
        """
        path = str(path)
        self.check_essential(header, path)
        problems: list[str] = []
        raw_date = hget(header, "DATE-OBS")
        try:
            dt = parse_date_obs(raw_date)
        except (ValueError, TypeError):
            raise BadFrameError(path, f"invalid DATE-OBS {raw_date!r} (expected an ISO date-time)") from None
        exptime = hfloat(header, "EXPTIME")
        if exptime is None or exptime < 0:
            raise BadFrameError(path, f"invalid EXPTIME {hget(header, 'EXPTIME')!r}")
        mjd = hfloat(header, "MJD-OBS")
        if mjd is None:
            mjd = mjd_from_datetime(dt)
            problems.append("missing keyword MJD-OBS (computed from DATE-OBS)")
        elif abs(mjd - mjd_from_datetime(dt)) > 1.0 / 1440.0:
            problems.append(f"MJD-OBS {mjd:.6f} disagrees with DATE-OBS {raw_date} by "
                            f"{abs(mjd - mjd_from_datetime(dt)) * 1440:.1f} min")
        info: dict[str, Any] = {
            "path": path,
            "instrument": self.name,
            "object": hstr(header, "OBJECT") or "",
            "date_obs": str(raw_date).strip(),
            "mjd": float(mjd),
            "night": night_label(dt),
            "exptime": float(exptime),
            "obs_id": hint(header, "ESO OBS ID"),
            "ndit": None, "offset_x": None, "offset_y": None, "nod": None, "lamp": None,
            "dpr_type": hstr(header, "ESO DPR TYPE"),
            "tpl_id": hstr(header, "ESO TPL ID"),
            "tpl_expno": hint(header, "ESO TPL EXPNO"),
            "tpl_nexp": hint(header, "ESO TPL NEXP"),
        }
        frame_type = self._classify_type(header, info, problems)
        if frame_type not in FRAME_TYPES:   # pragma: no cover - programming error
            raise SpecredError(f"internal error: unknown frame type {frame_type!r}")
        info["frame_type"] = frame_type
        if "setup" not in info:
            info["setup"] = self.setup_key(header)
        on_sky = frame_type in ON_SKY_TYPES
        info["airmass"] = self._airmass(header, problems if on_sky else None)
        ra, dec = radec(header)
        if on_sky:
            for key, v in (("RA", ra), ("DEC", dec)):
                if v is None:
                    problems.append(f"missing keyword {key}")
        info["ra"], info["dec"] = ra, dec
        info["problems"] = tuple(problems)
        return FrameInfo(**info)

    @staticmethod
    def _airmass(header: fits.Header, problems: list[str] | None) -> float | None:
        """Mean of ESO TEL AIRM START/END, else AIRMASS, else None (noted in problems
        when a list is given)."""
        a0, a1 = hfloat(header, "ESO TEL AIRM START"), hfloat(header, "ESO TEL AIRM END")
        if a0 is not None and a1 is not None:
            return 0.5 * (a0 + a1)
        if a0 is not None or a1 is not None:
            if problems is not None:
                problems.append("missing keyword ESO TEL AIRM " + ("END" if a1 is None else "START"))
            return a0 if a0 is not None else a1
        am = hfloat(header, "AIRMASS")
        if problems is not None:
            problems.append("missing keyword ESO TEL AIRM START" + (" (using AIRMASS)" if am is not None else ""))
            if am is None:
                problems.append("missing keyword AIRMASS: airmass unknown")
        return am

    def __repr__(self) -> str:
        return f"<Instrument {self.name}>"


def match_standard(ra: float | None, dec: float | None, name: str | None = None):
    """Position match against the standard-star lists (``specred.calib.find_standard``).

    Returns the ``StandardStar`` or None.  When :mod:`specred.calib` is not available
    (or fails) the match is skipped and None is returned, so classification still
    works from the header alone.
    """
    if ra is None or dec is None:
        return None
    try:
        from specred import calib
        find = calib.find_standard
    except Exception as exc:   # noqa: BLE001 - calib optional for classification
        _warn_once(f"standard-star position matching unavailable ({exc.__class__.__name__}: {exc})")
        return None
    try:
        return find(ra, dec, name=name)
    except Exception as exc:   # noqa: BLE001
        _warn_once(f"standard-star position matching failed ({exc.__class__.__name__}: {exc})")
        return None


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


def slit_width_arcsec(slit_name: str | None) -> float | None:
    """Slit width (arcsec) from an NTT slit name: EFOSC2 ``'slit#1.0'`` -> 1.0, SofI
    ``'long_slit_1'`` -> 1.0, ``'long_slit_0.6'`` -> 0.6; None when the name has no width."""
    import re

    m = re.search(r"(\d+(?:\.\d+)?)\s*$", str(slit_name or ""))
    return float(m.group(1)) if m else None
