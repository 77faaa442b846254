"""Unit checks at the public boundary: Quantities in, plain float arrays out."""

import astropy.units as u
import numpy as np

__all__ = ["INTENSITY_UNIT", "SCALED_EM", "to_value"]

#: Exposure-normalised AIA intensity, DN s^-1 pix^-1.
INTENSITY_UNIT = u.DN / (u.s * u.pix)
#: EM unit (cm^-5) of the scaled arithmetic inside the consistency projection and the
#: refinement steps, keeping their float32 intermediates near 1.
SCALED_EM = 1e26


def to_value(q, unit: u.UnitBase, name: str, allow_plain: bool = False) -> np.ndarray:
    """``q`` in ``unit`` as a float ndarray.

    Raises ``TypeError`` if ``q`` is not a Quantity (unless ``allow_plain``, in which case a
    plain array is taken to be in ``unit`` already) and ``astropy.units.UnitConversionError``
    naming the argument if its unit does not convert.
    """
    if not isinstance(q, u.Quantity):
        if allow_plain:
            return np.asarray(q, dtype=float)
        raise TypeError(f"{name} must be an astropy Quantity in {unit}, got {type(q).__name__}")
    try:
        return np.asarray(q.to_value(unit), dtype=float)
    except u.UnitConversionError as err:
        raise u.UnitConversionError(
            f"{name} has unit {q.unit!s}, not convertible to {unit!s}"
        ) from err


def channel_list(wavelengths, name: str = "channels") -> list[int]:
    """AIA channel wavelengths (Quantity, Å) as a list of integer Ångström values."""
    return [round(float(w)) for w in np.atleast_1d(to_value(wavelengths, u.AA, name))]
