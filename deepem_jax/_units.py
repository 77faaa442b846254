"""Unit checks at the public boundary: Quantities in, plain float arrays out."""

import astropy.units as u
import jax.numpy as jnp
import numpy as np

__all__ = ["INTENSITY_UNIT", "SCALED_EM", "to_value", "unmasked"]

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
    q, mask = unmasked(q)
    if not isinstance(q, u.Quantity):
        if not allow_plain:
            raise TypeError(f"{name} must be an astropy Quantity in {unit}, got {type(q).__name__}")
        values = q
    else:
        try:
            values = q.to_value(unit)
        except u.UnitConversionError as err:
            raise u.UnitConversionError(
                f"{name} has unit {q.unit!s}, not convertible to {unit!s}"
            ) from err
    out = np.asarray(_real(values, name), dtype=float)
    return out if mask is None else np.where(mask, np.nan, out)


def unmasked(a) -> tuple[object, np.ndarray | None]:
    """``a`` without its mask, and the mask (None if nothing is masked): numpy masked arrays
    and astropy ``Masked`` arrays and Quantities."""
    from astropy.utils.masked import Masked

    if isinstance(a, Masked):
        mask = np.asarray(a.mask, bool)
        return a.unmasked, mask if mask.any() else None
    if isinstance(a, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(a)
        return np.ma.getdata(a), mask if mask.any() else None
    return a, None


def _real(a, name: str) -> np.ndarray:
    """``a`` as an ndarray if it holds real numbers (floating point or integer); TypeError
    naming the argument otherwise (complex, boolean, strings, objects)."""
    arr = np.asarray(a)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def channel_list(wavelengths, name: str = "channels") -> list[int]:
    """AIA channel wavelengths (Quantity, Å) as a list of integer Ångström values."""
    return [round(float(w)) for w in np.atleast_1d(to_value(wavelengths, u.AA, name))]
