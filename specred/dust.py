"""Interstellar / internal attenuation curves.

The Cardelli, Clayton & Mathis (1989, ApJ 345, 245; "CCM89") extinction law with the
optical coefficients revised by O'Donnell (1994, ApJ 422, 158), valid from 0.1 to 3.3 µm
(x = 1/λ[µm] from 0.3 to 10).  Used to redden simulated emission lines and to correct
observed line ratios for the Balmer decrement (intrinsic Hα/Hβ = 2.86, case B,
T = 10^4 K, n_e = 100 cm^-3; Osterbrock & Ferland 2006).
"""
from __future__ import annotations

import numpy as np
import astropy.units as u

__all__ = ["ccm89_k", "redden", "ebv_from_balmer", "BALMER_HA_HB"]

#: Case-B intrinsic Hα/Hβ ratio (Osterbrock & Ferland 2006, T = 10^4 K).
BALMER_HA_HB = 2.86


def _as_angstrom(wavelength) -> np.ndarray:
    if isinstance(wavelength, u.Quantity):
        return wavelength.to_value(u.AA, equivalencies=u.spectral())
    return np.asarray(wavelength, dtype=float)


def ccm89_k(wavelength, r_v: float = 3.1) -> np.ndarray:
    """k(λ) = A(λ)/E(B-V) of CCM89 (O'Donnell 1994 optical), wavelengths in Å.

    Outside 1000–33000 Å the curve is clamped to its end values (documented
    approximation; the programme's lines all fall inside).
    """
    lam_um = np.clip(_as_angstrom(wavelength), 1000.0, 33000.0) / 1e4
    x = 1.0 / lam_um
    a = np.zeros_like(x)
    b = np.zeros_like(x)
    ir = x < 1.1
    a[ir] = 0.574 * x[ir] ** 1.61
    b[ir] = -0.527 * x[ir] ** 1.61
    opt = (x >= 1.1) & (x < 3.3)
    y = x[opt] - 1.82
    # O'Donnell (1994) optical polynomial
    a[opt] = (1 + 0.104 * y - 0.609 * y**2 + 0.701 * y**3 + 1.137 * y**4
              - 1.718 * y**5 - 0.827 * y**6 + 1.647 * y**7 - 0.505 * y**8)
    b[opt] = (1.952 * y + 2.908 * y**2 - 3.989 * y**3 - 7.985 * y**4
              + 11.102 * y**5 + 5.491 * y**6 - 10.805 * y**7 + 3.347 * y**8)
    uv = x >= 3.3
    xu = x[uv]
    fa = np.where(xu >= 5.9, -0.04473 * (xu - 5.9) ** 2 - 0.009779 * (xu - 5.9) ** 3, 0.0)
    fb = np.where(xu >= 5.9, 0.2130 * (xu - 5.9) ** 2 + 0.1207 * (xu - 5.9) ** 3, 0.0)
    a[uv] = 1.752 - 0.316 * xu - 0.104 / ((xu - 4.67) ** 2 + 0.341) + fa
    b[uv] = -3.090 + 1.825 * xu + 1.206 / ((xu - 4.62) ** 2 + 0.263) + fb
    return (a + b / r_v) * r_v


def redden(wavelength, ebv: float, r_v: float = 3.1) -> np.ndarray:
    """Multiplicative attenuation factor 10^(-0.4 k(λ) E(B-V))."""
    return 10.0 ** (-0.4 * ccm89_k(wavelength, r_v) * ebv)


def ebv_from_balmer(ha_hb, intrinsic: float = BALMER_HA_HB, r_v: float = 3.1):
    """E(B-V) from an observed Hα/Hβ ratio (negative values clipped to 0)."""
    k_hb, k_ha = ccm89_k(np.array([4862.68, 6564.61]), r_v)
    ebv = 2.5 / (k_hb - k_ha) * np.log10(np.asarray(ha_hb, dtype=float) / intrinsic)
    return np.clip(ebv, 0.0, None)
