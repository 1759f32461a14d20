"""QC plots and a self-contained HTML night report of a reduced night.

:func:`write_report` reads the output folder of ``specred reduce RAW/ --out OUT/`` — files
on disk only, never pipeline objects — and writes

* ``OUT/qc/*.png`` — one PNG per plot (``<tag>_bias.png``, ``<tag>_flat.png``,
  ``<tag>_arc.png``, ``<tag>_sensitivity.png``, ``<tag>_telluric.png``,
  ``<target>_<INST>_1d.png``, ``<target>_<INST>_2d.png``);
* ``OUT/report.html`` — one page with the same PNGs embedded as base64 ``data:`` URIs, inline
  CSS and a few lines of inline JavaScript: no external resource of any kind (a
  Content-Security-Policy in the page forbids them), so the file can be mailed or archived
  on its own.

The page has five sections, each ``<section id=...>`` with an ``<h2>``:

``summary``
    night(s), instruments, number of targets OK / flagged / failed per instrument, the
    run time from ``OUT/specred.log`` when present, and the night table (``night.ecsv``)
    with a link to each target's card.
``frames``
    every file found in the raw folder (``OUT/frames.ecsv``): type, object, set-up,
    exposure, whether it was used; files with a problem are highlighted.
``problems``
    one line per problem: frames that failed to reduce (``FAILED: ...`` rows of
    ``night.ecsv``), files reported by discovery (``frames.ecsv`` problems and the
    ``problems`` list in ``night.ecsv`` meta) and products listed but missing on disk.
``calibrations``
    per calibration tag (``<INST>_<night>_<setup>``): master bias, normalised flat (robust
    1–99 % stretch), arc residuals against wavelength (from the ``LINES`` table of the
    wavelength map when it exists, else the RMS from its header), sensitivity curve and
    telluric transmission.
``targets``
    one card per product of ``night.ecsv``: name, instrument, kind, S/N, flags, catalogue
    match, the 2D sky-subtracted cut-out (``OUT/qc/<target>_<INST>_2d.fits``) with the
    trace, and the flux-calibrated 1D spectrum with its ±1σ band, masked pixels blanked and,
    when the catalogue redshift ``z_cat`` is known, the expected lines of
    :func:`specred.calib.emission_lines` at λ_rest (1 + z) in the product's medium.

Every input may be absent: its place then shows ``not available: <reason>`` and the rest of
the page is still written.  A script at the end of the page sets, on ``load``,
``document.body.dataset.imagesOk`` / ``imagesBroken`` (images decoded / not) and
``rendered = "yes"``, so a headless browser's ``--dump-dom`` tells whether the page renders.

Plots use matplotlib's object API (:class:`~matplotlib.figure.Figure` with the Agg canvas;
no pyplot, no global state) at a modest resolution; large images are block-averaged before
display, so a night of a dozen targets takes a few seconds.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from matplotlib.ticker import MaxNLocator

from . import __version__
from .errors import SpecredError
from .io import atomic_path, safe_name

__all__ = ["write_report", "SECTIONS"]

log = logging.getLogger(__name__)

#: Section ids of the page, in order.
SECTIONS = ("summary", "frames", "problems", "calibrations", "targets")
_SECTION_TITLES = {"summary": "Summary", "frames": "Frames", "problems": "Problems",
                   "calibrations": "Calibrations", "targets": "Targets"}

DPI = 85                     # resolution of every PNG
_PANEL_IN = 4.1              # width of calibration plots [inch] (three per row in the page)
_WIDE_IN = 12.4              # width of the target plots [inch] (the width of a card)
_MAX_IMAGE_PX = 600          # images are block-averaged to at most this many pixels a side
_CAL_RE = re.compile(r"^(?P<tag>.+)_(?P<kind>bias|flat|wavemap|sensitivity|telluric)\.(?:fits|ecsv)$")
#: calibration panels per tag: kind -> (file name after '<tag>_', panel title)
_CAL_PANELS = {"bias": ("bias.fits", "master bias"), "flat": ("flat.fits", "flat field"),
               "arc": ("wavemap.fits", "wavelength solution"), "sensitivity": ("sensitivity.ecsv", "sensitivity"),
               "telluric": ("telluric.ecsv", "telluric transmission")}
_LOG_TS = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")


# ============================================================================ small helpers
def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _na(reason: str) -> str:
    return f'<p class="na">not available: {_esc(reason)}</p>'


def _safe(name: str) -> str:
    """File-system (and HTML id) safe version of a name, as the pipeline names products."""
    return safe_name(name) or "_"


def _num(value, fmt: str = "{:.2f}", none: str = "–") -> str:
    """Format a number; NaN, None, masked or non-numeric give ``none``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return none
    return fmt.format(v) if np.isfinite(v) else none


