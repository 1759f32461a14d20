"""specred: long-slit spectroscopy for ESO NTT EFOSC2 (Gr#13) and SofI (blue grism).

From a night of raw frames to flux-calibrated 1D spectra, line fits and classes.
See README.md for the two commands that matter: ``specred demo`` and the tests.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("specred")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
