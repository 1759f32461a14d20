"""Exceptions of specred.

Every error a user can cause derives from :class:`SpecredError`; the CLI prints its
message on one line (no traceback) and exits non-zero.  Messages name the file or the
parameter at fault and say what to do.
"""


class SpecredError(Exception):
    """Base class of all user-facing specred errors."""


class BadFrameError(SpecredError):
    """A file cannot be used as a raw frame (unreadable, truncated, missing keywords)."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotNTTError(BadFrameError):
    """The file is a valid FITS file but not from an NTT instrument specred knows."""


class ConfigError(SpecredError):
    """A configuration key or value is wrong."""


class CalibrationError(SpecredError):
    """A calibration could not be built (e.g. no arc lines identified)."""


class SpectrumError(SpecredError):
    """A 1D spectrum is unusable (empty, all NaN, non-monotonic wavelengths, no units)."""
