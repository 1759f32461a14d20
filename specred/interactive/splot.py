"""``specred fit SPECTRUM``: line fitting in a matplotlib window with IRAF ``splot`` habits.

The window only drives :mod:`specred.analysis.window` (``k``, ``d``) and its direct
integration (``e``); every number it prints is what a script gets from the same call on the
same window.  It works on any matplotlib canvas: desktop backends (TkAgg, QtAgg, ...),
Jupyter with ``%matplotlib widget`` (ipympl, ``pip install specred[jupyter]``), and Agg,
where the tests post synthetic key and mouse events to the canvas.

Keys (also listed by ``?``)::

    k k   fit one Gaussian + linear continuum between the two marks
    d d   deblend: several Gaussians between the two marks, started at the positions
          clicked (mouse button 1) before the second d, or else at the catalogue lines
          of the current set and redshift inside the window
    e e   equivalent width, flux and centroid by direct integration; the continuum is the
          straight line through the two cursor positions
    z     identify the fitted line nearest the cursor with the nearest catalogue line of
          the current set and set the redshift from it (the markers move)
    c     cycle the catalogue sets (galaxy / QSO / NIR)
    u     undo the last fit, redshift or catalogue change (or a pending mark)
    r     redraw
    w     append the fits not yet written to the log (ECSV)
    q     quit
    ?     this help

Zoom and pan with the toolbar keep working; matplotlib's own key shortcuts that do not
clash with these (``o`` zoom, ``p`` pan, ``s`` save, ``g`` grid, ``f`` full screen, arrows)
are passed on.  Any other key shows the help line, never an error.

Several spectra of one target (EFOSC2 + SofI) open together on one wavelength axis: the
axis is in the spectra's medium when they share it, in vacuum otherwise; the fits use the
spectrum that covers the marked window (the first one listed when several do).  Fitted
centres are reported on that axis; redshifts always from vacuum wavelengths.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import calib
from ..analysis import lines as L
from ..analysis.spectrum import AnalysisSpectrum, load_spectrum
from ..analysis.window import WindowFit, fit_window, integrate_window
from ..errors import SpecredError

log = logging.getLogger("specred")

#: catalogue sets cycled by ``c``: (name, line names)
CATALOGUE_SETS = (
    ("galaxy", ("OII_3726", "OII_3729", "NeIII_3869", "CaII_K", "CaII_H", "Hdelta", "Gband_4305", "Hgamma",
                "Hbeta", "OIII_4959", "OIII_5007", "Mgb_5175", "HeI_5876", "NaD_5890", "OI_6300", "NII_6548",
                "Halpha", "NII_6584", "SII_6717", "SII_6731", "ArIII_7136", "CaII_8542", "SIII_9069",
                "SIII_9531")),
    ("QSO", ("Lyb", "Lya", "NV_1240", "SiIV_1400", "CIV_1549", "HeII_1640", "AlIII_1857", "CIII_1909",
             "MgII_2800", "NeV_3426", "OII_3729", "Hdelta", "Hgamma", "Hbeta", "OIII_4959", "OIII_5007",
             "Halpha")),
    ("NIR", ("SIII_9069", "SIII_9531", "Paepsilon", "Padelta", "HeI_10830", "Pagamma", "FeII_12570", "Pabeta",
             "FeII_16440", "Paalpha", "Brgamma")),
)

HELP = {
    "k": "k k: Gaussian + linear continuum between two marks",
    "d": "d d: deblend several Gaussians (click the starting positions before the second d)",
    "e": "e e: equivalent width by direct integration (continuum through the two cursor points)",
    "z": "z: identify the nearest fitted line with a catalogue line and set the redshift",
    "c": "c: cycle catalogue sets (galaxy / QSO / NIR)",
    "u": "u: undo",
    "r": "r: redraw",
    "w": "w: append the fits to the log",
    "q": "q: quit",
    "?": "?: help",
}
HELP_LINE = "keys: k d e z c u r w q ?  (toolbar zoom/pan as usual)"
#: matplotlib shortcuts that are passed on (the others clash with splot's keys)
PASSED_ON = ("o", "p", "s", "g", "G", "f", "left", "right", "backspace", "ctrl+s", "ctrl+f", "ctrl+w", "cmd+w")


@dataclass
class _Fit:
    spec: int                  # index of the spectrum fitted
    fit: WindowFit
    key: str
    artists: list


class Splot:
    """One interactive session on ``spectra`` (paths or :class:`AnalysisSpectrum`).

    ``z``: redshift of the catalogue markers (and of rest-frame EWs); ``log``: the ECSV file
    ``w`` appends to; ``fig``: a matplotlib figure to draw in (default: a new one);
    ``echo``: where results and help go (default ``print``).
    """

    def __init__(self, spectra, *, z: float | None = None, log_path=None, fig=None, catalogue: str = "galaxy",
                 echo=print):
        import matplotlib.pyplot as plt

        if isinstance(spectra, (str, Path, AnalysisSpectrum)):
            spectra = [spectra]
        self.spectra = [s if isinstance(s, AnalysisSpectrum) else load_spectrum(s) for s in spectra]
        if not self.spectra:
            raise SpecredError("splot: no spectrum given")
        media = {s.medium_in for s in self.spectra}
        self.medium = media.pop() if len(media) == 1 else "vacuum"
        self.z = float(z) if z is not None and np.isfinite(z) else 0.0
        self.z_err = float("nan")
        names = [n for n, _ in CATALOGUE_SETS]
        if catalogue not in names:
            raise SpecredError(f"splot: catalogue set must be one of {names}, not {catalogue!r}")
        self.cat = names.index(catalogue)
        stem = Path(self.spectra[0].name or "spectrum").stem
        self.log_path = Path(log_path) if log_path else Path(f"{stem}_splot.ecsv")
        self.echo = echo
        self.marks: list[tuple[str, float, float]] = []      # pending (key, λ vacuum, y)
        self.clicks: list[float] = []                         # λ vacuum of clicked positions
        self.fits: list[_Fit] = []
        self.history: list[tuple] = []
        self.n_written = 0
        self.closed = False
        self.fig = fig if fig is not None else plt.figure(figsize=(11, 5.5))
        self.ax = self.fig.add_subplot(111) if not self.fig.axes else self.fig.axes[0]
        canvas = self.fig.canvas
        mgr = getattr(canvas, "manager", None)
        hid = getattr(mgr, "key_press_handler_id", None)
        if hid is not None:                  # matplotlib's own handler would eat k, r, c, q
            canvas.mpl_disconnect(hid)
        self._cids = [canvas.mpl_connect("key_press_event", self.on_key),
                      canvas.mpl_connect("button_press_event", self.on_click)]
        self._status = self.fig.text(0.01, 0.01, HELP_LINE, fontsize=9, family="monospace")
        self._head = self.fig.text(0.01, 0.975, "", fontsize=9, va="top")
        self.fig.subplots_adjust(top=0.83, bottom=0.14)
        self._mark_artists: list = []
        self._cat_artists: list = []
        self.draw()

    # ------------------------------------------------------------------ wavelengths
    def to_display(self, wave_vac):
        return calib.vacuum_to_air(wave_vac) if self.medium == "air" else np.asarray(wave_vac, float)

    def to_vacuum(self, wave_disp):
        return calib.air_to_vacuum(wave_disp) if self.medium == "air" else np.asarray(wave_disp, float)

    @property
    def catalogue(self) -> tuple[str, tuple]:
        return CATALOGUE_SETS[self.cat]

    # ------------------------------------------------------------------ drawing
    def draw(self):
        """Draw everything again (key ``r``): spectra with error bands and masks, markers, fits."""
        ax = self.ax
        xl = ax.get_xlim() if ax.lines else None
        yl = ax.get_ylim() if ax.lines else None
        ax.clear()
        for i, s in enumerate(self.spectra):
            w = self.to_display(s.wave)
            f = np.where(s.good, s.flux, np.nan)
            label = f"{s.name or 'spectrum'} ({s.meta.get('INSTRUME', '') if isinstance(s.meta, dict) else ''})"
            ln, = ax.plot(w, f, drawstyle="steps-mid", lw=0.8, label=label.replace(" ()", ""))
            ax.fill_between(w, f - s.sigma, f + s.sigma, step="mid", color=ln.get_color(), alpha=0.25, lw=0)
            if np.any(~s.good):
                ax.fill_between(w, 0, 1, where=~s.good, transform=ax.get_xaxis_transform(), color="red",
                                alpha=0.12, lw=0, step="mid")
        ax.set_xlabel(f"observed wavelength ({self.medium}) [Å]")
        ax.set_ylabel("flux [erg s$^{-1}$ cm$^{-2}$ Å$^{-1}$]")
        if len(self.spectra) > 1:
            ax.legend(loc="upper right", fontsize=8)
        for sec in list(getattr(self, "_secondary", []) or []):
            sec.remove()
        self._secondary = [ax.secondary_xaxis("top", functions=(lambda w: w / (1 + self.z),
                                                                 lambda w: w * (1 + self.z)))]
        self._secondary[0].set_xlabel("rest wavelength [Å]")
        self._cat_artists = []
        self._draw_catalogue()
        for ft in self.fits:
            ft.artists = self._draw_fit(ft)
        if xl is not None:
            ax.set_xlim(xl)
            ax.set_ylim(yl)
        self._title()
        self.fig.canvas.draw_idle()

    def _title(self):
        name, _ = self.catalogue
        zt = f"z = {self.z:.5f}" + (f" ± {self.z_err:.5f}" if np.isfinite(self.z_err) else "")
        self._head.set_text(f"{', '.join(Path(s.name).name or 'spectrum' for s in self.spectra)}   {zt}   "
                            f"lines: {name}")

    def _draw_catalogue(self):
        for a in self._cat_artists:
            a.remove()
        self._cat_artists = []
        lo = min(float(s.wave[s.good][0]) for s in self.spectra)
        hi = max(float(s.wave[s.good][-1]) for s in self.spectra)
        trans = self.ax.get_xaxis_transform()
        for n in self.catalogue[1]:
            obs = L.rest_wavelength(n) * (1 + self.z)
            if lo <= obs <= hi:
                x = float(self.to_display(obs))
                self._cat_artists.append(self.ax.axvline(x, ls=":", lw=0.8, color="0.45"))
                self._cat_artists.append(self.ax.text(x, 0.98, L.label(n), transform=trans, rotation=90,
                                                      va="top", ha="right", fontsize=7, color="0.35"))

    def _draw_fit(self, ft: _Fit):
        f = ft.fit
        arts = []
        if f.kind == "integral":
            x = self.to_display(f.model_wave)
            arts += self.ax.plot(x, f.model_flux, color="tab:green", lw=1.2)
        else:
            arts += self.ax.plot(self.to_display(f.model_wave), f.model_flux, color="tab:red", lw=1.2)
            arts += self.ax.plot(self.to_display(f.model_wave), f.continuum_at(f.model_wave), color="tab:red",
                                 lw=0.8, ls="--")
        for ln in f.lines:
            if np.isfinite(ln.centre):
                x = float(self.to_display(ln.centre))
                peak = ln.continuum
                if np.isfinite(ln.fwhm_aa) and ln.fwhm_aa > 0:        # on top of the Gaussian
                    peak += ln.flux / (np.sqrt(2 * np.pi) * ln.fwhm_aa / 2.3548)
                arts.append(self.ax.annotate(f"{ln.flux:.3g}", (x, max(peak, ln.continuum)), xytext=(0, 4),
                                             textcoords="offset points", fontsize=7, color="tab:red", ha="center"))
        return arts

    def status(self, text: str):
        self._status.set_text(text)
        self.fig.canvas.draw_idle()

    # ------------------------------------------------------------------ events
    def on_click(self, ev):
        """Mouse button 1 inside the axes (toolbar idle) records a deblend starting position."""
        tb = getattr(self.fig.canvas, "toolbar", None)
        if ev.inaxes is not self.ax or ev.button != 1 or (tb is not None and getattr(tb, "mode", "")):
            return
        self.clicks.append(float(self.to_vacuum(ev.xdata)))
        self._mark_artists.append(self.ax.axvline(ev.xdata, color="tab:orange", lw=0.8, ls="--"))
        self.status(f"deblend position {len(self.clicks)} at {ev.xdata:.2f} Å; d at both window ends to fit")

    def on_key(self, ev):
        key = ev.key
        handler = {"k": self._k, "d": self._d, "e": self._e, "z": self._z, "c": self._c, "u": self._u,
                   "r": self._r, "w": self._w, "q": self._q, "?": self._help}.get(key)
        if handler is None:
            if key in PASSED_ON:
                from matplotlib.backend_bases import key_press_handler
                key_press_handler(ev, self.fig.canvas, getattr(self.fig.canvas, "toolbar", None))
            elif key not in (None, "shift", "control", "alt", "ctrl", "super", "cmd"):
                self.status(f"'{key}' is not a splot key.  {HELP_LINE}")
            return
        try:
            handler(ev)
        except SpecredError as exc:           # a bad window etc.: said in the window, never raised
            self.marks.clear()
            self._clear_marks()
            self.status(f"{key}: {exc}")
            self.echo(f"{key}: {exc}")

    def _x(self, ev, key):
        if ev.inaxes is not self.ax or ev.xdata is None:
            raise SpecredError("put the cursor inside the plot")
        return float(self.to_vacuum(ev.xdata)), (float(ev.ydata) if ev.ydata is not None else float("nan"))

    def _second_mark(self, ev, key):
        """None after the first press of a two-press key; (x1, y1, x2, y2) (vacuum Å) after the second."""
        x, y = self._x(ev, key)
        if self.marks and self.marks[-1][0] == key:
            _, x1, y1 = self.marks.pop()
            self._clear_marks(keep_clicks=True)
            return x1, y1, x, y
        self.marks = [(key, x, y)]
        self._clear_marks(keep_clicks=key == "d")
        self._mark_artists.append(self.ax.axvline(ev.xdata, color="tab:blue", lw=0.8))
        self.status(f"{key}: now {key} again at the other side of the line(s)")
        return None

    def _clear_marks(self, keep_clicks=False):
        for a in self._mark_artists:
            a.remove()
        self._mark_artists = []
        if not keep_clicks:
            self.clicks = []
        self.fig.canvas.draw_idle()

    def _spectrum_for(self, x1, x2) -> int:
        lo, hi = sorted((x1, x2))
        for i, s in enumerate(self.spectra):
            w = s.wave[s.good]
            if w[0] <= lo and hi <= w[-1]:
                return i
        raise SpecredError(f"no spectrum covers {float(self.to_display(lo)):.1f}-{float(self.to_display(hi)):.1f} Å")

    def _add(self, i, fit: WindowFit, key):
        ft = _Fit(i, fit, key, [])
        ft.artists = self._draw_fit(ft)
        self.fits.append(ft)
        self.history.append(("fit", ft))
        for line in self.format_fit(ft):
            self.echo(line)
        self.status(self.format_fit(ft)[-1])

    def format_fit(self, ft: _Fit) -> list[str]:
        f = ft.fit
        frame = "rest" if np.isfinite(f.z) and f.z != 0 else "obs"
        out = [f"{ft.key}: {self.spectra[ft.spec].name}  {float(self.to_display(f.w1)):.2f}-"
               f"{float(self.to_display(f.w2)):.2f} Å  ({f.kind}, {f.n_pix} px"
               + (f", chi2/dof {f.redchi:.2f})" if f.dof > 0 else ")")]
        for ln in f.lines:
            s = (f"  centre {float(self.to_display(ln.centre)):.2f} ± {ln.centre_err:.2f} Å  flux {ln.flux:.4g} ± "
                 f"{ln.flux_err:.2g} (S/N {ln.snr:.1f})  EW({frame}) {ln.ew:.2f} ± {ln.ew_err:.2f} Å")
            if np.isfinite(ln.fwhm_kms) and ln.fwhm_kms > 0:
                s += f"  FWHM {ln.fwhm_kms:.0f} ± {ln.fwhm_kms_err:.0f} km/s"
            elif np.isfinite(ln.fwhm_aa):
                s += f"  FWHM {ln.fwhm_aa:.1f} Å: unresolved (not wider than the instrument)"
            out.append(s)
        return out

    # ------------------------------------------------------------------ keys
    def _k(self, ev):
        m = self._second_mark(ev, "k")
        if m is None:
            return
        x1, _, x2, _ = m
        i = self._spectrum_for(x1, x2)
        self._add(i, fit_window(self.spectra[i], x1, x2, z=self.z), "k")

    def _d(self, ev):
        m = self._second_mark(ev, "d")
        if m is None:
            return
        x1, _, x2, _ = m
        lo, hi = sorted((x1, x2))
        i = self._spectrum_for(lo, hi)
        starts = [c for c in self.clicks if lo < c < hi]
        how = "clicked positions"
        if not starts:
            starts = [L.rest_wavelength(n) * (1 + self.z) for n in self.catalogue[1]
                      if lo < L.rest_wavelength(n) * (1 + self.z) < hi]
            how = f"{self.catalogue[0]} catalogue lines at z = {self.z:.5f}"
        if not starts:
            how = "one Gaussian (no clicked position, no catalogue line inside)"
        self._clear_marks()
        self.echo(f"d: starting from {len(starts) or 1} position(s): {how}")
        self._add(i, fit_window(self.spectra[i], lo, hi, centres=starts or None, z=self.z), "d")

    def _e(self, ev):
        m = self._second_mark(ev, "e")
        if m is None:
            return
        x1, y1, x2, y2 = m
        if x1 > x2:
            x1, y1, x2, y2 = x2, y2, x1, y1
        i = self._spectrum_for(x1, x2)
        self._add(i, integrate_window(self.spectra[i], x1, x2, y1, y2, z=self.z), "e")

    def _z(self, ev):
        x, _ = self._x(ev, "z")
        cands = [(abs(ln.centre - x), ft, ln) for ft in self.fits for ln in ft.fit.lines if np.isfinite(ln.centre)]
        if not cands:
            raise SpecredError("no fitted line to identify: fit one with k, d or e first")
        _, ft, ln = min(cands, key=lambda c: c[0])
        # an emission line is identified with emission lines, an absorption with absorption
        want = ("emission", "both") if ln.flux > 0 else ("absorption", "both")
        names = [n for n in self.catalogue[1] if L.kind(n) in want] or list(self.catalogue[1])
        rest = L.rest_vac(names)
        j = int(np.argmin(np.abs(rest * (1 + self.z) - ln.centre)))
        old = (self.z, self.z_err)
        self.z = float(ln.centre / rest[j] - 1.0)
        self.z_err = float(ln.centre_err / rest[j]) if np.isfinite(ln.centre_err) else float("nan")
        self.history.append(("z", old))
        msg = (f"z: line at {float(self.to_display(ln.centre)):.2f} Å is {names[j]} "
               f"({rest[j]:.2f} Å vacuum): z = {self.z:.5f} ± {self.z_err:.5f}")
        self.echo(msg)
        self._draw_catalogue()
        self._title()
        self.status(msg)

    def _c(self, ev):
        self.history.append(("cat", self.cat))
        self.cat = (self.cat + 1) % len(CATALOGUE_SETS)
        self._draw_catalogue()
        self._title()
        self.status(f"c: catalogue set {self.catalogue[0]}")

    def _u(self, ev):
        if self.marks or self.clicks:
            self.marks.clear()
            self._clear_marks()
            self.status("u: pending marks removed")
            return
        if not self.history:
            self.status("u: nothing to undo")
            return
        kind, what = self.history.pop()
        if kind == "fit":
            for a in what.artists:
                a.remove()
            self.fits.remove(what)
            self.n_written = min(self.n_written, len(self.fits))
            msg = f"u: removed the {what.key} fit at {float(self.to_display(what.fit.w1)):.1f} Å"
        elif kind == "z":
            self.z, self.z_err = what
            self._draw_catalogue()
            msg = f"u: z back to {self.z:.5f}"
        else:
            self.cat = what
            self._draw_catalogue()
            msg = f"u: catalogue set back to {self.catalogue[0]}"
        self._title()
        self.status(msg)

    def _r(self, ev):
        self.draw()
        self.status("r: redrawn")

    def _w(self, ev):
        new = self.fits[self.n_written:]
        if not new:
            self.status("w: no new fits to write")
            return
        path = append_log(self.log_path, self.rows(new))
        self.n_written = len(self.fits)
        self.echo(f"w: {len(new)} fit(s) appended to {path}")
        self.status(f"w: {len(new)} fit(s) appended to {path}")

    def _q(self, ev):
        import matplotlib.pyplot as plt
        for cid in self._cids:
            self.fig.canvas.mpl_disconnect(cid)
        self.closed = True
        plt.close(self.fig)

    def _help(self, ev):
        for k in HELP.values():
            self.echo(k)
        self.status(HELP_LINE)

    # ------------------------------------------------------------------ log
    def rows(self, fits=None) -> list[dict]:
        """One row per fitted line (the log's columns)."""
        rows = []
        for ft in (self.fits if fits is None else fits):
            f = ft.fit
            for k, ln in enumerate(f.lines):
                r = {"spectrum": self.spectra[ft.spec].name, "key": ft.key, "kind": f.kind, "component": k,
                     "medium": self.medium, "w1": float(self.to_display(f.w1)), "w2": float(self.to_display(f.w2)),
                     "z_session": self.z}
                r.update(ln.to_row())
                r["centre"] = float(self.to_display(ln.centre)) if np.isfinite(ln.centre) else float("nan")
                r["ew_frame"] = "rest" if np.isfinite(f.z) and f.z != 0 else "observed"
                r["chi2_dof"] = f.redchi
                rows.append(r)
        return rows


LOG_UNITS = {"w1": "Angstrom", "w2": "Angstrom", "centre": "Angstrom", "centre_err": "Angstrom",
             "flux": "erg s-1 cm-2", "flux_err": "erg s-1 cm-2", "fwhm_aa": "Angstrom", "fwhm_aa_err": "Angstrom",
             "fwhm_kms": "km s-1", "fwhm_kms_err": "km s-1", "ew": "Angstrom", "ew_err": "Angstrom",
             "continuum": "erg s-1 cm-2 Angstrom-1"}


def append_log(path, rows: list[dict]) -> Path:
    """Append ``rows`` to the ECSV log at ``path`` (created with units when absent)."""
    from astropy.table import Table, vstack

    from ..io import atomic_write_table

    path = Path(path)
    new = Table(rows=rows)
    for c, u in LOG_UNITS.items():
        if c in new.colnames:
            new[c].unit = u
    if path.exists():
        old = Table.read(path, format="ascii.ecsv")
        new = vstack([old, new], metadata_conflicts="silent")
    new.meta["description"] = ("specred fit (splot) log: one row per fitted line; wavelengths observed, in the "
                               "medium column; EW positive for emission")
    return atomic_write_table(new, path)


def splot(*spectra, z: float | None = None, log_path=None, catalogue: str = "galaxy", block: bool | None = None):
    """Open an interactive session (scripts, Jupyter with ``%matplotlib widget``) and return it."""
    import matplotlib.pyplot as plt

    s = Splot(list(spectra), z=z, log_path=log_path, catalogue=catalogue)
    plt.show(block=block)
    return s


def interactive_backend() -> bool:
    """True when matplotlib's backend can show a window (or a Jupyter widget)."""
    import matplotlib

    b = matplotlib.get_backend().lower()
    return not (b in ("agg", "pdf", "ps", "svg", "cairo", "template") or b.endswith("inline"))


__all__ = ["Splot", "splot", "append_log", "CATALOGUE_SETS", "HELP", "interactive_backend"]
