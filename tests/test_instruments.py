"""Instrument layer: real NTT headers -> frame type, set-up, geometry; synthetic edge cases."""
from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest
from astropy.io import fits

import specred
from specred.errors import BadFrameError, NotNTTError, SpecredError
from specred.instruments import (FRAME_TYPES, INSTRUMENTS, FrameInfo, classify_header, get_instrument,
                                 identify, night_label)
from specred.instruments.base import parse_coordinate, section_in_array

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HEADERS = SHARED / "ntt-reference" / "headers"


def _need_headers() -> Path:
    if not HEADERS.is_dir():
        pytest.skip(f"reference data not available: {HEADERS} is absent (CI provides ../shared)")
    return HEADERS


def load(name: str) -> fits.Header:
    path = _need_headers() / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fits.Header.fromstring(path.read_text(), sep="\n")


def all_header_files() -> list[str]:
    if not HEADERS.is_dir():
        return []
    return [str(p.relative_to(HEADERS)) for p in sorted(HEADERS.glob("*.header.txt"))
            + sorted(HEADERS.glob("other_frames/*.header.txt"))]


@pytest.fixture
def no_calib(monkeypatch):
    """Classification without the standard-star lists (position matching skipped)."""
    fake = types.ModuleType("specred.calib")
    monkeypatch.setitem(sys.modules, "specred.calib", fake)
    monkeypatch.setattr(specred, "calib", fake, raising=False)


