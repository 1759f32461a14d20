"""specred fit (splot habits): the window driven headless by synthetic key and mouse events
posted to an Agg canvas; every key is exercised and the numbers are checked against the
batch fits of the same windows."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from astropy.table import Table  # noqa: E402
from matplotlib.backend_bases import KeyEvent, MouseEvent  # noqa: E402

from specred import calib  # noqa: E402
from specred.analysis import fit_lines, make_spectrum, rest_wavelength  # noqa: E402
from specred.analysis.window import fit_window, integrate_window  # noqa: E402
from specred.interactive.splot import CATALOGUE_SETS, HELP, Splot  # noqa: E402

Z = 0.05
CONT = 1e-17
TRUTH = {"Hbeta": 1.5e-16, "NII_6548": 2e-16 / 3.05, "Halpha": 5e-16, "NII_6584": 2e-16}


def galaxy(seed=1, medium="vacuum", z=Z, lo=4800.0, hi=8000.0, step=2.0, name="gal"):
    """Continuum + four Gaussian lines (σ_int 150 km/s) + noise; LSF FWHM 6 Å."""
    rng = np.random.default_rng(seed)
    w = np.arange(lo, hi, step)
    f = np.full(w.size, CONT) * (1 + 1e-4 * (w - 6000))
    for n, F in TRUTH.items():
        c = rest_wavelength(n) * (1 + z)
        s = np.hypot(6.0 / 2.3548, 150.0 / 2.998e5 * c)
        f += F * np.exp(-0.5 * ((w - c) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
    err = np.full(w.size, 2e-18)
    f = f + rng.normal(0, 1, w.size) * err
    wave = calib.vacuum_to_air(w) if medium == "air" else w
    return make_spectrum(wave, f, err, medium=medium, lsf_fwhm_aa=6.0, name=name)


class Session:
    """A Splot on an Agg figure and helpers that post events at data coordinates."""

    def __init__(self, spectra, tmp_path, **kw):
        self.out = []
        self.s = Splot(spectra, fig=plt.figure(figsize=(10, 5)), echo=self.out.append,
                       log_path=tmp_path / "log.ecsv", **kw)
        self.c = self.s.fig.canvas
        self.c.draw()

    def _px(self, x, y):
        y = CONT if y is None else y
        return self.s.ax.transData.transform((x, y))

    def key(self, k, x=6000.0, y=None):
        px, py = self._px(x, y)
        self.c.callbacks.process("key_press_event", KeyEvent("key_press_event", self.c, k, x=px, y=py))

    def click(self, x, y=None):
        px, py = self._px(x, y)
        self.c.callbacks.process("button_press_event", MouseEvent("button_press_event", self.c, px, py, button=1))

    @property
    def status(self):
        return self.s._status.get_text()


def obs(name, z=Z):
    return rest_wavelength(name) * (1 + z)


@pytest.fixture
def sess(tmp_path):
    s = Session(galaxy(), tmp_path, z=Z)
    yield s
    plt.close("all")


def test_k_equals_the_batch_fit_of_the_same_window(sess):
    spec = sess.s.spectra[0]
    c = obs("Hbeta")
    lo, hi = c * (1 - 3000 / 2.998e5), c * (1 + 3000 / 2.998e5)     # the batch fit's ±3000 km/s window
    sess.key("k", lo)
    assert "k again" in sess.status and not sess.s.fits                # the first mark waits
    sess.key("k", hi)
    assert len(sess.s.fits) == 1
    ln = sess.s.fits[0].fit.lines[0]
    batch = fit_lines(spec, Z, ["Hbeta"])["Hbeta"]
    assert abs(ln.flux - batch.flux) < batch.flux_err
    assert abs(ln.centre - batch.wave_obs) < 3 * ln.centre_err
    assert abs(ln.fwhm_kms - batch.fwhm_kms) < batch.fwhm_kms_err
    assert abs(ln.ew - batch.ew_rest) < batch.ew_rest_err             # rest frame at the session z
    assert abs(ln.flux - TRUTH["Hbeta"]) < 3 * ln.flux_err
    # what was printed is the fit
    assert any(f"flux {ln.flux:.4g}" in o for o in sess.out)
    # a script gets the same from the same call
    again = fit_window(spec, lo, hi, z=Z).lines[0]
    assert again.flux == pytest.approx(ln.flux, rel=1e-9)


def test_d_deblends_from_catalogue_lines_and_from_clicks(sess):
    ha = obs("Halpha")
    sess.key("d", ha - 70)
    sess.key("d", ha + 70)
    f = sess.s.fits[-1].fit
    assert f.kind == "deblend" and len(f.lines) == 3
    got = sorted(f.lines, key=lambda l: l.centre)
    for ln, n in zip(got, ("NII_6548", "Halpha", "NII_6584")):
        assert abs(ln.centre - obs(n)) < 3 * ln.centre_err
        assert abs(ln.flux - TRUTH[n]) < 3 * ln.flux_err
    # clicked starting positions (a little off) win over the catalogue
    for n, off in (("NII_6548", 3.0), ("Halpha", -2.0), ("NII_6584", 2.5)):
        sess.click(obs(n) + off)
    sess.key("d", ha - 70)
    sess.key("d", ha + 70)
    assert any("clicked positions" in o for o in sess.out)
    got2 = sorted(sess.s.fits[-1].fit.lines, key=lambda l: l.centre)
    for a, b in zip(got, got2):
        assert a.flux == pytest.approx(b.flux, rel=1e-3)


def test_e_integrates_with_the_cursor_continuum(sess):
    spec = sess.s.spectra[0]
    c = obs("Hbeta")
    y1, y2 = CONT * (1 + 1e-4 * (c - 40 - 6000)), CONT * (1 + 1e-4 * (c + 40 - 6000))
    sess.key("e", c - 40, y1)
    sess.key("e", c + 40, y2)
    f = sess.s.fits[-1].fit
    assert f.kind == "integral"
    ln = f.lines[0]
    assert abs(ln.flux - TRUTH["Hbeta"]) < 3 * ln.flux_err
    assert abs(ln.centre - c) < 3 * ln.centre_err
    direct = integrate_window(spec, c - 40, c + 40, y1, y2, z=Z).lines[0]
    # the cursor y went through the display transform: equal to float precision of the pixels
    assert direct.flux == pytest.approx(ln.flux, rel=1e-6)


def test_z_identifies_the_fitted_line_and_moves_the_markers(tmp_path):
    s = Session(galaxy(), tmp_path, z=0.0495)                      # a rough redshift first
    before = [a.get_xdata()[0] for a in s.s._cat_artists if hasattr(a, "get_xdata")]
    ha = obs("Halpha")
    s.key("k", ha - 18)
    s.key("k", ha + 18)
    s.key("z", ha + 1)
    assert abs(s.s.z - Z) < 3 * s.s.z_err + 1e-5
    assert "is Halpha " in s.out[-1]
    after = [a.get_xdata()[0] for a in s.s._cat_artists if hasattr(a, "get_xdata")]
    assert after != before
    assert f"{s.s.z:.5f}" in s.s._head.get_text()
    plt.close("all")


def test_the_window_shows_errors_mask_and_both_axes(tmp_path):
    spec = galaxy()
    bad = np.zeros(spec.wave.size, bool)
    bad[500:520] = True
    masked = make_spectrum(spec.wave, spec.flux, spec.sigma, medium="vacuum", lsf_fwhm_aa=6.0, mask=bad, name="m")
    s = Session(masked, tmp_path, z=Z)
    ax = s.s.ax
    assert len(ax.collections) == 2                                  # the ±1σ band and the masked pixels
    assert np.all(np.isnan(ax.lines[0].get_ydata()[500:520]))         # masked flux not drawn
    assert s.s._secondary[0].get_xlabel().startswith("rest")
    ha = obs("Halpha")
    labels = [t.get_text() for t in ax.texts]
    assert any("6563" in t for t in labels)
    xs = [a.get_xdata()[0] for a in s.s._cat_artists if hasattr(a, "get_xdata")]
    assert min(abs(x - ha) for x in xs) < 0.01                      # Hα marked at the session z
    plt.close("all")


def test_z_without_a_fit_says_so(sess):
    sess.key("z", 6000)
    assert "fit one" in sess.status and sess.s.z == Z


def test_c_cycles_the_catalogue_sets(sess):
    names = [n for n, _ in CATALOGUE_SETS]
    seen = [sess.s.catalogue[0]]
    for _ in names:
        sess.key("c")
        seen.append(sess.s.catalogue[0])
    assert seen == names + [names[0]]


def test_u_undoes_fits_redshift_catalogue_and_pending_marks(sess):
    c = obs("Hbeta")
    sess.key("k", c - 40)
    sess.key("k", c + 40)
    n_artists = len(sess.s.ax.lines)
    sess.key("z", c)
    z1 = sess.s.z
    sess.key("c")
    sess.key("u")
    assert sess.s.catalogue[0] == "galaxy"
    sess.key("u")
    assert sess.s.z == Z and z1 != Z
    sess.key("u")
    assert not sess.s.fits and len(sess.s.ax.lines) < n_artists
    sess.key("k", c - 40)                                           # a pending mark
    sess.key("u")
    assert not sess.s.marks
    sess.key("u")
    assert "nothing to undo" in sess.status


def test_r_redraws_and_keeps_fits_and_zoom(sess):
    c = obs("Hbeta")
    sess.key("k", c - 40)
    sess.key("k", c + 40)
    sess.s.ax.set_xlim(c - 100, c + 100)
    sess.key("r")
    assert sess.s.ax.get_xlim() == pytest.approx((c - 100, c + 100))
    assert len(sess.s.fits) == 1 and all(a.axes is sess.s.ax for a in sess.s.fits[0].artists)


def test_w_appends_new_fits_to_the_log(sess, tmp_path):
    c = obs("Hbeta")
    sess.key("k", c - 40)
    sess.key("k", c + 40)
    sess.key("w")
    t = Table.read(tmp_path / "log.ecsv")
    assert len(t) == 1 and t["flux"].unit == "erg s-1 cm-2"
    assert t["flux"][0] == pytest.approx(sess.s.fits[0].fit.lines[0].flux)
    sess.key("w")
    assert "no new fits" in sess.status
    ha = obs("Halpha")
    sess.key("d", ha - 70)
    sess.key("d", ha + 70)
    sess.key("w")
    t = Table.read(tmp_path / "log.ecsv")
    assert len(t) == 4 and list(t["key"]) == ["k", "d", "d", "d"]


def test_q_closes_the_window(sess):
    num = sess.s.fig.number
    sess.key("q")
    assert sess.s.closed and not plt.fignum_exists(num)


def test_help_and_bad_keys(sess):
    sess.key("?")
    assert all(h in sess.out for h in HELP.values())
    sess.key("x")
    assert "not a splot key" in sess.status and "k d e z" in sess.status
    sess.key("o")                                                  # a toolbar shortcut passes on quietly
    sess.s.ax.set_xlim(4000, 10000)
    sess.key("k", 9500)                                            # outside the spectrum
    sess.key("k", 9600)
    assert "no spectrum covers" in sess.status
    sess.key("k", 6000, 1e-17)
    sess.key("k", 6001, 1e-17)                                      # too narrow a window
    assert "usable pixels" in sess.status
    assert not sess.s.fits


def test_two_spectra_of_one_target_on_one_axis(tmp_path):
    optical = galaxy(medium="air", hi=7000.0, name="efosc")
    red = galaxy(seed=2, medium="vacuum", lo=6600.0, hi=8000.0, step=3.0, name="sofi")
    s = Session([optical, red], tmp_path, z=Z)
    assert s.s.medium == "vacuum"                                  # mixed media: vacuum axis
    s.key("k", 7100)                                               # a window only the second covers
    s.key("k", 7300)
    assert s.s.fits[-1].spec == 1
    hb = obs("Hbeta")
    s.key("k", hb - 40)
    s.key("k", hb + 40)
    ft = s.s.fits[-1]
    assert s.s.spectra[ft.spec].name == "efosc"
    assert abs(ft.fit.lines[0].centre - hb) < 1.0                  # vacuum on the axis and in the fit
    plt.close("all")


TK_SCRIPT = r'''
import sys
import matplotlib
matplotlib.use("TkAgg")
import matplotlib.pyplot as plt
from specred.analysis import load_spectrum, rest_wavelength
from specred.interactive.splot import Splot
s = Splot(load_spectrum(sys.argv[1]), z=float(sys.argv[3]), log_path=sys.argv[2], echo=lambda t: None)
w = s.fig.canvas.get_tk_widget()
hb = rest_wavelength("Hbeta") * (1 + s.z)
keys = [("k", hb - 40), ("k", hb + 40), ("z", hb), ("question", hb), ("x", hb), ("w", hb), ("o", hb),
        ("q", hb)]
def mode():
    print("TOOLBAR", repr(str(getattr(s.fig.canvas.toolbar, "mode", ""))))
def run(i=0):
    key, x = keys[i]
    X, Y = s.ax.transData.transform((x, float(sys.argv[4])))
    X, Y = int(round(X)), int(round(w.winfo_height() - Y))
    w.event_generate("<Motion>", x=X, y=Y, warp=True)
    if key == "q":
        mode()
    w.event_generate("<KeyPress-%s>" % key, x=X, y=Y)
    if i + 1 < len(keys):
        w.after(150, run, i + 1)
w.after(800, run)
plt.show()
print("CLOSED", s.closed, s.z)
'''


def test_a_real_tkagg_window_under_xvfb(tmp_path):
    """The TkAgg backend turns real Tk key events into the same fits (skipped without Xvfb/Tk)."""
    import shutil
    import subprocess
    import sys
    if shutil.which("xvfb-run") is None:
        pytest.skip("xvfb-run not installed (Debian package xvfb)")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        pytest.skip("tkinter not available")
    from specred.spectrum_io import write_spectrum
    spec = galaxy()
    p = write_spectrum(tmp_path / "g.fits", spec.wave, spec.flux, spec.sigma, medium="vacuum",
                       header={"LSFFWHM": 6.0})
    script = tmp_path / "tk.py"
    script.write_text(TK_SCRIPT)
    log = tmp_path / "tk_log.ecsv"
    r = subprocess.run(["xvfb-run", "-a", sys.executable, str(script), str(p), str(log), "0.0495", str(CONT)],
                       capture_output=True, text=True, timeout=120)
    assert "CLOSED True" in r.stdout, r.stdout + r.stderr
    z = float(r.stdout.split("CLOSED True")[1].split()[0])
    t = Table.read(log)
    assert len(t) == 1 and t["key"][0] == "k"
    assert abs(t["flux"][0] - TRUTH["Hbeta"]) < 3 * t["flux_err"][0]
    assert abs(z - Z) < 5e-4                                        # z identified Hβ
    assert "TOOLBAR 'zoom rect'" in r.stdout                         # o reached the toolbar: zoom mode on


@pytest.mark.filterwarnings("ignore::DeprecationWarning")       # traitlets, inside ipympl's toolbar
def test_the_jupyter_widget_canvas_ipympl(tmp_path):
    """ipympl's canvas (what %matplotlib widget uses), fed the messages its browser front end
    sends: the pointer position, then the key as 'k' + value."""
    pytest.importorskip("ipympl")
    plt.switch_backend("module://ipympl.backend_nbagg")
    try:
        out = []
        s = Splot(galaxy(), z=0.0495, log_path=tmp_path / "nb.ecsv", echo=out.append)
        c = s.fig.canvas
        assert type(c).__module__.startswith("ipympl")
        hb = obs("Hbeta")

        def send(key, x):
            X, Y = s.ax.transData.transform((x, CONT))
            c.handle_event({"type": "motion_notify", "x": float(X), "y": float(c.get_renderer().height - Y),
                            "button": 0, "buttons": 0, "modifiers": [], "guiEvent": {}})
            c.handle_event({"type": "key_press", "key": "k" + key, "guiEvent": {}})

        for k, x in (("k", hb - 40), ("k", hb + 40), ("z", hb), ("w", hb), ("x", hb)):
            send(k, x)
        assert len(s.fits) == 1 and abs(s.z - Z) < 5e-4
        assert "not a splot key" in s._status.get_text()
        assert len(Table.read(tmp_path / "nb.ecsv")) == 1
    finally:
        plt.close("all")
        plt.switch_backend("Agg")
