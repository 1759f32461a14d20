"""Synthetic raw NTT nights and 1D spectra with known truth (for the demo and the tests)."""
from .night import DEFAULT_NIGHT, NightResult, simulate_night
from .spectra1d import SpectraResult, simulate_spectra

__all__ = ["simulate_night", "simulate_spectra", "NightResult", "SpectraResult", "DEFAULT_NIGHT"]