@pytest.fixture
def fake_calib(monkeypatch):
    """A calib module whose find_standard knows one flux and one telluric star."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Star:
        name: str
        ra: float
        dec: float
        vmag: float
        sptype: str
        kind: str
        flux_file: str

    stars = [Star("Feige 110", 349.9933, -5.1656, 11.8, "DOB", "flux", "feige110.dat"),
             Star("HIP 98640", 300.5, -20.0, 7.1, "A0V", "telluric", "")]

    def find_standard(ra_deg, dec_deg, name=None, radius_arcsec=60.0):
        import math
        for s in stars:
            d = math.hypot((s.ra - ra_deg) * math.cos(math.radians(dec_deg)), s.dec - dec_deg) * 3600
            if d < radius_arcsec:
                return s
        return None

    fake = types.ModuleType("specred.calib")
    fake.find_standard = find_standard
    monkeypatch.setitem(sys.modules, "specred.calib", fake)
    monkeypatch.setattr(specred, "calib", fake, raising=False)


# ============================================================================ real headers
@pytest.mark.parametrize("name", all_header_files() or ["<no headers>"])
def test_every_real_header_classifies_or_fails_cleanly(name):
    """Each header either classifies to a known type or raises BadFrameError/NotNTTError."""
    h = load(name) if name != "<no headers>" else _need_headers()
    try:
        info = classify_header(h, name)
    except BadFrameError as exc:          # NotNTTError is a BadFrameError
        assert exc.reason and "\n" not in exc.reason
        return
    assert info.frame_type in FRAME_TYPES
    assert info.instrument in INSTRUMENTS
    assert len(info.night) == 10 and info.night[4] == "-"
    assert isinstance(info.to_row(), dict)


@pytest.mark.parametrize("name,filt,slit", [
    ("arc_20120420_Gr13_GG495_slit1.0_1", "GG495", "slit#1.0"),
    ("arc_20120421_Gr13_GG495_slit1.5_1", "GG495", "slit#1.5"),
    ("arc_20120808_Gr13_OG530_slit1.0", "OG530", "slit#1.0"),
    ("arc_20120809_Gr13_OG530_slit1.5", "OG530", "slit#1.5"),
    ("arc_20120825_Gr13_Free_slit1.0_56442_1", "Free", "slit#1.0"),
    ("arc_20120825_Gr13_GG495_slit1.0_56442_1", "GG495", "slit#1.0"),
    ("arc_20120906_Gr13_Free_slit1.5_56442_1", "Free", "slit#1.5"),
    ("arc_20120906_Gr13_GG495_slit1.5_56442_1", "GG495", "slit#1.5"),
])
def test_efosc2_arcs(name, filt, slit):
    info = classify_header(load(f"{name}.header.txt"), name)
    assert info.instrument == "EFOSC2"
    assert info.frame_type == "arc"
    assert info.setup == f"Gr#13/{filt}/{slit}/2x2"
    assert info.lamp == "HeAr"            # from ORIGFILE 'EFOSC_spec_HeAr...'
    assert info.problems == ()


def test_efosc2_arc_fields():
    info = classify_header(load("arc_20120825_Gr13_Free_slit1.0_56442_1.header.txt"), "x.fits")
    assert info.date_obs == "2012-08-26T21:58:48.139"
    assert info.night == "2012-08-26"
    assert info.mjd == pytest.approx(56165.91583495)
    assert info.exptime == pytest.approx(2.5011)
    assert info.airmass == pytest.approx(1.0)
    assert info.obs_id is not None
    assert info.offset_x is None and info.nod is None


def test_efosc2_flux_standard_and_science_from_dpr_type(no_calib):
    std = classify_header(load("sens0_Gr13_Free.header.txt"))
    assert (std.instrument, std.frame_type, std.object) == ("EFOSC2", "flux_standard", "Feige110")
    assert std.setup == "Gr#13/Free/slit#1.0/2x2"
    assert std.airmass == pytest.approx(0.5 * (1.176 + 1.178))
    assert std.night == "2011-09-03"       # 06:38 UT belongs to the night that began on the 3rd
    sci = classify_header(load("sky_Gr13_Free.header.txt"))
    assert (sci.frame_type, sci.object) == ("science", "SN2011dg")
    assert sci.ra == pytest.approx(226.293725) and sci.dec == pytest.approx(-43.5111)
    assert sci.airmass == pytest.approx(0.5 * (1.241 + 1.341))


def test_efosc2_standard_recognised_by_position(fake_calib):
    h = load("sens0_Gr13_Free.header.txt")
    h["HIERARCH ESO DPR TYPE"] = "OBJECT"
    info = classify_header(h)
    assert info.frame_type == "flux_standard"
    assert info.standard == "Feige 110"
    assert any("matches the flux standard" in p for p in info.problems)


@pytest.mark.parametrize("name,grism,filt", [("arc_GD71_1_GB_20111220", "GB", "GBF"),
                                             ("arc_GD71_2_GR_20120121", "GR", "GRF")])
def test_sofi_arcs(name, grism, filt):
    info = classify_header(load(f"{name}.header.txt"), name)
    assert info.instrument == "SOFI"
    assert info.frame_type == "arc"
    assert info.setup == f"{grism}/{filt}/long_slit_2"
    assert info.grism == grism
    assert info.lamp == "Xenon"
    assert info.ndit in (10, 30)


def test_sofi_arc_in_the_morning_belongs_to_the_previous_night():
    info = classify_header(load("arc_GD71_1_GB_20111220.header.txt"))
    assert info.date_obs.startswith("2011-12-20T09:59")
    assert info.night == "2011-12-19"


@pytest.mark.parametrize("name,inst", [("other_frames/flat_20120411_B639.header.txt", "EFOSC2"),
                                       ("other_frames/NTT_I.header.txt", "EFOSC2"),
                                       ("other_frames/flat_20120410_J_56089_1.header.txt", "SOFI")])
def test_imaging_frames(name, inst):
    info = classify_header(load(name))
    assert info.instrument == inst
    assert info.frame_type == "imaging"


def test_fors2_is_not_ntt():
    with pytest.raises(NotNTTError) as err:
        classify_header(load("other_frames/sky_atmo2.header.txt"), "sky_atmo2.fits")
    assert "not an NTT frame" in err.value.reason
    assert "ESO-VLT-U1" in err.value.reason and "FORS2" in err.value.reason


@pytest.mark.parametrize("name", ["vega", "sun", "ATLAS_H2O", "ATLAS_O2", "sky_GB", "sky_GR"])
def test_iraf_1d_products_without_eso_keywords_are_not_ntt(name):
    with pytest.raises(NotNTTError) as err:
        classify_header(load(f"{name}.header.txt"), name)
    assert "TELESCOP" in err.value.reason and "INSTRUME" in err.value.reason


@pytest.mark.parametrize("name", ["sens_merge_Gr13_Free_slit1.0_1", "sens_merge_Gr13_Free_slit1.0_1_old",
                                  "sens_20101004_Gr13_Free_slit1.0", "sens_20101004_Gr13_Free_slit1.5"])
def test_sensitivity_functions_are_bad_frames_naming_the_keyword(name):
    with pytest.raises(BadFrameError) as err:
        classify_header(load(f"{name}.header.txt"), name)
    assert not isinstance(err.value, NotNTTError)
    assert "EXPTIME" in err.value.reason


# ============================================================================ geometry
def test_raw_efosc2_geometry_from_the_header():
    h = load("arc_20120825_Gr13_Free_slit1.0_56442_1.header.txt")
    h["NAXIS1"] = 1030
    h["NAXIS2"] = 1030
    for k in ("CCDSEC", "LTV1", "LTV2", "LTM1_1", "LTM2_2", "TRIM", "BIASSEC"):
        h.remove(k, ignore_missing=True)
    inst = identify(h)
    assert inst.name == "EFOSC2" and inst.is_raw(h)
    g = inst.geometry(h)
    assert g.shape == (1030, 1030)
    assert g.prescan[1] == slice(0, 6)
    assert g.prescan[0] == slice(0, 1024)
    assert g.overscan[0] == slice(1024, 1030)
    assert g.data_section == (slice(0, 1024), slice(6, 1030))
    assert g.trim_section == (slice(0, 1024), slice(99, 950))     # columns 100-950 (1-based)
    assert g.trim_shape == (1024, 851)
    assert g.gain == pytest.approx(1.10)                           # CONAD, not GAIN = 0.91
    assert g.read_noise == pytest.approx(7.8)
    assert g.saturation == 65535
    assert g.pixel_scale == pytest.approx(0.24)
    assert g.binning == (2, 2)
    assert g.dispersion_axis == 0 and g.wavelength_increases


def test_raw_efosc2_geometry_follows_header_values():
    h = load("arc_20120825_Gr13_Free_slit1.0_56442_1.header.txt")
    h["NAXIS1"], h["NAXIS2"] = 1030, 1030
    h["HIERARCH ESO DET OUT1 CONAD"] = 1.5
    h["HIERARCH ESO DET OUT1 RON"] = 9.0
    h["HIERARCH ESO DET OUT1 OVSCY"] = 4
    h["HIERARCH ESO DET WIN1 NY"] = 1028
    h["NAXIS2"] = 1028
    g = identify(h).geometry(h)
    assert g.shape == (1028, 1030)
    assert g.overscan[0] == slice(1024, 1028)
    assert (g.gain, g.read_noise) == (1.5, 9.0)


def test_gain_falls_back_to_inverse_of_eso_gain():
    h = load("arc_20120825_Gr13_Free_slit1.0_56442_1.header.txt")
    h.remove("HIERARCH ESO DET OUT1 CONAD")
    g = identify(h).geometry(h)
    assert g.gain == pytest.approx(1 / 0.91)


@pytest.mark.parametrize("name,shape", [("arc_20120825_Gr13_Free_slit1.0_56442_1", (1015, 851)),
                                        ("arc_20120825_Gr13_GG495_slit1.0_56442_1", (766, 851))])
def test_processed_efosc2_geometry(name, shape):
    h = load(f"{name}.header.txt")
    inst = identify(h)
    assert not inst.is_raw(h)
    g = inst.geometry(h)
    assert g.shape == shape
    assert g.prescan is None and g.overscan is None
    assert g.data_section == (slice(0, shape[0]), slice(0, shape[1]))
    assert g.trim_shape == shape            # CCDSEC [100:950,...] is already the trim region
    assert g.gain == pytest.approx(1.10)


def test_sofi_geometry_raw_and_processed():
    h = load("arc_GD71_1_GB_20111220.header.txt")
    inst = identify(h)
    g = inst.geometry(h)                     # processed: 971 x 1024, CCDSEC [30:1000,1:1024]
    assert g.shape == (1024, 971) and g.trim_shape == (1024, 971)
    h["NAXIS1"] = 1024
    for k in ("CCDSEC", "LTV1", "LTM1_1"):
        h.remove(k, ignore_missing=True)
    assert inst.is_raw(h)
    g = inst.geometry(h)
    assert g.shape == (1024, 1024)
    assert g.prescan is None and g.overscan is None
    assert g.trim_section == (slice(0, 1024), slice(29, 1000))
    assert not g.wavelength_increases and g.dispersion_axis == 0
    assert g.gain == pytest.approx(5.4)
    assert g.pixel_scale == pytest.approx(0.288)
    assert g.saturation == pytest.approx(10000)
    assert inst.wavelength_medium == "vacuum" and get_instrument("EFOSC2").wavelength_medium == "air"


# ============================================================================ synthetic headers
def efosc2(**kw) -> fits.Header:
    h = fits.Header()
    h["TELESCOP"] = "ESO-NTT"
    h["INSTRUME"] = "EFOSC"
    h["OBJECT"] = kw.pop("OBJECT", "J0123-4567")
    h["DATE-OBS"] = "2018-12-05T03:00:00.000"
    h["MJD-OBS"] = 58457.125
    h["EXPTIME"] = 600.0
    h["RA"] = 20.0
    h["DEC"] = -30.0
    eso = {"DPR TYPE": "OBJECT", "DPR TECH": "SPECTRUM", "INS GRIS1 NAME": "Gr#13", "INS FILT1 NAME": "Free",
           "INS SLIT1 NAME": "slit#1.0", "DET WIN1 BINX": 2, "DET WIN1 BINY": 2, "TEL AIRM START": 1.1,
           "TEL AIRM END": 1.2, "OBS ID": 123}
    for k, v in kw.items():
        if k.startswith("ESO_"):
            eso[k[4:].replace("_", " ")] = v
        else:
            h[k] = v
    for k, v in eso.items():
        if v is not None:
            h[f"HIERARCH ESO {k}"] = v
    return h


def sofi(**kw) -> fits.Header:
    h = fits.Header()
    h["TELESCOP"] = "ESO-NTT"
    h["INSTRUME"] = "SOFI"
    h["OBJECT"] = kw.pop("OBJECT", "J0123-4567")
    h["DATE-OBS"] = "2018-12-07T00:40:00.000"
    h["EXPTIME"] = 100.0
    h["RA"] = 20.0
    h["DEC"] = -30.0
    eso = {"DPR TYPE": "OBJECT", "DPR TECH": "SPECTRUM", "INS OPTI2 NAME": "GB", "INS FILT1 NAME": "GBF",
           "INS OPTI1 NAME": "long_slit_1", "DET NDIT": 3, "TEL AIRM START": 1.3, "TEL AIRM END": 1.3,
           "SEQ CUMOFFSETX": -29.5, "SEQ CUMOFFSETY": 0.0, "SEQ NODTHROW": 30.0, "SEQ JITTER WIDTH": 6.0,
           "OBS ID": 200}
    for k, v in kw.items():
        if k.startswith("ESO_"):
            eso[k[4:].replace("_", " ")] = v
        else:
            h[k] = v
    for k, v in eso.items():
        if v is not None:
            h[f"HIERARCH ESO {k}"] = v
    return h


def test_synthetic_efosc2_science_fields(no_calib):
    info = classify_header(efosc2(), "a.fits")
    assert info.frame_type == "science"
    assert info.setup == "Gr#13/Free/slit#1.0/2x2"
    assert info.airmass == pytest.approx(1.15)
    assert info.night == "2018-12-04"
    assert info.obs_id == 123
    assert info.problems == ()
    assert info.filename == "a.fits"


@pytest.mark.parametrize("kw,expected", [
    ({"EXPTIME": 0.0, "ESO_DPR_TYPE": "BIAS", "ESO_DPR_TECH": "IMAGE", "OBJECT": "BIAS"}, "bias"),
    ({"EXPTIME": 0.0}, "bias"),
    ({"ESO_DPR_TYPE": "FLAT", "OBJECT": "FLAT"}, "flat"),
    ({"ESO_DPR_TYPE": "LAMP,FLAT"}, "flat"),
    ({"ESO_DPR_TYPE": "OBJECT", "OBJECT": "DOME"}, "flat"),
    ({"ESO_DPR_TYPE": "WAVE", "OBJECT": "WAVE"}, "arc"),
    ({"ESO_DPR_TYPE": "WAVE,LAMP"}, "arc"),
    ({"ESO_DPR_TYPE": "STD"}, "flux_standard"),
    ({"ESO_DPR_TYPE": "OBJECT"}, "science"),
    ({"ESO_DPR_TECH": "IMAGE"}, "imaging"),
    ({"ESO_INS_GRIS1_NAME": "Free"}, "imaging"),
    ({"ESO_DPR_TYPE": "SKY"}, "unknown"),
])
def test_efosc2_rules(no_calib, kw, expected):
    assert classify_header(efosc2(**kw)).frame_type == expected


def test_efosc2_bias_setup_is_the_binning(no_calib):
    info = classify_header(efosc2(EXPTIME=0.0, ESO_DPR_TYPE="BIAS", ESO_DPR_TECH="IMAGE"))
    assert info.setup == "2x2"
    info = classify_header(efosc2(EXPTIME=0.0, ESO_DET_WIN1_BINX=1, ESO_DET_WIN1_BINY=1))
    assert info.setup == "1x1"


@pytest.mark.parametrize("kw,expected,lamp", [
    ({"ESO_DPR_TYPE": "LAMP", "OBJECT": "LAMP", "ESO_INS_LAMP1_NAME": "Xenon", "ESO_INS_LAMP1_ST": True},
     "arc", "Xenon"),
    ({"ESO_DPR_TYPE": "FLAT", "OBJECT": "FLAT", "ESO_INS_LAMP3_NAME": "Halogen", "ESO_INS_LAMP3_ST": True},
     "flat", "Halogen"),
    ({"ESO_DPR_TYPE": "FLAT", "OBJECT": "FLAT", "ESO_INS_LAMP3_NAME": "Halogen", "ESO_INS_LAMP3_ST": False},
     "lamp_off_flat", "off"),
    ({"ESO_DPR_TYPE": "FLAT", "OBJECT": "FLAT"}, "lamp_off_flat", "off"),
    ({"ESO_DPR_TYPE": "LAMP", "OBJECT": "LAMP", "ESO_INS_LAMP1_NAME": "Xenon", "ESO_INS_LAMP1_ST": False},
     "unknown", "off"),
    ({"ESO_DPR_TYPE": "STD,TELLURIC", "OBJECT": "HIP012345"}, "telluric_standard", None),
    ({"ESO_INS_OPTI2_NAME": "open"}, "imaging", None),
    ({"ESO_DPR_TECH": "IMAGE"}, "imaging", None),
    ({"ESO_DPR_TYPE": "OBJECT"}, "science", None),
])
def test_sofi_rules(no_calib, kw, expected, lamp):
    info = classify_header(sofi(**kw))
    assert info.frame_type == expected
    assert info.lamp == lamp


def test_sofi_offsets_and_counts(no_calib):
    info = classify_header(sofi())
    assert info.offset_x == pytest.approx(-29.5) and info.offset_y == 0.0
    assert info.nod_throw == 30.0 and info.jitter_width == 6.0
    assert info.ndit == 3 and info.total_exptime == pytest.approx(300.0)
    assert info.setup == "GB/GBF/long_slit_1"
    assert info.nod is None             # set by discover.assign_nods


def test_sofi_std_without_list_match_decided_by_name(no_calib):
    tel = classify_header(sofi(ESO_DPR_TYPE="STD", OBJECT="HIP 98640"))
    assert tel.frame_type == "telluric_standard"
    assert any("not found in the standard-star lists" in p for p in tel.problems)
    flux = classify_header(sofi(ESO_DPR_TYPE="STD", OBJECT="GD71"))
    assert flux.frame_type == "flux_standard"
    assert flux.problems
    assert classify_header(sofi(ESO_DPR_TYPE="STD", OBJECT="BD+174708")).frame_type == "flux_standard"
    assert classify_header(sofi(ESO_DPR_TYPE="STD", OBJECT="HD 12345")).frame_type == "telluric_standard"


def test_sofi_std_by_position(fake_calib):
    tel = classify_header(sofi(ESO_DPR_TYPE="STD", OBJECT="mystar", RA=300.5, DEC=-20.0))
    assert tel.frame_type == "telluric_standard" and tel.standard == "HIP 98640"
    flux = classify_header(sofi(ESO_DPR_TYPE="STD", OBJECT="HIP1", RA=349.9933, DEC=-5.1656))
    assert flux.frame_type == "flux_standard" and flux.standard == "Feige 110"
    obj = classify_header(sofi(ESO_DPR_TYPE="OBJECT", OBJECT="x", RA=300.5, DEC=-20.0))
    assert obj.frame_type == "telluric_standard"
    sci = classify_header(sofi(ESO_DPR_TYPE="OBJECT"))
    assert sci.frame_type == "science" and sci.standard is None


def test_missing_essential_keywords_are_named(no_calib):
    for key in ("DATE-OBS", "EXPTIME"):
        h = efosc2()
        del h[key]
        with pytest.raises(BadFrameError) as err:
            classify_header(h, "f.fits")
        assert key in err.value.reason and err.value.path == "f.fits"
    h = sofi()
    del h["OBJECT"]
    del h["HIERARCH ESO DPR TYPE"]
    with pytest.raises(BadFrameError, match="ESO DPR TYPE and OBJECT"):
        classify_header(h)
    h = efosc2()
    del h["INSTRUME"]
    with pytest.raises(BadFrameError, match="INSTRUME") as err:
        classify_header(h)
    assert not isinstance(err.value, NotNTTError)
    h = efosc2(**{"DATE-OBS": "yesterday"})
    with pytest.raises(BadFrameError, match="invalid DATE-OBS"):
        classify_header(h)


def test_missing_non_essential_keywords_are_problems(no_calib):
    h = efosc2()
    for k in ("HIERARCH ESO TEL AIRM START", "HIERARCH ESO TEL AIRM END", "MJD-OBS", "RA"):
        del h[k]
    info = classify_header(h)
    assert info.airmass is None and info.ra is None
    text = " | ".join(info.problems)
    assert "ESO TEL AIRM START" in text and "MJD-OBS" in text and "RA" in text
    assert info.mjd == pytest.approx(58457.125)          # computed from DATE-OBS
    h = efosc2(AIRMASS=1.4)
    del h["HIERARCH ESO TEL AIRM START"], h["HIERARCH ESO TEL AIRM END"]
    assert classify_header(h).airmass == pytest.approx(1.4)
    # calibration frames need no airmass
    h = efosc2(ESO_DPR_TYPE="WAVE")
    del h["HIERARCH ESO TEL AIRM START"], h["HIERARCH ESO TEL AIRM END"]
    assert classify_header(h).problems == ()


def test_identify_other_telescopes_and_instruments():
    h = efosc2(TELESCOP="ESO-3P6")
    with pytest.raises(NotNTTError, match="ESO-3P6"):
        identify(h)
    h = efosc2(INSTRUME="SOXS")
    with pytest.raises(NotNTTError, match="SOXS"):
        identify(h)
    with pytest.raises(NotNTTError, match="no TELESCOP or INSTRUME"):
        identify(fits.Header())
    assert identify(sofi()).name == "SOFI"


def test_get_instrument():
    assert get_instrument("efosc").name == "EFOSC2"
    assert get_instrument("SofI").name == "SOFI"
    assert get_instrument("EFOSC2").arc_lamp == "HeAr"
    with pytest.raises(SpecredError, match="unknown instrument"):
        get_instrument("FORS2")


def test_night_label():
    assert night_label("2018-12-05T03:10:00") == "2018-12-04"
    assert night_label("2018-12-04T20:00:00") == "2018-12-04"     # evening calibrations
    assert night_label("2018-12-05T12:00:00") == "2018-12-04"     # next morning
    assert night_label("2018-12-05T16:30:00") == "2018-12-05"     # next afternoon: next night


def test_helpers():
    assert parse_coordinate("01:20:00.0", hours=True) == pytest.approx(20.0)
    assert parse_coordinate("-30:30:00", hours=False) == pytest.approx(-30.5)
    assert parse_coordinate(12.5, hours=True) == 12.5
    # raw columns 100-950 of a frame holding raw [100:950, 250:1015] -> whole width
    sl = section_in_array((100, 950, 1, 1024), (100, 950, 250, 1015), (766, 851))
    assert sl == (slice(0, 766), slice(0, 851))


def test_frameinfo_to_row_is_table_friendly(no_calib):
    from astropy.table import Table

    rows = [classify_header(efosc2()).to_row(), classify_header(sofi()).to_row()]
    t = Table(rows=rows)
    assert len(t) == 2 and t["obs_id"][0] == 123
    assert isinstance(FrameInfo.__dataclass_params__.frozen, bool) and FrameInfo.__dataclass_params__.frozen
