"""ESO NTT SofI (near-infrared long-slit spectroscopy with the blue grism GB).

Header facts used here (``ntt-reference/headers/KEYWORDS.md``, real SofI headers):

* ``INSTRUME = 'SOFI'``, ``TELESCOP = 'ESO-NTT'``.  Hawaii 1024 x 1024 array
  (``ESO DET WIN NX/NY``, ``ESO DET CHIP NX/NY``), no binning, no prescan or overscan.
* Grism ``ESO INS OPTI2 NAME`` (``'GB'`` blue, ``'GR'`` red; ``'open'`` in imaging), slit
  ``ESO INS OPTI1 NAME`` (``'long_slit_1'`` ...), order-sorting filter
  ``ESO INS FILT1 NAME`` (``'GBF'``, ``'GRF'``).  Pixel scale ``ESO INS PIXSCALE``
  (0.288 arcsec in the long-slit modes).
* Lamps: ``ESO INS LAMPi NAME`` / ``ESO INS LAMPi ST`` (arc: ``LAMP1 = 'Xenon'``, T;
  spectroscopic dome flats: ``LAMP3 = 'Halogen'``, T for lamp-on and F for lamp-off).
* ``EXPTIME`` equals one DIT (``ESO DET DIT``); ``ESO DET NDIT`` DITs are averaged.
* Nodding: ``ESO SEQ CUMOFFSETX/Y`` (arcsec; the nod of ``SOFI_spec_obs_AutoNodOnSlit`` is
  along the slit in X), ``ESO SEQ NODTHROW``, ``ESO SEQ JITTER WIDTH``.

Documented constants (not in the headers):

* gain 5.4 e-/ADU and read noise "2.1" are the fixed SofI values of the PESSTO pipeline
  (svalenti/pessto, ``trunk/src/ntt/util.py``, ``readkey3``: ``'gain': 5.4, 'ron': 2.1``;
  they are not read from the header).  2.1 e- would be far below what a Hawaii-1 array
  reaches in a double-correlated read; read as ADU it is 2.1 x 5.4 = 11.3 e-, the
  ~11-12 e- typical of such reads and the value the specred simulator uses, so
  :data:`READ_NOISE_E` = 11.34 e- (the PESSTO number is kept as
  :data:`PESSTO_READ_NOISE`).
* saturation 10 000 ADU: the limit of the linear range of the SofI array (the PESSTO
  flat-field ON/OFF test uses a mean of 2000 ADU; the simulator saturates at 10 000).
* slit image on raw columns 30-1000 (1-based): the trim of every PESSTO SofI product
  (``CCDSEC = '[30:1000,1:1024]'``).
* dispersion along the rows (numpy axis 0) with the wavelength DEcreasing with row
  (GB: 16 459 Å at row 1, 9356 Å at row 1024).  Wavelengths are in vacuum.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from astropy.io import fits

from .base import (DetectorGeometry, Instrument, dpr_tokens, hbool, hfloat, hint, hstr, image_shape,
                   match_standard, radec, section_in_array, stored_region)

log = logging.getLogger(__name__)

GAIN_E_PER_ADU = 5.4
"""PESSTO's fixed SofI gain (e-/ADU)."""
PESSTO_READ_NOISE = 2.1
"""PESSTO's fixed SofI read-noise number (``readkey3(hdr, 'ron')``)."""
READ_NOISE_E = PESSTO_READ_NOISE * GAIN_E_PER_ADU
"""Read noise in electrons used by specred: PESSTO's 2.1 taken as ADU (see module doc)."""
SATURATION_ADU = 10000.0
"""Upper end of the linear range (ADU)."""
DEFAULT_PIXEL_SCALE = 0.288
"""arcsec/px of the long-slit modes, used when ESO INS PIXSCALE is absent."""
SLIT_COLUMNS = (30, 1000)
"""Raw columns (1-based, inclusive) covered by the slit image."""
SPECTROSCOPIC_GRISMS = ("GB", "GR")
MAX_LAMPS = 9

_TELLURIC_NAME = re.compile(r"^\s*(HIP|HD)[\s_-]*\d", re.IGNORECASE)
"""Names of Hipparcos / HD stars: the A0V telluric standards when no list matches."""


def lamps_on(header: fits.Header) -> list[str]:
    """Names of the calibration lamps that are on (``ESO INS LAMPi ST`` true, or a lamp
    name without a status keyword, as PESSTO assumes for ``LAMP1 = 'Xenon'``)."""
    on = []
    for i in range(1, MAX_LAMPS + 1):
        name = hstr(header, f"ESO INS LAMP{i} NAME")
        st = hbool(header, f"ESO INS LAMP{i} ST")
        if st is True or (st is None and name):
            on.append(name or f"LAMP{i}")
    return on


