"""ESO-style primary headers for simulated raw EFOSC2 and SofI frames.

The keyword set, order, types and comments follow real NTT raw files (see the headers in
``ntt-reference/headers`` and their ``KEYWORDS.md``): archive file names
``EFOSC.<DATE-OBS>.fits`` / ``SOFI.<DATE-OBS>.fits``, ``ESO DPR CATG/TYPE/TECH``, template IDs,
telescope, adapter, instrument and detector keywords.  Values that a real file carries but
the simulation does not model (telemetry, encoder positions, ...) are given plausible
constants.  Keywords added by data processing (CCDSEC, LTV, ZEROCOR, ...) are never written.
"""
from __future__ import annotations

import numpy as np
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.time import Time
import astropy.units as u

LA_SILLA_LON = -70.7345   # deg, ESO TEL GEOLON
LA_SILLA_LAT = -29.2584   # deg, ESO TEL GEOLAT
LA_SILLA_ELEV = 2377.0    # m


def lst_hours(mjd: float) -> float:
    """Local mean sidereal time (h) at La Silla (IAU 1982 GMST, good to < 0.1 s)."""
    d = mjd - 51544.5
    gmst = 18.697374558 + 24.06570982441908 * d
    return float((gmst + LA_SILLA_LON / 15.0) % 24.0)


def airmass(ra_deg, dec_deg, mjd) -> np.ndarray:
    """Plane-parallel-corrected airmass (Hardie 1962) of (ra, dec) at ``mjd`` from La Silla;
    values for objects below 5 deg altitude are returned as inf."""
    ha = np.radians(np.asarray(lst_hours_vec(mjd)) * 15.0 - np.asarray(ra_deg))
    dec = np.radians(dec_deg)
    lat = np.radians(LA_SILLA_LAT)
    sin_alt = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(ha)
    secz = 1.0 / np.clip(sin_alt, 1e-3, None)
    x = secz - 0.0018167 * (secz - 1) - 0.002875 * (secz - 1) ** 2 - 0.0008083 * (secz - 1) ** 3
    return np.where(sin_alt > np.sin(np.radians(5.0)), x, np.inf)


def lst_hours_vec(mjd):
    d = np.asarray(mjd, dtype=float) - 51544.5
    return (18.697374558 + 24.06570982441908 * d + LA_SILLA_LON / 15.0) % 24.0


def _sexa(value_deg: float, hours: bool) -> str:
    a = Angle(value_deg / 15.0 if hours else value_deg, unit=u.hourangle if hours else u.deg)
    return a.to_string(sep=":", precision=1, pad=True, alwayssign=not hours)