def _float(value) -> float:
    """A table cell as a float (NaN when masked, empty or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _str(value) -> str:
    """A table cell as a clean string (masked / None -> '')."""
    if value is None or value is np.ma.masked:
        return ""
    return str(value).strip()


def _read_table(path: Path) -> tuple[Table | None, str]:
    """(table, '') or (None, reason it is not available)."""
    if not path.exists():
        return None, f"no {path.name}"
    try:
        return Table.read(path, format="ascii.ecsv"), ""
    except Exception as exc:          # any reader error: report it, keep going
        return None, f"cannot read {path.name}: {type(exc).__name__}: {exc}"


def _row(table: Table, i: int) -> dict:
    return {c: table[c][i] for c in table.colnames}


def _sample(a, max_samples: int = 200_000) -> np.ndarray:
    """The finite values of ``a`` (a regular strided subsample of them for big arrays:
    plenty for display limits and QC statistics, and fast)."""
    a = np.asarray(a, dtype=float).ravel()
    if a.size > max_samples:
        a = a[:: a.size // max_samples + 1]
    return a[np.isfinite(a)]


def _robust_limits(a, lo: float = 1.0, hi: float = 99.0):
    """Percentile limits of the finite values of ``a`` (subsampled for big arrays)."""
    a = _sample(a)
    if a.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(a, [lo, hi])
    if not vmax > vmin:
        pad = abs(vmin) * 0.01 or 1.0
        vmin, vmax = vmin - pad, vmax + pad
    return float(vmin), float(vmax)


def _block_mean(img: np.ndarray, max_px: int = _MAX_IMAGE_PX) -> tuple[np.ndarray, int]:
    """Block-average a 2D image so that no side exceeds ``max_px``; returns (image, factor)."""
    img = np.asarray(img, dtype=float)
    f = int(np.ceil(max(img.shape) / max_px))
    if f <= 1:
        return img, 1
    ny, nx = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    blocks = img[:ny, :nx].reshape(ny // f, f, nx // f, f)
    with warnings.catch_warnings():                 # all-NaN blocks: NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(blocks, axis=(1, 3)), f


def _figure(width: float, height: float, *, left: float = 0.8, right: float = 0.15, bottom: float = 0.5,
            top: float = 0.3, cbar: bool = False):
    """(figure, axes[, colour-bar axes]): a matplotlib Figure on its own Agg canvas (no pyplot,
    no global figure registry) with one axes placed by fixed margins in inches — a fixed
    layout draws once, about twice as fast as constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    cb_w = 0.9 if cbar else 0.0
    ax = fig.add_axes((left / width, bottom / height, (width - left - right - cb_w) / width,
                       (height - bottom - top) / height))
    if not cbar:
        return fig, ax
    cax = fig.add_axes(((width - right - cb_w + 0.12) / width, bottom / height, 0.14 / width,
                        (height - bottom - top) / height))
    return fig, ax, cax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    return buf.getvalue()


