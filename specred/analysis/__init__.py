"""Analysis of 1D spectra: line catalogue, Gaussian line fits, automatic redshifts.

    >>> from specred.analysis import load_spectrum, fit_lines, find_redshift
    >>> spec = load_spectrum("OUT/spectra/J0407_EFOSC2.fits")     # any medium, any units
    >>> zres = find_redshift(spec)                                # Redshift dataclass
    >>> fits = fit_lines(spec, zres.z)                            # the BPT lines, tied
    >>> fits = fit_lines(spec, zres.z, stellar_continuum="auto")  # on top of E-MILES SSPs
    >>> fits["Halpha"].flux, fits["Halpha"].flux_err               # erg/s/cm2
    >>> from specred.analysis import classify_spectrum
    >>> c = classify_spectrum("OUT/spectra/J0407_EFOSC2.fits")    # class, reason, BPT, R23, WR, BAL
"""
from .fitting import LineFit, LineFitResult, LineGroup, broad_group, fit_lines, narrow_group
from .lines import BPT_LINES, rest_wavelength
from .redshift import Redshift, find_redshift
from .spectrum import AnalysisSpectrum, load_spectrum, make_spectrum
from .stellar import StellarContinuum, fit_stellar_continuum
from .bal import BALResult, measure_bal
from .bpt import BPTResult, LineFlux, classify_bpt, line_fluxes_from_fit
from .classify import Classification, classify_spectra, classify_spectrum
from .metallicity import Metallicity, oxygen_abundance
from .wr import WRResult, measure_wr_bump
from .dusty import DustyFit, fit_dusty_continuum

__all__ = ["AnalysisSpectrum", "load_spectrum", "make_spectrum", "LineFit", "LineFitResult", "LineGroup",
           "narrow_group", "broad_group", "fit_lines", "Redshift", "find_redshift", "BPT_LINES",
           "rest_wavelength", "StellarContinuum", "fit_stellar_continuum", "BALResult", "measure_bal",
           "BPTResult", "LineFlux", "classify_bpt", "line_fluxes_from_fit", "Classification",
           "classify_spectra", "classify_spectrum", "Metallicity", "oxygen_abundance", "WRResult",
           "measure_wr_bump", "DustyFit", "fit_dusty_continuum"]