def _common(h: fits.Header, *, instrument: str, t: Time, exptime: float, obj: str,
            ra: float, dec: float, am_start: float, am_end: float, catg: str, typ: str,
            tech: str, tpl_id: str, tpl_name: str, obs_name: str, obs_id: int, prog: str,
            tpl_nexp: int, tpl_expno: int, origfile: str):
    iso = t.isot
    h["TELESCOP"] = ("ESO-NTT", "ESO Telescope Name")
    h["INSTRUME"] = (instrument, "Instrument used")
    h["OBJECT"] = (obj, "Target description")
    h["RA"] = (round(ra, 6), f"{_sexa(ra, True)} RA (J2000) pointing")
    h["DEC"] = (round(dec, 5), f"{_sexa(dec, False)} DEC (J2000) pointing")
    h["EQUINOX"] = (2000.0, "Standard FK5 (years)")
    h["RADECSYS"] = ("FK5", "Coordinate reference frame")
    h["EXPTIME"] = (round(exptime, 4), "Total integration time")
    h["MJD-OBS"] = (round(t.mjd, 8), f"MJD start ({iso})")
    h["DATE-OBS"] = (iso, "Date of observation")
    utc = (t.mjd % 1.0) * 86400.0
    h["UTC"] = (round(utc, 3), f"{Time(t.mjd, format='mjd').strftime('%H:%M:%S')} UTC")
    lst = lst_hours(t.mjd) * 3600.0
    h["LST"] = (round(lst, 3), "Local sidereal time (s)")
    h["PI-COI"] = ("UNKNOWN", "PI-COI name.")
    h["OBSERVER"] = ("UNKNOWN", "Name of observer.")
    h["ORIGFILE"] = (origfile, "Original File Name")
    h["ARCFILE"] = (f"{instrument if instrument != 'EFOSC' else 'EFOSC'}.{iso}.fits", "Archive File Name")
    h["AIRMASS"] = (round(0.5 * (am_start + am_end), 5), "Averaged air mass")
    eso = [
        ("OBS DID", "ESO-VLT-DIC.OBS-1.11", "OBS Dictionary"),
        ("OBS ID", obs_id, "Observation block ID"),
        ("OBS NAME", obs_name, "OB name"),
        ("OBS PROG ID", prog, "ESO program identification"),
        ("OBS START", t.strftime("%Y-%m-%dT%H:%M:%S"), "OB start time"),
        ("TPL DID", "ESO-VLT-DIC.TPL-1.9", "Data dictionary for TPL"),
        ("TPL EXPNO", tpl_expno, "Exposure number within template"),
        ("TPL ID", tpl_id, "Template signature ID"),
        ("TPL NAME", tpl_name, "Template name"),
        ("TPL NEXP", tpl_nexp, "Number of exposures within template"),
        ("TPL PRESEQ", f"{tpl_id}.seq" if instrument == "EFOSC" else tpl_id, "Sequencer script"),
        ("TPL START", t.strftime("%Y-%m-%dT%H:%M:%S"), "TPL start time"),
        ("DPR CATG", catg, "Observation category"),
        ("DPR TECH", tech, "Observation technique"),
        ("DPR TYPE", typ, "Observation type"),
        ("TEL AIRM END", round(am_end, 3), "Airmass at end"),
        ("TEL AIRM START", round(am_start, 3), "Airmass at start"),
        ("TEL ALT", round(float(np.degrees(np.arcsin(1.0 / max(am_start, 1.0)))), 3), "Alt angle at start (deg)"),
        ("TEL GEOELEV", LA_SILLA_ELEV, "Elevation above sea level (m)"),
        ("TEL GEOLAT", LA_SILLA_LAT, "Tel geo latitute (+=North) (deg)"),
        ("TEL GEOLON", LA_SILLA_LON, "Tel geo longitude (+=East) (deg)"),
        ("TEL FOCU LEN", 38.501, "Focal length (m)"),
        ("TEL FOCU SCALE", 5.360, "Focal scale (arcsec/mm)"),
        ("TEL TARG ALPHA", float(_sexa(ra, True).replace(":", "")), "Alpha coordinate for the target"),
        ("TEL TARG DELTA", float(_sexa(dec, False).replace(":", "")), "Delta coordinate for the target"),
        ("TEL TARG EQUINOX", 2000.0, "Equinox"),
        ("TEL AMBI RHUM", 15.0, "Observatory ambient relative humi"),
        ("TEL AMBI TEMP", 12.5, "Observatory ambient temperature qu"),
        ("TEL AMBI PRES START", 770.2, "Observatory ambient air pressure q"),
        ("TEL PARANG START", 0.0, "Parallactic angle at start (deg)"),
        ("ADA POSANG", 0.0, "Position angle at start"),
        ("ADA GUID STATUS", "ON" if catg == "SCIENCE" else "OFF", "Status of autoguider"),
    ]
    for key, val, com in eso:
        h[f"HIERARCH ESO {key}"] = (val, com)