def _write_bytes(data: bytes, path: Path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def _write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def _mpl(text) -> str:
    """Text for a matplotlib label: a literal '$' must not start mathtext."""
    return str(text).replace("$", r"\$")


def _medium(header) -> str:
    """'air' / 'vacuum' from a WAVEMED keyword ('air' when absent)."""
    return "vacuum" if str(header.get("WAVEMED", "AIR")).strip().upper().startswith("VAC") else "air"


def _wave_label(medium: str) -> str:
    return f"wavelength in {medium} [Å]"


def _wave_ticks(wave: np.ndarray, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Nice wavelength tick values and their (fractional) pixel positions for an image whose
    x axis is pixel index with wavelength ``wave`` (monotonic) per pixel."""
    w = np.asarray(wave, dtype=float)
    good = np.isfinite(w)
    idx = np.arange(w.size, dtype=float)[good]
    w = w[good]
    if w.size < 2:
        return np.array([]), np.array([])
    if w[-1] < w[0]:
        w, idx = w[::-1], idx[::-1]
    ticks = MaxNLocator(n).tick_values(w[0], w[-1])
    ticks = ticks[(ticks >= w[0]) & (ticks <= w[-1])]
    return ticks, np.interp(ticks, w, idx)


# ============================================================================ plots
@dataclass(frozen=True)
class _Note:
    """Ready HTML shown in a panel instead of a plot."""
    html: str


class _Plots:
    """Renders figures to PNG, saves them under ``OUT/qc/`` and returns ``<figure>`` HTML."""

    def __init__(self, out: Path):
        self.qc = out / "qc"
        self.count = 0

    def figure(self, fig, name: str, alt: str, caption: str = "") -> str:
        data = _png(fig)
        _write_bytes(data, self.qc / f"{_safe(name)}.png")
        self.count += 1
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f'<figure><img src="{uri}" alt="{_esc(alt)}">{cap}</figure>'

    def safely(self, make, name: str, alt: str, what: str) -> str:
        """A panel from ``make()``, which returns (figure, caption HTML), a :class:`_Note`
        (HTML shown instead of a plot) or a string (why the plot is not available); any
        error while reading or plotting also becomes a 'not available' line."""
        try:
            res = make()
            if isinstance(res, str):
                content = _na(res)
            elif isinstance(res, _Note):
                content = res.html
            else:
                content = self.figure(res[0], name, alt, res[1])
        except Exception as exc:     # a bad input must not cost the night its report
            log.warning("report: %s: %s: %s", what, type(exc).__name__, exc)
            content = _na(f"cannot plot: {type(exc).__name__}: {exc}")
        return f'<div class="panel"><h4>{_esc(what)}</h4>{content}</div>'


def _image_fig(img: np.ndarray, title: str, cbar_label: str):
    small, f = _block_mean(img)
    vmin, vmax = _robust_limits(small)
    fig, ax, cax = _figure(_PANEL_IN, 3.8, right=0.55, cbar=True)
    im = ax.imshow(small, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest", extent=(-0.5, small.shape[1] * f - 0.5, -0.5, small.shape[0] * f - 0.5))
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(_mpl(title), fontsize=9)
    fig.colorbar(im, cax=cax, label=cbar_label)
    return fig


def _plot_bias(path: Path):
    if not path.exists():
        return f"no {path.name}"
    img = np.asarray(fits.getdata(path), dtype=float)
    v = _sample(img)
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * 1.4826
    fig = _image_fig(img, path.name, "counts")
    return fig, f"master bias {img.shape[1]}×{img.shape[0]}: median {med:.1f}, robust σ {mad:.2f}; stretch 1–99 %"


def _plot_flat(path: Path):
    if not path.exists():
        return f"no {path.name}"
    img = np.asarray(fits.getdata(path), dtype=float)
    lo, hi = _robust_limits(img, 0.5, 99.5)
    fig = _image_fig(img, path.name, "normalised response")
    return fig, (f"normalised flat {img.shape[1]}×{img.shape[0]}: median {np.median(_sample(img)):.3f}, "
                 f"0.5–99.5 % range {lo:.3f}–{hi:.3f}; stretch 1–99 %")


def _arc_numbers(hdr) -> str:
    def v(key, fmt):
        x = hdr.get(key)
        return _num(x, fmt) if x is not None and float(x) >= 0 else "–"
    return (f"arc RMS {v('WAVERMS', '{:.3f}')} px = {v('WAVERMSA', '{:.3f}')} Å from "
            f"{hdr.get('WAVENLIN', '–')} lines ({_medium(hdr)} wavelengths)")


def _plot_arc(path: Path):
    if not path.exists():
        return f"no {path.name}"
    with fits.open(path, memmap=True) as hdul:
        hdr = hdul[0].header.copy()
        lines = Table(hdul["LINES"].data) if "LINES" in hdul else None
    numbers = _esc(_arc_numbers(hdr))
    if lines is None or len(lines) == 0 or not {"wavelength", "residual_aa"} <= set(lines.colnames):
        # no line table: the header numbers stand in for the plot
        return _Note(f'<p class="note">{numbers}</p><p class="na">arc residual plot not available: '
                     f"no LINES table in {_esc(path.name)}</p>")
    w = np.asarray(lines["wavelength"], float)
    r = np.asarray(lines["residual_aa"], float)
    used = np.asarray(lines["used"], bool) if "used" in lines.colnames else np.ones(w.size, bool)
    fig, ax = _figure(_PANEL_IN, 3.2)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.plot(w[used], r[used], "o", ms=3.5, color="#1f77b4", label=f"used ({used.sum()})")
    if (~used).any():
        ax.plot(w[~used], r[~used], "x", ms=4, color="#d62728", label=f"rejected ({(~used).sum()})")
    rms = float(np.sqrt(np.nanmean(r[used] ** 2))) if used.any() else np.nan
    if np.isfinite(rms):
        ax.axhspan(-rms, rms, color="#1f77b4", alpha=0.08, lw=0)
    ax.set_xlabel(_wave_label(_medium(hdr)))
    ax.set_ylabel("residual [Å]")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_title(f"arc residuals, RMS {rms:.3f} Å", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig, numbers


def _table_wave(t: Table) -> np.ndarray:
    col = t["wavelength"]
    unit = getattr(col, "unit", None)
    if unit is not None:
        import astropy.units as u
        return np.asarray(u.Quantity(col).to_value(u.AA, equivalencies=u.spectral()), float)
    return np.asarray(col, float)


def _plot_sensitivity(path: Path):
    t, why = _read_table(path)
    if t is None:
        return why
    w, s = _table_wave(t), np.asarray(t["sensitivity"], float)
    m = t.meta
    fig, ax = _figure(_PANEL_IN, 3.2)
    ax.plot(w, s, color="#2c7bb6", lw=1.2)
    ax.set_xlabel(_wave_label(str(m.get("medium", "air"))))
    ax.set_ylabel("S [mag]")
    smin, smax = np.nanmin(s), np.nanmax(s)
    ax.set_ylim(smin - 0.05 * (smax - smin + 0.1), smax + 0.05 * (smax - smin + 0.1))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_title(f"sensitivity: {_mpl(m.get('standard', '?'))}", fontsize=9)
    ax.grid(alpha=0.3)
    cap = (f"S = 2.5 log10[(counts/s/Å)/(erg/s/cm²/Å)]; standard {_esc(m.get('standard', '–'))}, airmass "
           f"{_num(m.get('airmass'), '{:.3f}')}, fit RMS {_num(m.get('rms_mag'), '{:.4f}')} mag")
    return fig, cap


def _plot_telluric(path: Path):
    t, why = _read_table(path)
    if t is None:
        return why
    w, tr = _table_wave(t), np.asarray(t["transmission"], float)
    sig = np.sqrt(np.clip(np.asarray(t["variance"], float), 0, None)) if "variance" in t.colnames else None
    m = t.meta
    fig, ax = _figure(_PANEL_IN, 3.2)
    if sig is not None:
        ax.fill_between(w, tr - sig, tr + sig, color="#7fbf7f", alpha=0.4, lw=0, label="±1σ")
    ax.plot(w, tr, color="#1a7f1a", lw=0.9, label="transmission")
    ax.set_ylim(-0.05, 1.15)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(_wave_label(str(m.get("medium", "air"))))
    ax.set_ylabel("transmission")
    ax.set_title("telluric transmission", fontsize=9)
    ax.grid(alpha=0.3)
    cap = (f"measured at airmass {_num(m.get('airmass'), '{:.3f}')}"
           + (f"; source {_esc(m['source'])}" if m.get("source") else "")
           + f"; minimum {np.nanmin(tr):.2f}")
    return fig, cap


def _plot_telluric_stars(paths: list[Path]):
    """Transmission measured on each A0V telluric star of a SofI set-up, overlaid."""
    fig, ax = _figure(_PANEL_IN, 3.2)
    names, medium = [], "vacuum"
    for k, path in enumerate(paths):
        t, why = _read_table(path)
        if t is None:
            continue
        medium = str(t.meta.get("medium", medium))
        name = str(t.meta.get("source", path.stem.rsplit("_telluric_", 1)[-1]))
        ax.plot(_table_wave(t), np.asarray(t["transmission"], float), lw=0.8,
                label=f"{name} (X={_num(t.meta.get('airmass'), '{:.2f}')})")
        names.append(name)
    if not names:
        return "no readable telluric transmission"
    ax.set_ylim(-0.05, 1.15)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(_wave_label(medium))
    ax.set_ylabel("transmission")
    ax.set_title("telluric transmission (A0V stars)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    return fig, f"measured on {len(names)} A0V star(s): {_esc(', '.join(names))}"


# ---------------------------------------------------------------------------- target plots
def _expected_lines(z: float, medium: str, wmin: float, wmax: float):
    """(labels, observed wavelengths, kinds) of catalogue lines inside [wmin, wmax] at redshift z.

    The observed vacuum wavelength is λ_vac,rest (1 + z); for air products it is then
    converted to air (IAU/Morton 2000 via :func:`specred.calib.vacuum_to_air`), which is
    right also for UV rest-frame lines (whose tabulated 'air' value is the vacuum one)."""
    from . import calib

    t = calib.emission_lines()
    obs = np.asarray(t["wave_vac"], float) * (1.0 + z)
    if medium == "air":
        obs = np.asarray(calib.vacuum_to_air(obs), float)
    inside = (obs >= wmin) & (obs <= wmax)
    kinds = np.asarray(t["kind"]).astype(str) if "kind" in t.colnames else np.full(len(t), "emission")
    labels = np.asarray(t["label"] if "label" in t.colnames else t["name"]).astype(str)
    return labels[inside], obs[inside], kinds[inside]


def _read_spectrum(path: Path):
    with fits.open(path, memmap=False) as hdul:
        hdr = hdul[0].header.copy()
        tab = hdul["DATA"] if "DATA" in hdul else hdul[1]
        d = tab.data
        wave = np.asarray(d["wavelength"], float)
        flux = np.asarray(d["flux"], float)
        names = [n.lower() for n in d.columns.names]
        sig = np.asarray(d["uncertainty"], float) if "uncertainty" in names else np.full(wave.size, np.nan)
        mask = np.asarray(d["mask"], bool) if "mask" in names else np.zeros(wave.size, bool)
        if "WAVEMED" not in hdr and str(tab.header.get("TCTYP1", "")).strip().upper() == "WAVE":
            hdr["WAVEMED"] = "VACUUM"
    return hdr, wave, flux, sig, mask


def _plot_spectrum(path: Path, name: str, inst: str, z: float, snr_window: str):
    if not path.exists():
        return f"no {path.name}"
    hdr, wave, flux, sig, mask = _read_spectrum(path)
    medium = _medium(hdr)
    bad = mask | ~np.isfinite(flux)
    f = np.where(bad, np.nan, flux)
    s = np.where(bad | ~np.isfinite(sig), np.nan, sig)
    if not np.isfinite(f).any():
        return f"{path.name}: every pixel is masked"
    lo, hi = _robust_limits(f, 1.0, 99.0)
    span = hi - lo
    # top: the highest pixel that is not an isolated spike (a neighbour reaches half its
    # height, as in any resolved emission line), at most 6 spans above the 99th percentile
    pad = np.concatenate(([np.nan], f, [np.nan]))
    with np.errstate(invalid="ignore"):
        real = np.fmax(pad[:-2], pad[2:]) >= 0.5 * f
    if (real & np.isfinite(f)).any():
        hi = float(np.clip(np.nanmax(np.where(real, f, np.nan)), hi, hi + 6.0 * span))
    span = hi - lo
    lo, hi = lo - 0.1 * span, hi + (0.45 if np.isfinite(z) else 0.08) * span   # room for line labels
    peak = max(abs(lo), abs(hi))
    p = int(np.floor(np.log10(peak))) if peak > 0 else 0
    scale = 10.0 ** p
    fig, ax = _figure(_WIDE_IN, 3.4, left=0.85)
    if np.isfinite(s).any():
        ax.fill_between(wave, (f - s) / scale, (f + s) / scale, color="#9ecae1", alpha=0.6, lw=0, label="±1σ")
    ax.plot(wave, f / scale, color="#08306b", lw=0.7, label="flux")
    ax.axhline(0.0, color="0.7", lw=0.6)
    wmin, wmax = float(np.nanmin(wave)), float(np.nanmax(wave))
    m = re.match(r"^\s*([\d.]+)\s*-\s*([\d.]+)\s*$", snr_window or "")
    if m:
        ax.axvspan(float(m.group(1)), float(m.group(2)), color="#fdae61", alpha=0.25, lw=0, label="S/N window")
    n_lines = 0
    if np.isfinite(z):
        labels, obs, kinds = _expected_lines(z, medium, wmin, wmax)
        n_lines = obs.size
        absorption = kinds == "absorption"
        xt = ax.get_xaxis_transform()
        ax.vlines(obs[~absorption], 0, 1, transform=xt, colors="#b2182b", lw=0.7, alpha=0.55)
        ax.vlines(obs[absorption], 0, 1, transform=xt, colors="#2166ac", lw=0.7, alpha=0.55, linestyles="--")
        min_sep, last = 0.012 * (wmax - wmin), -np.inf     # labels closer than this are skipped
        order = np.argsort(obs)
        for lab, x in zip(labels[order], obs[order]):       # at most the ~40 lines in range
            if x - last > min_sep:
                ax.text(x, 0.98, f" {lab}", transform=xt, rotation=90, va="top",
                        ha="center", fontsize=6.5, color="0.25", clip_on=True)
                last = x
    ax.set_xlim(wmin, wmax)
    ax.set_ylim(lo / scale, hi / scale)
    ax.set_xlabel(_wave_label(medium))
    unit = "erg s$^{-1}$ cm$^{-2}$ Å$^{-1}$"
    ax.set_ylabel(f"$f_\\lambda$ [$10^{{{p}}}$ {unit}]" if p else f"$f_\\lambda$ [{unit}]")
    title = f"{_mpl(name)} ({_mpl(inst or hdr.get('INSTRUME', '?'))})"
    ax.set_title(title + (f", z = {z:.4f}" if np.isfinite(z) else ""), fontsize=9)
    ax.grid(alpha=0.25)
    cap = (f"{_esc(path.name)}: {wave.size} pixels, {int(bad.sum())} masked (blanked), "
           f"{wmin:.0f}–{wmax:.0f} Å ({medium}); light band ±1σ"
           + ("; orange: S/N window" if m else ""))
    if np.isfinite(z):
        cap += f"; {n_lines} catalogue lines marked at z = {z:.4f} (solid emission, dashed absorption)"
    return fig, cap


def _plot_2d(path: Path, name: str):
    if not path.exists():
        return f"no qc/{path.name}"
    with fits.open(path, memmap=False) as hdul:
        img = np.asarray(hdul[0].data, dtype=float)
        hdr = hdul[0].header.copy()
        wave = np.asarray(hdul["WAVE"].data, float).ravel() if "WAVE" in hdul else None
        trace = np.asarray(hdul["TRACE"].data, float).ravel() if "TRACE" in hdul else None
    if img.ndim != 2:
        return f"qc/{path.name}: primary HDU is not a 2D image"
    rows = np.arange(img.shape[0], dtype=float)
    if wave is not None and wave.size == img.shape[0] and np.nanmedian(np.diff(wave)) < 0:
        img, wave = img[::-1], wave[::-1]                    # wavelength increasing to the right
        trace = trace[::-1] if trace is not None and trace.size == img.shape[0] else trace
    vmin, vmax = _robust_limits(img, 1.0, 99.0)
    fig, ax = _figure(_WIDE_IN, 2.4, left=0.85)
    ax.imshow(img.T, origin="lower", cmap="gray_r", vmin=vmin, vmax=vmax, aspect="auto",
              interpolation="nearest")
    if trace is not None and trace.size == img.shape[0]:
        ax.plot(rows, trace, color="#e6550d", lw=0.8, alpha=0.45)
    if wave is not None and wave.size == img.shape[0]:
        ticks, pos = _wave_ticks(wave)
        ax.set_xticks(pos, [f"{t:.0f}" for t in ticks])
        ax.set_xlabel(_wave_label(_medium(hdr)))
    else:
        ax.set_xlabel("row (dispersion)")
    ax.set_xlim(-0.5, img.shape[0] - 0.5)
    ax.set_ylabel("column")
    ax.set_title(f"{_mpl(name)}: sky-subtracted 2D", fontsize=9)
    x0 = hdr.get("X0")
    cap = (f"qc/{_esc(path.name)}: {img.shape[0]} rows × {img.shape[1]} columns"
           + (f" from column {_esc(x0)} of the trimmed frame" if x0 is not None else "")
           + "; stretch 1–99 %" + ("; trace in orange" if trace is not None else ""))
    return fig, cap


# ============================================================================ page sections
@dataclass
class _Inputs:
    out: Path
    night: Table | None
    night_why: str
    frames: Table | None
    frames_why: str


def _status(flags: str) -> str:
    flags = flags.strip()
    if flags.upper().startswith("FAILED"):
        return "failed"
    return "ok" if flags in ("", "OK") else "flagged"


def _nights(inp: _Inputs, tags: list[str]) -> list[str]:
    if inp.frames is not None and "night" in inp.frames.colnames:
        n = sorted({_str(v) for v in inp.frames["night"]} - {""})
        if n:
            return n
    n = sorted({m.group(1) for t in tags if (m := re.search(r"_(\d{4}-\d{2}-\d{2})_", t))})
    if n:
        return n
    if inp.night is not None and "date_obs" in inp.night.colnames:
        return sorted({_str(v)[:10] for v in inp.night["date_obs"]} - {""})
    return []


def _run_time(out: Path) -> str:
    """The reduction's run time from ``OUT/specred.log``: its final 'wall time N s' line,
    else the span of its time stamps (the report may be written before that line); '' when
    there is no log."""
    path = out / "specred.log"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    stamps = [m.group(1) for line in text.splitlines() if (m := _LOG_TS.match(line))]
    span = f" ({stamps[0]} – {stamps[-1][11:]})" if stamps else ""
    wall = re.findall(r"wall time ([\d.]+) s", text)
    if wall:
        return f"{float(wall[-1]):.1f} s{span}"
    if stamps:
        t0, t1 = (_dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1]))
        return f"{(t1 - t0).total_seconds():.0f} s so far{span}"
    return ""


def _summary(inp: _Inputs, tags: list[str], cards: dict[int, str]) -> str:
    parts = []
    nights = _nights(inp, tags)
    t = inp.night
    facts = [("output folder", _esc(inp.out.resolve())),
             ("night(s)", _esc(", ".join(nights)) or "–")]
    if t is not None:
        insts = sorted({_str(v) for v in t["instrument"]} - {""}) if "instrument" in t.colnames else []
        facts.append(("instruments", _esc(", ".join(insts)) or "–"))
        for key, label in (("specred_version", "specred version"), ("target_list", "target list")):
            if t.meta.get(key):
                facts.append((label, _esc(t.meta[key])))
    run = _run_time(inp.out)
    if run:
        facts.append(("reduction run time", _esc(run)))
    parts.append('<table class="facts">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
                 + "</table>")
    if t is None:
        parts.append(_na(inp.night_why))
        return "".join(parts)
    flags = [_str(v) for v in t["flags"]] if "flags" in t.colnames else [""] * len(t)
    status = np.array([_status(f) for f in flags], dtype=object)
    inst = np.array([_str(v) for v in t["instrument"]], dtype=object) if "instrument" in t.colnames \
        else np.full(len(t), "", dtype=object)
    kind = np.array([_str(v) for v in t["kind"]], dtype=object) if "kind" in t.colnames \
        else np.full(len(t), "", dtype=object)
    head = "<tr><th>instrument</th><th>science</th><th>flux std</th><th>telluric std</th>" \
           "<th>OK</th><th>flagged</th><th>failed</th></tr>"
    body = []
    for name in sorted(set(inst)) + ["all"]:
        sel = np.ones(len(t), bool) if name == "all" else inst == name
        good = sel & (status != "failed")
        cells = [int((good & (kind == k)).sum()) for k in ("science", "flux_standard", "telluric_standard")]
        cells += [int((sel & (status == s)).sum()) for s in ("ok", "flagged", "failed")]
        cls = ' class="total"' if name == "all" else ""
        body.append(f"<tr{cls}><td>{_esc(name or '?')}</td>"
                    + "".join(f'<td class="n">{c}</td>' for c in cells) + "</tr>")
    parts.append('<table class="counts">' + head + "".join(body) + "</table>")
    n = {s: int((status == s).sum()) for s in ("ok", "flagged", "failed")}
    parts.append(f'<p class="counts-line" data-ok="{n["ok"]}" data-flagged="{n["flagged"]}" '
                 f'data-failed="{n["failed"]}">{n["ok"]} OK, {n["flagged"]} flagged, {n["failed"]} failed</p>')
    parts.append(_night_table(t, status, cards))
    return "".join(parts)


def _night_table(t: Table, status, cards: dict[int, str]) -> str:
    cols = [("target", "target", None), ("instrument", "inst.", None), ("kind", "kind", None),
            ("exptime", "exp. [s]", "{:.0f}"), ("airmass", "airmass", "{:.3f}"), ("snr", "S/N", "{:.1f}"),
            ("snr_window", "S/N window [Å]", None), ("wave_rms_aa", "arc RMS [Å]", "{:.3f}"),
            ("sky_shift_px", "sky shift [px]", "{:.2f}"), ("n_cosmics", "cosmics", "{:.0f}"),
            ("standard", "standard", None), ("match_id", "catalogue id", None), ("z_cat", "z_cat", "{:.4f}"),
            ("flags", "flags", None)]
    cols = [c for c in cols if c[0] in t.colnames]
    head = "".join(f"<th>{_esc(lab)}</th>" for _, lab, _ in cols)
    rows = []
    for i in range(len(t)):
        cells = []
        for key, _, fmt in cols:
            v = t[key][i]
            text = _esc(_num(v, fmt)) if fmt else _esc(_str(v))
            if key == "target" and i in cards:
                text = f'<a href="#{cards[i]}">{text}</a>'
            cells.append(f'<td class="n">{text}</td>' if fmt else f"<td>{text}</td>")
        rows.append(f'<tr class="{status[i]}">' + "".join(cells) + "</tr>")
    return ('<h3>Night table <span class="src">night.ecsv</span></h3><div class="scroll">'
            f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _frames(inp: _Inputs) -> str:
    t = inp.frames
    if t is None:
        return _na(inp.frames_why + " (written by newer specred versions)")
    cols = [c for c in ("file", "instrument", "night", "setup", "type", "object", "exptime", "airmass",
                        "date_obs", "used", "problem") if c in t.colnames]
    fmts = {"exptime": "{:.1f}", "airmass": "{:.3f}"}
    problem = np.array([_str(v) for v in t["problem"]], dtype=object) if "problem" in t.colnames \
        else np.full(len(t), "", dtype=object)
    used = np.array([bool(v) if v is not np.ma.masked else False for v in t["used"]]) if "used" in t.colnames \
        else np.ones(len(t), bool)
    types = [_str(v) for v in t["type"]] if "type" in t.colnames else []
    by_type = {k: types.count(k) for k in sorted(set(types))}
    line = (f"{len(t)} files: " + ", ".join(f"{n} {_esc(k or '?')}" for k, n in by_type.items())
            + f"; {int(used.sum())} used, {int((problem != '').sum())} with a problem")
    rows = []
    for i in range(len(t)):
        cls = "bad" if problem[i] else ("unused" if not used[i] else "")
        cells = []
        for c in cols:
            v = t[c][i]
            if c in fmts:
                cells.append(f'<td class="n">{_esc(_num(v, fmts[c]))}</td>')
            elif c == "used":
                cells.append(f"<td>{'yes' if used[i] else 'no'}</td>")
            else:
                cells.append(f"<td>{_esc(_str(v))}</td>")
        rows.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    return (f'<p>{line}. Rows with a problem are <span class="bad-key">highlighted</span>, '
            f'unused files are grey.</p><div class="scroll tall"><table class="grid">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _problems(inp: _Inputs) -> tuple[str, int]:
    items: list[tuple[str, str, str]] = []          # (category, file/target, reason)
    seen: set[str] = set()
    t = inp.night
    if t is not None:
        for i in range(len(t)):
            flags = _str(t["flags"][i]) if "flags" in t.colnames else ""
            name = _str(t["target"][i]) if "target" in t.colnames else "?"
            raw = _str(t["raw_files"][i]) if "raw_files" in t.colnames else ""
            if _status(flags) == "failed":
                reason = re.sub(r"^FAILED:\s*", "", flags, flags=re.I)
                items.append(("failed", f"{raw or name} ({name})", reason))
                seen |= set(raw.split(","))
            f = _str(t["file"][i]) if "file" in t.colnames else ""
            if f and not (inp.out / f).exists():
                items.append(("missing", name, f"product {f} listed in night.ecsv but not on disk"))
    if inp.frames is not None and "problem" in inp.frames.colnames:
        for row in inp.frames:
            why = _str(row["problem"])
            if why:
                items.append(("frame", _str(row["file"]), why))
                seen.add(Path(_str(row["file"])).name)
    if t is not None:
        for p in t.meta.get("problems", []) or []:      # 'file: reason' lines of the pipeline
            what, sep, why = str(p).partition(":")
            if not sep:
                items.append(("skipped", "", str(p)))
            elif what.strip() not in seen:               # not already listed from frames.ecsv
                items.append(("skipped", what.strip(), why.strip()))
    if not items:
        note = "" if (t is not None or inp.frames is not None) else \
            _na(f"{inp.night_why}; {inp.frames_why}")
        return note + '<p class="okline">No problems: every file was usable and every target reduced.</p>', 0
    lis = "".join(f'<li class="{_esc(cat)}"><span class="tag">{_esc(cat)}</span> <code>{_esc(what)}</code>'
                  f"{': ' if what else ''}{_esc(reason)}</li>" for cat, what, reason in items)
    return f'<ul class="problems">{lis}</ul>', len(items)


def _calibrations(out: Path, plots: _Plots) -> tuple[str, list[str]]:
    caldir = out / "calibrations"
    if not caldir.is_dir():
        return _na("no calibrations/ folder"), []
    tags = sorted({m.group("tag") for p in caldir.iterdir() if (m := _CAL_RE.match(p.name))})
    if not tags:
        return _na("no calibration products in calibrations/"), []
    plot = {"bias": _plot_bias, "flat": _plot_flat, "arc": _plot_arc, "sensitivity": _plot_sensitivity,
            "telluric": _plot_telluric}
    blocks = []
    for tag in tags:
        inst = tag.split("_", 1)[0].upper()
        panels = []
        for kind, (suffix, what) in _CAL_PANELS.items():
            path = caldir / f"{tag}_{suffix}"
            if kind == "bias" and inst == "SOFI" and not path.exists():
                panels.append(f'<div class="panel"><h4>{what}</h4><p class="na">not applicable: SofI frames '
                              "are pair-subtracted (no bias frames)</p></div>")
                continue
            if kind == "telluric" and not path.exists():
                stars = sorted(caldir.glob(f"{tag}_telluric_*.ecsv"))    # SofI: one per A0V star
                if stars:
                    panels.append(plots.safely(lambda stars=stars: _plot_telluric_stars(stars), f"{tag}_{kind}",
                                               f"{tag} {what}", what))
                    continue
                if inst == "SOFI":
                    panels.append(f'<div class="panel"><h4>{what}</h4><p class="na">not available: no telluric '
                                  "star of this set-up was reduced</p></div>")
                    continue
            panels.append(plots.safely(lambda make=plot[kind], path=path: make(path), f"{tag}_{kind}",
                                       f"{tag} {what}", what))
        blocks.append(f'<div class="caltag" id="cal-{_esc(_safe(tag))}"><h3>{_esc(tag)}</h3>'
                      f'<div class="panels">{"".join(panels)}</div></div>')
    return "".join(blocks), tags


def _target_cards(inp: _Inputs, plots: _Plots) -> tuple[str, dict[int, str]]:
    t = inp.night
    if t is None:
        return _na(inp.night_why), {}
    if len(t) == 0:
        return _na("night.ecsv has no rows"), {}
    cards, ids = [], {}
    for i in range(len(t)):
        r = _row(t, i)
        name, inst = _str(r.get("target", "")) or "?", _str(r.get("instrument", ""))
        flags, kind = _str(r.get("flags", "")), _str(r.get("kind", ""))
        file = _str(r.get("file", ""))
        stem = Path(file).stem if file else f"{_safe(name)}_{inst or 'UNKNOWN'}"
        cid = f"t-{_safe(stem)}"
        if cid in ids.values():
            cid += f"-{i}"
        ids[i] = cid
        status = _status(flags)
        z = _float(r.get("z_cat"))
        if not np.isfinite(z) and file and (inp.out / file).exists():
            try:
                z = _float(fits.getheader(inp.out / file).get("SPECRED ZCAT"))
            except Exception:
                z = np.nan
        facts = [("instrument", inst), ("kind", kind or "–"),
                 ("S/N", f"{_num(r.get('snr'), '{:.1f}')} per px"
                  + (f" at {_str(r.get('snr_window'))} Å" if _str(r.get("snr_window")) else "")
                  if np.isfinite(_float(r.get("snr"))) else "–"),
                 ("exposure", f"{_num(r.get('exptime'), '{:.0f}')} s"), ("airmass", _num(r.get("airmass"), "{:.3f}")),
                 ("date", _str(r.get("date_obs")) or "–"),
                 ("arc RMS", f"{_num(r.get('wave_rms_aa'), '{:.3f}')} Å"),
                 ("standard", _str(r.get("standard")) or "–")]
        if "match_id" in r:
            mid = _str(r.get("match_id"))
            sep = _num(r.get("match_sep_arcsec"), "{:.1f}")
            facts.append(("catalogue", f"{mid} ({sep}″)" if mid else "unmatched"))
        facts.append(("z_cat", _num(z, "{:.4f}")))
        facts.append(("raw files", ", ".join(_str(r.get("raw_files")).split(",")) or "–"))
        dl = "".join(f'<div{" class=wide" if k == "raw files" else ""}><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>'
                     for k, v in facts)
        badge = f'<span class="badge {status}">{_esc(flags or "OK")}</span>'
        kind_badge = f'<span class="kind">{_esc(kind)}</span>' if kind else ""
        link = f' <a class="file" href="{_esc(file)}">{_esc(file)}</a>' if file else ""
        if status == "failed":
            body = '<p class="na">no product: the reduction failed (see Problems)</p>'
        else:
            qc2d = inp.out / "qc" / f"{stem}_2d.fits"
            body = plots.safely(lambda p=qc2d, n=name: _plot_2d(p, n), f"{stem}_2d", f"{name} {inst} 2D cut-out",
                                "2D sky-subtracted")
            spec = inp.out / file if file else inp.out / "spectra" / f"{stem}.fits"
            window = _str(r.get("snr_window"))
            body += plots.safely(lambda p=spec, n=name, z=z, w=window: _plot_spectrum(p, n, inst, z, w),
                                 f"{stem}_1d", f"{name} {inst} 1D spectrum", "1D spectrum")
        cards.append(f'<article class="card {status}" id="{_esc(cid)}"><header><h3>{_esc(name)} '
                     f'<span class="inst">{_esc(inst)}</span> {kind_badge}</h3>{badge}{link}</header>'
                     f'<dl class="facts">{dl}</dl>{body}</article>')
    return "".join(cards), ids


# ============================================================================ page
_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d9dde5;--bg:#f6f7f9;--card:#fff;--ok:#1a7f37;--warn:#b35900;
--bad:#c62828;--accent:#2457a6}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
background:var(--bg)}
body>header{position:sticky;top:0;z-index:5;background:#1f2a3d;color:#fff;padding:.6rem 1.2rem;
display:flex;flex-wrap:wrap;align-items:baseline;gap:.4rem 1.5rem}
body>header h1{font-size:1.15rem;margin:0;font-weight:600}
nav a{color:#cfe0ff;margin-right:1rem;text-decoration:none}nav a:hover{text-decoration:underline}
main{max-width:1240px;margin:0 auto;padding:1rem 1.2rem 3rem}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.4rem 1.2rem 1rem;
margin:1rem 0}
h2{font-size:1.2rem;border-bottom:1px solid var(--line);padding-bottom:.3rem}
h3{font-size:1.02rem;margin:1rem 0 .4rem}h4{font-size:.9rem;margin:.2rem 0 .3rem;color:var(--muted)}
.src{font-weight:400;color:var(--muted);font-size:.85rem}
table{border-collapse:collapse}
table.grid{font-size:12.5px;width:100%}table.counts{font-size:12.5px;margin:.6rem 0}
.counts th:not(:first-child){text-align:right}
.grid th,.grid td,.counts th,.counts td{border-bottom:1px solid var(--line);padding:.2rem .45rem;text-align:left;
white-space:nowrap}
.grid thead th{position:sticky;top:0;background:#eef1f6}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600}
table.facts th{text-align:left;color:var(--muted);font-weight:500;padding:.1rem 1rem .1rem 0}
.scroll{overflow:auto;max-height:420px;border:1px solid var(--line);border-radius:6px}
.scroll.tall{max-height:560px}
tr.bad td{background:#fde8e8}tr.unused td{color:#8a909c}tr.failed td{background:#fde8e8}
tr.flagged td{background:#fff4e0}
.bad-key{background:#fde8e8;padding:0 .3rem}
ul.problems{padding-left:1.1rem}ul.problems li{margin:.2rem 0}
.tag{display:inline-block;font-size:11px;text-transform:uppercase;letter-spacing:.03em;padding:0 .35rem;
border-radius:3px;background:#eee;color:var(--muted)}
li.failed .tag,li.missing .tag{background:#fde8e8;color:var(--bad)}li.frame .tag,li.skipped .tag{background:#fff4e0;
color:var(--warn)}
.na{color:var(--muted);font-style:italic;margin:.3rem 0}
.okline{color:var(--ok)}.note{margin:.3rem 0}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:.8rem}
.panel{border:1px solid var(--line);border-radius:6px;padding:.4rem .6rem;background:#fff}
figure{margin:0}figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:var(--muted);margin-top:.2rem}
.card{border:1px solid var(--line);border-left:5px solid var(--ok);border-radius:8px;padding:.5rem 1rem;
margin:1rem 0;background:#fff}
.card.flagged{border-left-color:var(--warn)}.card.failed{border-left-color:var(--bad)}
.card>header{display:flex;flex-wrap:wrap;align-items:center;gap:.3rem 1rem}
.card>header h3{margin:.2rem 0}
.inst{color:var(--muted);font-weight:500}
.kind{font-size:11px;background:#e8eefb;color:var(--accent);border-radius:3px;padding:.05rem .4rem;
font-weight:500;vertical-align:middle}
.badge{font-size:12px;border-radius:10px;padding:.05rem .6rem;font-weight:600;color:#fff;background:var(--ok)}
.badge.flagged{background:var(--warn)}.badge.failed{background:var(--bad)}
a.file{font-size:12px;color:var(--accent)}
dl.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:.1rem 1rem;margin:.4rem 0;
font-size:12.5px}
dl.facts div{display:flex;gap:.4rem;min-width:0}dl.facts div.wide{grid-column:1/-1}dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;overflow-wrap:anywhere}
dl.facts dt::after{content:":"}
.card .panel{border:0;padding:.2rem 0}
footer{color:var(--muted);font-size:12px;text-align:center;padding:1rem}
"""

# Counts the images that decoded and marks the page as rendered (see module docstring).
_SCRIPT = """
(function () {
  function done() {
    var ok = 0, broken = 0;
    Array.prototype.forEach.call(document.images, function (img) {
      if (img.complete && img.naturalWidth > 0) { ok += 1; } else { broken += 1; }
    });
    document.body.dataset.imagesOk = String(ok);
    document.body.dataset.imagesBroken = String(broken);
    document.body.dataset.rendered = "yes";
  }
  if (document.readyState === "complete") { done(); } else { window.addEventListener("load", done); }
})();
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'")


def write_report(out: Path | str, *, title: str | None = None) -> Path:
    """Write ``OUT/qc/*.png`` and ``OUT/report.html`` for a reduced night.

    Parameters
    ----------
    out : path
        Output folder of ``specred reduce`` (``night.ecsv``, ``frames.ecsv``,
        ``calibrations/``, ``spectra/``, ``qc/``).  Only files on disk are read; any of them
        may be missing, the corresponding part of the page then says why.
    title : str, optional
        Page title (default: "specred night report — <night(s)>").

    Returns
    -------
    Path
        ``OUT/report.html`` — one self-contained page (PNGs embedded as base64 data URIs,
        inline CSS and script, no external resources).

    Raises
    ------
    SpecredError
        If ``out`` is not an existing folder or the page cannot be written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if not out.is_dir():
        raise SpecredError(f"{out}: no such output folder (run `specred reduce RAW/ --out {out}` first)")
    night, night_why = _read_table(out / "night.ecsv")
    frames, frames_why = _read_table(out / "frames.ecsv")
    inp = _Inputs(out, night, night_why, frames, frames_why)
    plots = _Plots(out)

    cal_html, tags = _calibrations(out, plots)
    cards_html, card_ids = _target_cards(inp, plots)
    problems_html, n_problems = _problems(inp)
    body = {
        "summary": _summary(inp, tags, card_ids),
        "frames": _frames(inp),
        "problems": problems_html,
        "calibrations": cal_html,
        "targets": cards_html,
    }
    nights = _nights(inp, tags)
    page_title = title or ("specred night report — " + (", ".join(nights) if nights else out.resolve().name))
    nav = "".join(f'<a href="#{s}">{_SECTION_TITLES[s]}'
                  + (f" ({n_problems})" if s == "problems" and n_problems else "") + "</a>" for s in SECTIONS)
    sections = "\n".join(f'<section id="{s}"><h2>{_SECTION_TITLES[s]}</h2>\n{body[s]}\n</section>' for s in SECTIONS)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    elapsed = time.perf_counter() - t0
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(page_title)}</title><style>{_CSS}</style></head>\n"
        f'<body data-rendered="no"><header><h1>{_esc(page_title)}</h1><nav>{nav}</nav></header>\n<main>\n'
        f"{sections}\n</main>\n<footer>specred {_esc(__version__)} — report written {stamp} in "
        f"{elapsed:.1f} s ({plots.count} plots, also in qc/)</footer>\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )
    path = _write_text(page, out / "report.html")
    log.info("report: %s (%d plots, %.1f s)", path, plots.count, time.perf_counter() - t0)
    return path