class SOFI(Instrument):
    """ESO NTT SofI: Hawaii array, long slit, blue grism GB (9350-16450 Å)."""

    name = "SOFI"
    instrume = ("SOFI",)
    required_keywords = ("INSTRUME", "DATE-OBS", "EXPTIME")
    wavelength_medium = "vacuum"
    arc_lamp = "Xe"

    def raw_shape(self, header: fits.Header) -> tuple[int, int]:
        """``(ESO DET WIN NY, ESO DET WIN NX)``, else the chip size, else 1024 x 1024."""
        nx = hint(header, "ESO DET WIN NX") or hint(header, "ESO DET CHIP NX") or 1024
        ny = hint(header, "ESO DET WIN NY") or hint(header, "ESO DET CHIP NY") or 1024
        return int(ny), int(nx)

    @staticmethod
    def _elements(header: fits.Header) -> tuple[str | None, str | None, str | None]:
        grism = hstr(header, "ESO INS OPTI2 NAME") or hstr(header, "ESO INS OPTI2 ID")
        filt = hstr(header, "ESO INS FILT1 NAME") or hstr(header, "FILTER1")
        slit = hstr(header, "ESO INS OPTI1 NAME") or hstr(header, "ESO INS OPTI1 ID")
        return grism, filt, slit

    def setup_key(self, header: fits.Header) -> str:
        """``'GB/GBF/long_slit_1'`` (grism/filter/slit)."""
        grism, filt, slit = self._elements(header)
        return "/".join([grism or "?", filt or "?", slit or "?"])

    def geometry(self, header: fits.Header) -> DetectorGeometry:
        """Detector geometry (raw 1024 x 1024 or a PESSTO-trimmed array)."""
        raw_ny, raw_nx = self.raw_shape(header)
        scale = hfloat(header, "ESO INS PIXSCALE") or DEFAULT_PIXEL_SCALE
        common = dict(prescan=None, overscan=None, dispersion_axis=0, wavelength_increases=False,
                      binning=(1, 1), gain=GAIN_E_PER_ADU, read_noise=READ_NOISE_E,
                      saturation=SATURATION_ADU, pixel_scale=float(scale))
        shape = image_shape(header)
        if len(shape) == 2 and tuple(shape) != (raw_ny, raw_nx):
            shape2 = (int(shape[0]), int(shape[1]))
            region = stored_region(header, shape2)
            trim = section_in_array((SLIT_COLUMNS[0], SLIT_COLUMNS[1], 1, raw_ny), region, shape2)
            return DetectorGeometry(shape=shape2, data_section=(slice(0, shape2[0]), slice(0, shape2[1])),
                                    trim_section=trim, **common)
        c0, c1 = min(SLIT_COLUMNS[0] - 1, raw_nx), min(SLIT_COLUMNS[1], raw_nx)
        return DetectorGeometry(shape=(raw_ny, raw_nx), data_section=(slice(0, raw_ny), slice(0, raw_nx)),
                                trim_section=(slice(0, raw_ny), slice(c0, c1)), **common)

    def _classify_type(self, header: fits.Header, info: dict[str, Any], problems: list[str]) -> str:
        """SofI rules, in order: imaging, flat / lamp-off flat, arc, telluric standard,
        flux standard, science."""
        typ = dpr_tokens(info["dpr_type"])
        obj = info["object"].upper()
        tech = hstr(header, "ESO DPR TECH")
        grism, filt, slit = self._elements(header)
        info.update(grism=grism, filter=filt, slit=slit, ndit=hint(header, "ESO DET NDIT"),
                    offset_x=hfloat(header, "ESO SEQ CUMOFFSETX"), offset_y=hfloat(header, "ESO SEQ CUMOFFSETY"),
                    nod_throw=hfloat(header, "ESO SEQ NODTHROW"),
                    jitter_width=hfloat(header, "ESO SEQ JITTER WIDTH"))
        if (grism or "").upper() not in SPECTROSCOPIC_GRISMS or (tech is not None and "SPECTRUM" not in tech.upper()):
            return "imaging"
        if tech is None:
            problems.append("missing keyword ESO DPR TECH (assumed spectroscopy)")
        on = lamps_on(header)
        if "FLAT" in typ or obj == "FLAT":
            if "SKY" in typ:
                problems.append(f"spectroscopic sky flat (ESO DPR TYPE {info['dpr_type']!r}): not used")
                return "unknown"
            if on:
                info["lamp"] = "+".join(on)
                return "flat"
            info["lamp"] = "off"
            return "lamp_off_flat"
        if typ & {"LAMP", "WAVE"} or obj in ("LAMP", "WAVE"):
            if on:
                info["lamp"] = "+".join(on)
                return "arc"
            info["lamp"] = "off"
            problems.append("arc-lamp frame with no lamp on (ESO INS LAMPi ST): lamp-off arc, not used")
            return "unknown"
        ra, dec = radec(header)
        if "TELLURIC" in typ:
            std = match_standard(ra, dec, info["object"] or None)
            if std is not None:
                info["standard"] = std.name
            return "telluric_standard"
        is_std = bool(typ & {"STD", "FLUX"})
        if is_std or "OBJECT" in typ or not typ:
            std = match_standard(ra, dec, info["object"] or None)
            kind = getattr(std, "kind", None)
            if kind in ("flux", "telluric"):
                info["standard"] = std.name
                ftype = "flux_standard" if kind == "flux" else "telluric_standard"
                if not is_std:
                    problems.append(f"ESO DPR TYPE {info['dpr_type']!r} but the position matches the "
                                    f"{'flux' if kind == 'flux' else 'telluric'} standard {std.name}")
                return ftype
            if is_std:
                if _TELLURIC_NAME.match(info["object"]):
                    problems.append(f"standard {info['object']!r} not found in the standard-star lists; "
                                    "classified as telluric standard from its name")
                    return "telluric_standard"
                problems.append(f"standard {info['object']!r} not found in the standard-star lists; "
                                "classified as flux standard")
                return "flux_standard"
            if "OBJECT" in typ:
                return "science"
            problems.append("missing keyword ESO DPR TYPE: classified as science from OBJECT")
            return "science"
        problems.append(f"unrecognised ESO DPR TYPE {info['dpr_type']!r}: not used")
        return "unknown"