def efosc2_header(*, t: Time, exptime: float, kind: str, obj: str, ra: float, dec: float,
                  am_start: float = 1.0, am_end: float = 1.0, obs_id: int = 100000000,
                  expno: int = 1, nexp: int = 1, grism: str = "Gr#13", slit: str = "slit#1.0",
                  filt: str = "Free", prog: str = "0102.A-0305(A)") -> fits.Header:
    """Primary header of a raw EFOSC2 frame; ``kind`` in bias, flat, arc, standard, science."""
    catg, typ, tech, tpl, tname, oname = {
        "bias": ("CALIB", "BIAS", "IMAGE", "EFOSC_img_cal_Bias", "Bias", "Calibration"),
        "flat": ("CALIB", "FLAT", "SPECTRUM", "EFOSC_spec_cal_DomeFF", "Spectroscopic dome flat", "Calibration"),
        "arc": ("CALIB", "WAVE", "SPECTRUM", "EFOSC_spec_cal_Arcs", "Arc calibration lamps", "Calibration"),
        "standard": ("SCIENCE", "STD", "SPECTRUM", "EFOSC_spec_obs_Spectrum", "Spectroscopy", f"{obj}_g13"),
        "science": ("SCIENCE", "OBJECT", "SPECTRUM", "EFOSC_spec_obs_Spectrum", "Spectroscopy", f"{obj}_g13"),
    }[kind]
    h = fits.Header()
    orig = {"bias": "EFOSC_Bias", "flat": "EFOSC_spec_DomeFF", "arc": "EFOSC_spec_HeAr"}.get(kind, "EFOSC_Spectrum")
    _common(h, instrument="EFOSC", t=t, exptime=exptime, obj=obj, ra=ra, dec=dec, am_start=am_start,
            am_end=am_end, catg=catg, typ=typ, tech=tech, tpl_id=tpl, tpl_name=tname, obs_name=oname,
            obs_id=obs_id, prog=prog, tpl_nexp=nexp, tpl_expno=expno,
            origfile=f"{orig}{int(t.mjd * 10) % 1000:03d}_{expno:04d}.fits")
    h["CTYPE1"] = ("PIXEL", "Pixel coordinate system")
    h["CTYPE2"] = ("PIXEL", "Pixel coordinate system")
    h["CRVAL1"] = (1.0, "value of ref pixel")
    h["CRVAL2"] = (1.0, "value of ref pixel")
    h["CRPIX1"] = (0.5, "Ref. pixel of center of rotation")
    h["CRPIX2"] = (0.5, "Ref. pixel of center of rotation")
    h["CDELT1"] = (2.0, "Binning factor")
    h["CDELT2"] = (2.0, "Binning factor")
    ins = [
        ("INS FILT1 ID", {"Free": "F1", "GG495": "F11", "OG530": "F7"}.get(filt, "F1"), "Filter unique id."),
        ("INS FILT1 NAME", filt, "Filter name."),
        ("INS GRIS1 ID", "F12" if grism == "Gr#13" else "F1", "OPTIi unique ID."),
        ("INS GRIS1 NAME", grism, "OPTIi name."),
        ("INS GRIS1 NO", 12 if grism == "Gr#13" else 1, "OPTIi slot number."),
        ("INS ID", "EFOSC/1.57", "Instrument ID."),
        ("INS MODE", "DEFAULT", "Instrument mode used."),
        ("INS SLIT1 NAME", slit, "Slit common name."),
        ("INS SLIT1 WID", 0.0, "SLIT width [arcsec]."),
        ("DET BITS", 16, "Bits per pixel readout"),
        ("DET CHIP1 ID", "ccd40", "Detector chip identification"),
        ("DET CHIP1 NAME", "LORAL", "Detector chip name"),
        ("DET CHIP1 NX", 2048, "# of pixels along X"),
        ("DET CHIP1 NY", 2048, "# of pixels along Y"),
        ("DET CHIP1 PSZX", 15.0, "Size of pixel in X"),
        ("DET CHIP1 PSZY", 15.0, "Size of pixel in Y"),
        ("DET EXP TYPE", "Multiple" if kind == "arc" else "Normal", "Exposure type"),
        ("DET OUT1 CONAD", 1.10, "Conversion from ADUs to electrons"),
        ("DET OUT1 GAIN", 0.91, "Conversion from electrons to ADU"),
        ("DET OUT1 ID", "L", "Output ID as from manufacturer"),
        ("DET OUT1 NX", 1024, "valid pixels along X"),
        ("DET OUT1 NY", 1024, "valid pixels along Y"),
        ("DET OUT1 OVSCX", 0, "Overscan region in X"),
        ("DET OUT1 OVSCY", 6, "Overscan region in Y"),
        ("DET OUT1 PRSCX", 6, "Prescan region in X"),
        ("DET OUT1 PRSCY", 0, "Prescan region in Y"),
        ("DET OUT1 RON", 7.80, "Readout noise per output (e-)"),
        ("DET OUT1 X", 2048, "X location of output"),
        ("DET OUT1 Y", 1, "Y location of output"),
        ("DET READ CLOCK", "read L port Fast", "Readout clock pattern used"),
        ("DET READ SPEED", "fastL", "Readout speed"),
        ("DET WIN1 BINX", 2, "Binning factor along X"),
        ("DET WIN1 BINY", 2, "Binning factor along Y"),
        ("DET WIN1 DIT1", round(exptime + 0.000552, 6), "actual subintegration time"),
        ("DET WIN1 NDIT", 2 if kind == "arc" else 1, "# of subintegrations"),
        ("DET WIN1 NX", 1030, "# of pixels along X"),
        ("DET WIN1 NY", 1030, "# of pixels along Y"),
        ("DET WIN1 STRX", 1, "Lower left pixel in X"),
        ("DET WIN1 STRY", 1, "Lower left pixel in Y"),
        ("DET WIN1 UIT1", round(exptime, 3), "user defined subintegration time"),
    ]
    for key, val, com in ins:
        h[f"HIERARCH ESO {key}"] = (val, com)
    return h


