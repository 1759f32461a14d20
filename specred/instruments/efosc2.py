"""ESO NTT EFOSC2 (long-slit spectroscopy with Grism #13).

Header facts used here (see ``ntt-reference/headers/KEYWORDS.md`` of the shared
reference pack, real EFOSC2 headers 2008-2014):

* ``INSTRUME = 'EFOSC'``, ``TELESCOP = 'ESO-NTT'``.
* Raw binned frame ``ESO DET WIN1 NX x NY`` (1030 x 1030 at 2x2 binning) of which
  ``ESO DET OUT1 NX x NY`` (1024 x 1024) are valid; ``ESO DET OUT1 PRSCX`` (6) prescan
  columns on the left, ``ESO DET OUT1 OVSCY`` (6) overscan rows on the top (numpy rows
  1024-1029), ``PRSCY = OVSCX = 0``.  Binning ``ESO DET WIN1 BINX/BINY``.
* Gain: ``ESO DET OUT1 CONAD`` = 1.10 e-/ADU ("Conversion from ADUs to electrons").
  ``ESO DET OUT1 GAIN`` = 0.91 is its reciprocal (ADU/e-) and is only used, inverted,
  when CONAD is absent.  Read noise ``ESO DET OUT1 RON`` = 7.8 e-.
* Grism ``ESO INS GRIS1 NAME`` (``'Gr#13'``; ``'Free'`` in imaging), filter
  ``ESO INS FILT1 NAME`` (``'Free'``, ``'GG495'``, ``'OG530'``), slit
  ``ESO INS SLIT1 NAME`` (``'slit#1.0'`` ...).
* No keyword names the arc lamp; ``ORIGFILE`` does (``'EFOSC_spec_HeAr239_0006.fits'``).

Documented constants (not in the headers): saturation 65535 ADU (16-bit ADC); unbinned
pixel scale 0.12 arcsec; the spectroscopic slit image falls on raw binned (2x2) columns
100-950 (1-based), i.e. unbinned valid-detector columns 186-1887 — the trim PESSTO
applies (``CCDSEC = '[100:950,...]'`` in every processed Gr#13 frame).  Dispersion runs
along the rows (numpy axis 0), wavelength increasing with row.  Wavelengths are in air.

Frames already processed by IRAF/PESSTO (trimmed, ``CCDSEC``/``LTV1``/``LTV2``, e.g.
851 x 1015) are recognised by :meth:`EFOSC2.is_raw` and get a geometry without prescan or
overscan.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from astropy.io import fits

from .base import (DetectorGeometry, Instrument, dpr_tokens, hfloat, hint, hstr, image_shape,
                   match_standard, radec, section_in_array, stored_region)

log = logging.getLogger(__name__)

SATURATION_ADU = 65535.0
"""16-bit converter limit (raw EFOSC2 arcs plateau at ~65 340-65 535 ADU)."""
PIXEL_SCALE_UNBINNED = 0.12
"""arcsec per unbinned 15 micron pixel (0.24 arcsec at the usual 2x2 binning)."""
SLIT_COLUMNS_UNBINNED = (186, 1888)
"""Valid-detector columns (unbinned, 0-based, end exclusive) the long slit illuminates:
raw binned 2x2 columns 100-950 (1-based) minus the 6 prescan columns, times 2."""

# fallbacks when a detector keyword is missing (values of every real 2x2 header)
_DEFAULTS = {"ESO DET WIN1 BINX": 2, "ESO DET WIN1 BINY": 2, "ESO DET OUT1 PRSCX": 6,
             "ESO DET OUT1 PRSCY": 0, "ESO DET OUT1 OVSCX": 0, "ESO DET OUT1 OVSCY": 6,
             "ESO DET OUT1 CONAD": 1.10, "ESO DET OUT1 RON": 7.8}

_LAMP_RE = re.compile(r"((?:He|Ar|Ne|Hg|Cd|Xe)+)\d*_", re.IGNORECASE)


class EFOSC2(Instrument):
    """ESO NTT EFOSC2: CCD, long slit, Grism #13 (3650-9250 Å)."""

    name = "EFOSC2"
    instrume = ("EFOSC", "EFOSC2")
    required_keywords = ("INSTRUME", "DATE-OBS", "EXPTIME")
    wavelength_medium = "air"
    arc_lamp = "HeAr"

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _det(header: fits.Header, key: str) -> int:
        v = hint(header, key)
        if v is None:
            v = _DEFAULTS[key]
            log.debug("EFOSC2 header without %s: assuming %s", key, v)
        return int(v)

    def binning(self, header: fits.Header) -> tuple[int, int]:
        """``(BINY, BINX)`` (numpy order)."""
        return self._det(header, "ESO DET WIN1 BINY"), self._det(header, "ESO DET WIN1 BINX")

    def raw_shape(self, header: fits.Header) -> tuple[int, int]:
        """Raw read-out shape ``(ESO DET WIN1 NY, ESO DET WIN1 NX)``.

        Without those keywords: the valid pixels plus prescan and overscan.
        """
        nx, ny = hint(header, "ESO DET WIN1 NX"), hint(header, "ESO DET WIN1 NY")
        if nx is None or ny is None:
            biny, binx = self.binning(header)
            onx = hint(header, "ESO DET OUT1 NX") or 2048 // binx
            ony = hint(header, "ESO DET OUT1 NY") or 2048 // biny
            nx = onx + self._det(header, "ESO DET OUT1 PRSCX") + self._det(header, "ESO DET OUT1 OVSCX")
            ny = ony + self._det(header, "ESO DET OUT1 PRSCY") + self._det(header, "ESO DET OUT1 OVSCY")
        return int(ny), int(nx)

    @staticmethod
    def _is_bias(header: fits.Header) -> bool:
        exptime = hfloat(header, "EXPTIME")
        obj = (hstr(header, "OBJECT") or "").upper()
        return (exptime is not None and exptime == 0.0) or "BIAS" in dpr_tokens(hstr(header, "ESO DPR TYPE")) \
            or obj == "BIAS"

    @staticmethod
    def _elements(header: fits.Header) -> tuple[str | None, str | None, str | None]:
        grism = hstr(header, "ESO INS GRIS1 NAME") or hstr(header, "GRISM")
        filt = hstr(header, "ESO INS FILT1 NAME") or hstr(header, "FILTER1") or hstr(header, "FILTER")
        slit = hstr(header, "ESO INS SLIT1 NAME") or hstr(header, "SLIT")
        return grism, filt, slit

    # ------------------------------------------------------------------ public API
    def setup_key(self, header: fits.Header) -> str:
        """``'Gr#13/Free/slit#1.0/2x2'`` (grism/filter/slit/BINXxBINY).

        Bias frames serve every grism, so their key is the binning only (``'2x2'``);
        :meth:`specred.discover.DiscoveryResult.groups` attaches them to every
        spectroscopic set-up of the night with that binning.
        """
        biny, binx = self.binning(header)
        binning = f"{binx}x{biny}"
        if self._is_bias(header):
            return binning
        grism, filt, slit = self._elements(header)
        return "/".join([grism or "?", filt or "?", slit or "?", binning])

    def geometry(self, header: fits.Header) -> DetectorGeometry:
        """Detector geometry from the header (raw or already trimmed frame).

        Raw frame: prescan = the ``PRSCX`` left columns over the valid rows, overscan =
        the ``OVSCY`` top rows over the valid columns, trim = slit columns x valid rows.
        Processed frame (shape differs from ``ESO DET WIN1 NX/NY``): no prescan or
        overscan, data section = whole array, trim = the raw trim region intersected
        with the region the array holds (``CCDSEC``, else ``LTV1/LTV2``).
        """
        biny, binx = self.binning(header)
        prscx = self._det(header, "ESO DET OUT1 PRSCX")
        prscy = self._det(header, "ESO DET OUT1 PRSCY")
        ovscx = self._det(header, "ESO DET OUT1 OVSCX")
        ovscy = self._det(header, "ESO DET OUT1 OVSCY")
        raw_ny, raw_nx = self.raw_shape(header)
        out_nx = hint(header, "ESO DET OUT1 NX") or (raw_nx - prscx - ovscx)
        out_ny = hint(header, "ESO DET OUT1 NY") or (raw_ny - prscy - ovscy)
        rows = slice(prscy, prscy + out_ny)
        cols = slice(prscx, prscx + out_nx)
        c0 = prscx + SLIT_COLUMNS_UNBINNED[0] // binx
        c1 = min(prscx + SLIT_COLUMNS_UNBINNED[1] // binx, prscx + out_nx)
        conad = hfloat(header, "ESO DET OUT1 CONAD")
        if conad is None:
            g = hfloat(header, "ESO DET OUT1 GAIN")     # ADU/e-
            conad = 1.0 / g if g else _DEFAULTS["ESO DET OUT1 CONAD"]
        ron = hfloat(header, "ESO DET OUT1 RON") or _DEFAULTS["ESO DET OUT1 RON"]
        common = dict(dispersion_axis=0, wavelength_increases=True, binning=(biny, binx), gain=float(conad),
                      read_noise=float(ron), saturation=SATURATION_ADU,
                      pixel_scale=PIXEL_SCALE_UNBINNED * binx)
        shape = image_shape(header)
        if len(shape) == 2 and tuple(shape) != (raw_ny, raw_nx):
            shape2 = (int(shape[0]), int(shape[1]))
            region = stored_region(header, shape2)
            trim = section_in_array((c0 + 1, c1, rows.start + 1, rows.stop), region, shape2)
            whole = (slice(0, shape2[0]), slice(0, shape2[1]))
            return DetectorGeometry(shape=shape2, data_section=whole, prescan=None, overscan=None,
                                    trim_section=trim, **common)
        prescan = None
        if prscx > 0:
            prescan = (rows, slice(0, prscx))
        elif prscy > 0:
            prescan = (slice(0, prscy), cols)
        overscan = None
        if ovscy > 0:
            overscan = (slice(prscy + out_ny, prscy + out_ny + ovscy), cols)
        elif ovscx > 0:
            overscan = (rows, slice(prscx + out_nx, prscx + out_nx + ovscx))
        return DetectorGeometry(shape=(raw_ny, raw_nx), data_section=(rows, cols), prescan=prescan,
                                overscan=overscan, trim_section=(rows, slice(c0, c1)), **common)

    def _classify_type(self, header: fits.Header, info: dict[str, Any], problems: list[str]) -> str:
        """EFOSC2 rules, in order: bias, imaging, flat, arc, flux standard, science."""
        typ = dpr_tokens(info["dpr_type"])
        obj = info["object"].upper()
        tech = hstr(header, "ESO DPR TECH")
        grism, filt, slit = self._elements(header)
        info.update(grism=grism, filter=filt, slit=slit)
        if self._is_bias(header):
            return "bias"
        if (tech is not None and "SPECTRUM" not in tech.upper()) or (grism or "").upper() == "FREE":
            return "imaging"
        if grism is None:
            problems.append("missing keyword ESO INS GRIS1 NAME")
        if tech is None:
            problems.append("missing keyword ESO DPR TECH (assumed spectroscopy)")
        if typ & {"FLAT", "DOME"} or obj in ("FLAT", "DOME"):
            if "SKY" in typ:
                problems.append(f"spectroscopic sky flat (ESO DPR TYPE {info['dpr_type']!r}): not used")
                return "unknown"
            return "flat"
        if "WAVE" in typ or "LAMP" in typ or obj == "WAVE":
            m = _LAMP_RE.search(hstr(header, "ORIGFILE") or "")
            info["lamp"] = m.group(1) if m else self.arc_lamp
            return "arc"
        ra, dec = radec(header)
        is_std = bool(typ & {"STD", "FLUX"})
        if is_std or "OBJECT" in typ or not typ:
            std = match_standard(ra, dec, info["object"] or None)
        else:
            std = None
        if std is not None and getattr(std, "kind", None) == "flux":
            info["standard"] = std.name
            if not is_std:
                problems.append(f"ESO DPR TYPE {info['dpr_type']!r} but the position matches the flux "
                                f"standard {std.name}")
            return "flux_standard"
        if is_std:
            if std is not None:
                problems.append(f"standard star matches {std.name} ({std.kind}), not a spectrophotometric "
                                "standard")
            return "flux_standard"
        if "OBJECT" in typ:
            return "science"
        if not typ:
            problems.append("missing keyword ESO DPR TYPE: classified as science from OBJECT")
            return "science"
        problems.append(f"unrecognised ESO DPR TYPE {info['dpr_type']!r}: not used")
        return "unknown"