def sofi_header(*, t: Time, dit: float, ndit: int, kind: str, obj: str, ra: float, dec: float,
                am_start: float = 1.0, am_end: float = 1.0, obs_id: int = 200000000,
                expno: int = 1, nexp: int = 1, offset_x: float | None = None,
                nodthrow: float | None = None, jitter: float | None = None, lamp_on: bool = True,
                grism: str = "GB", slit: str = "long_slit_1",
                prog: str = "0102.A-0305(B)") -> fits.Header:
    """Primary header of a raw SofI frame; ``kind`` in arc, flat (lamp on/off via
    ``lamp_on``), flux_standard, telluric, science."""
    catg, typ, tech, tpl, oname = {
        "arc": ("CALIB", "LAMP", "SPECTRUM", "SOFI_spec_cal_Arcs", "Calibration"),
        "flat": ("CALIB", "FLAT", "SPECTRUM", "SOFI_spec_cal_DomeFlats", "Calibration"),
        "flux_standard": ("CALIB", "STD", "SPECTRUM", "SOFI_spec_obs_AutoNodOnSlit", f"{obj}_GB"),
        "telluric": ("CALIB", "STD,TELLURIC", "SPECTRUM", "SOFI_spec_obs_AutoNodOnSlit", f"{obj}_GB"),
        "science": ("SCIENCE", "OBJECT", "SPECTRUM", "SOFI_spec_obs_AutoNodOnSlit", f"{obj}_GB"),
    }[kind]
    h = fits.Header()
    orig = {"arc": "SOFI_SpecArc", "flat": "SOFI_SpecFlat"}.get(kind, "SOFI_SpecNod")
    _common(h, instrument="SOFI", t=t, exptime=dit, obj=obj, ra=ra, dec=dec, am_start=am_start,
            am_end=am_end, catg=catg, typ=typ, tech=tech, tpl_id=tpl, tpl_name="", obs_name=oname,
            obs_id=obs_id, prog=prog, tpl_nexp=nexp, tpl_expno=expno,
            origfile=f"{orig}_{expno:04d}.fits")
    h["FILTER1"] = ("GBF" if grism == "GB" else "GRF", "Filter 1 name")
    h["FILTER2"] = ("open", "Filter 2 name")
    ins = [
        ("INS MODE", "LONG_SLIT_BLUE" if grism == "GB" else "LONG_SLIT_RED", "Instrument mode used."),
        ("INS PIXSCALE", 0.288, "Pixel scale"),
        ("INS OPTI1 ID", slit, "OPTIi unique ID"),
        ("INS OPTI1 NAME", slit, "OPTIi name"),
        ("INS OPTI1 TYPE", "SLIT", "OPTIi element"),
        ("INS FILT1 ID", "GBF" if grism == "GB" else "GRF", "FILTi unique ID"),
        ("INS FILT1 NAME", "GBF" if grism == "GB" else "GRF", "FILTi name"),
        ("INS FILT2 NAME", "open", "FILTi name"),
        ("INS OPTI2 ID", grism, "OPTIi unique ID"),
        ("INS OPTI2 NAME", grism, "OPTIi name"),
        ("INS OPTI2 TYPE", "GRISM", "OPTIi element"),
        ("INS OPTI3 ID", "LF", "OPTIi unique ID"),
        ("INS OPTI3 NAME", "LF", "OPTIi name"),
    ]
    if kind == "arc":
        ins += [("INS LAMP1 NAME", "Xenon", "Calibration lamp name"),
                ("INS LAMP1 ST", True, "Calibration lamp activated")]
    if kind == "flat":
        ins += [("INS LAMP3 NAME", "Halogen", "Calibration lamp name"),
                ("INS LAMP3 ST", bool(lamp_on), "Calibration lamp activated")]
    ins += [
        ("DET CHIP ID", "ESO-Hawaii", "Detector ID"),
        ("DET CHIP NAME", "Hawaii", "Detector name"),
        ("DET CHIP NX", 1024, "Pixels in X"),
        ("DET CHIP NY", 1024, "Pixels in Y"),
        ("DET CHIP PXSPACE", 1.8e-05, "Pixel-Pixel Spacing"),
        ("DET DIT", round(dit, 4), "Integration Time"),
        ("DET NDIT", int(ndit), "# of Sub-Integrations"),
        ("DET NCORRS", 2, "Read-Out Mode"),
        ("DET NCORRS NAME", "Double", "Read-Out Mode Name"),
        ("DET WIN STARTX", 1.0, "Lower Left X Ref"),
        ("DET WIN STARTY", 1.0, "Lower left Y Ref"),
        ("DET WIN NX", 1024, "# of Pixels in X"),
        ("DET WIN NY", 1024, "# of Pixels in Y"),
    ]
    if offset_x is not None:
        ins += [("SEQ CUMOFFSETX", round(offset_x, 3), "Cumulative offset in X (arcsec)"),
                ("SEQ CUMOFFSETY", 0.0, "Cumulative offset in Y (arcsec)"),
                ("SEQ NODTHROW", round(nodthrow or 0.0, 2), "Nod throw along the slit (arcsec)"),
                ("SEQ JITTER WIDTH", round(jitter or 0.0, 2), "Jitter box width (arcsec)")]
    for key, val, com in ins:
        h[f"HIERARCH ESO {key}"] = (val, com)
    return h
