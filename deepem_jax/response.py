"""AIA temperature responses: the one place that owns the response matrix K.

``K[c, t]`` is the response of channel ``c`` to plasma at temperature ``logt[t]`` in
DN cm^5 s^-1 pix^-1, so that ``y = K @ EM`` with ``y`` in DN s^-1 pix^-1 and ``EM`` the column
emission measure *per temperature bin* in cm^-5 (``K`` is **not** multiplied by the bin width;
this is the DeepEM / ``aia_sparse_em_solve`` convention).

Loaders read the real tables a user has offline:

* :meth:`TemperatureResponse.from_genx` -- SolarSoft ``aia_get_response(/temp)`` saved as GENX;
* :meth:`TemperatureResponse.from_csv` -- a ``logte,A94,...`` CSV table;
* :meth:`TemperatureResponse.from_deepem_npy` -- DeepEM's 6x18 ``AIA_Resp.npy``
  (log T 5.5--7.2, step 0.1);
* :meth:`TemperatureResponse.from_idl_save` -- an IDL save file with ``channels``, ``logt`` and
  ``tr``;
* :func:`default_response` -- the offline default: demregpy's MIT-licensed
  ``aia_tresp_en.dat``, shipped in ``deepem_jax/tables/`` (see the README there).

:meth:`TemperatureResponse.degrade` scales each row by the channel's degradation factor at the
observation time (:func:`deepem_jax.calibration.degradation`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Sequence
from importlib import resources

import astropy.units as u
import jax
import numpy as np
from astropy.time import Time

from ._units import channel_list, to_value
from .calibration import degradation

__all__ = [
    "AIA_CHANNELS",
    "DEEPEM_LOGT",
    "RESPONSE_UNIT",
    "TemperatureResponse",
    "default_response",
]

#: The six coronal AIA channels in the canonical order used everywhere in deepem_jax.
AIA_CHANNELS: u.Quantity = np.array([94, 131, 171, 193, 211, 335]) * u.AA
#: Response unit, DN cm^5 s^-1 pix^-1.
RESPONSE_UNIT = u.DN * u.cm**5 / (u.s * u.pix)
#: DeepEM's temperature grid: log10(T/K) = 5.5, 5.6, ..., 7.2 (18 bins).
DEEPEM_LOGT: np.ndarray = np.round(np.arange(5.5, 7.2001, 0.1), 2)

_CHANNEL_NAME = re.compile(r"^A0*(\d+)(?:_THIN|_THICK)?$", re.IGNORECASE)


def _channel_from_name(name: str) -> int:
    m = _CHANNEL_NAME.match(name.strip())
    if m is None:
        raise ValueError(f"cannot parse an AIA channel from the column/tag name {name!r}")
    return int(m.group(1))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class TemperatureResponse:
    """Temperature response of a set of AIA channels on a log T grid.

    Attributes
    ----------
    K : array, shape (n_channels, n_T)
        Response in DN cm^5 s^-1 pix^-1 (a pytree leaf: differentiable, may be a JAX array).
    channels : tuple of int
        Channel wavelengths in Angstrom (static); :attr:`wavelength` gives them as a Quantity.
    logt : tuple of float
        log10(T / K) of each column (static, strictly increasing).
    name : str
        Where the table came from; recorded in checkpoints and FITS headers.
    """

    K: np.ndarray
    channels: tuple[int, ...]
    logt: tuple[float, ...]
    name: str = "unnamed"

    def __post_init__(self) -> None:
        K = self.K
        if not isinstance(K, jax.core.Tracer):
            K_np = np.asarray(K)
            if K_np.ndim != 2 or K_np.shape != (len(self.channels), len(self.logt)):
                raise ValueError(
                    f"response matrix has shape {K_np.shape}; expected "
                    f"(n_channels={len(self.channels)}, n_T={len(self.logt)})"
                )
            if K_np.dtype != object and not np.all(np.isfinite(K_np)):
                raise ValueError(f"response table {self.name!r} contains NaN or Inf values")
            if K_np.dtype != object and np.any(K_np < 0):
                raise ValueError(f"response table {self.name!r} contains negative values")
        logt = np.asarray(self.logt, dtype=float)
        if logt.ndim != 1 or logt.size < 2:
            raise ValueError("log T grid must be 1-D with at least two points")
        if not np.all(np.isfinite(logt)):
            raise ValueError(f"log T grid of {self.name!r} contains NaN or Inf")
        if not np.all(np.diff(logt) > 0):
            raise ValueError(f"log T grid of {self.name!r} is not strictly increasing")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"duplicate channels in response: {self.channels}")

    # -- pytree ---------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.K,), (self.channels, self.logt, self.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "K", children[0])
        object.__setattr__(obj, "channels", aux[0])
        object.__setattr__(obj, "logt", aux[1])
        object.__setattr__(obj, "name", aux[2])
        return obj

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        K: u.Quantity,
        channels: u.Quantity,
        logt: Sequence[float] | np.ndarray,
        name: str = "arrays",
    ) -> TemperatureResponse:
        """Build a response from a Quantity ``K`` (DN cm^5 s^-1 pix^-1) and channel wavelengths."""
        k = to_value(K, RESPONSE_UNIT, "response K")
        chans = tuple(channel_list(channels))
        return cls(np.asarray(k, dtype=np.float64), chans, tuple(float(t) for t in logt), name)

    @classmethod
    def from_genx(cls, path: str | os.PathLike) -> TemperatureResponse:
        """Read an SSW ``aia_get_response(/temp)`` GENX file (e.g. ``aia_temperature_resp.genx``).

        Only the six coronal channels are kept (304 is dropped), in canonical order.
        """
        from sunpy.io.special import read_genx

        try:
            g = read_genx(str(path))
        except Exception as err:  # sunpy raises assorted errors on bad XDR
            raise ValueError(f"cannot read GENX response file {path}: {err}") from err
        logt = None
        rows = {}
        for key, val in g.items():
            if key == "HEADER" or not hasattr(val, "keys"):
                continue
            if "TRESP" not in val or "LOGTE" not in val:
                continue
            unit = str(val.get("UNITS", "")).strip()
            if unit and u.Unit(unit.replace("^", "")) != RESPONSE_UNIT:
                raise ValueError(f"GENX tag {key} has units {unit!r}, expected {RESPONSE_UNIT}")
            lt = np.asarray(val["LOGTE"], dtype=np.float64)
            if logt is None:
                logt = lt
            elif lt.shape != logt.shape or not np.allclose(lt, logt):
                raise ValueError(f"GENX tags use different log T grids ({key})")
            rows[_channel_from_name(key)] = np.asarray(val["TRESP"], dtype=np.float64)
        if logt is None:
            raise ValueError(f"{path} holds no TRESP/LOGTE structures: not an AIA response GENX")
        return cls._from_rows(rows, np.round(logt, 4), f"genx:{os.path.basename(path)}")

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> TemperatureResponse:
        """Read a CSV with header ``logte,A94,A131,...`` (values in DN cm^5 s^-1 pix^-1)."""
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise ValueError(f"response CSV {path} is empty") from None
            try:
                data = np.array([[float(v) for v in row] for row in reader if row])
            except ValueError as err:
                raise ValueError(f"response CSV {path} has a non-numeric entry: {err}") from err
        if not header or header[0].strip().lower() not in ("logte", "logt"):
            raise ValueError(f"response CSV {path}: first column must be 'logte', got {header[:1]}")
        if data.ndim != 2 or data.shape[1] != len(header):
            raise ValueError(f"response CSV {path}: rows do not match the header {header}")
        rows = {_channel_from_name(h): data[:, i] for i, h in enumerate(header) if i > 0}
        return cls._from_rows(rows, np.round(data[:, 0], 4), f"csv:{os.path.basename(path)}")

    @classmethod
    def from_deepem_npy(cls, path: str | os.PathLike) -> TemperatureResponse:
        """Read DeepEM's ``AIA_Resp.npy``: a (6, 18[, 1, 1]) matrix, channels 94..335 Å,
        log T 5.5--7.2 (step 0.1), in DN cm^5 s^-1 pix^-1."""
        arr = np.load(path, allow_pickle=False)
        arr = arr.reshape(arr.shape[0], arr.shape[1]) if arr.ndim == 4 else arr
        if arr.shape != (6, DEEPEM_LOGT.size):
            raise ValueError(f"{path}: expected a 6x18 DeepEM response, got shape {arr.shape}")
        chans = tuple(int(c) for c in AIA_CHANNELS.to_value(u.AA))
        return cls(
            arr.astype(np.float64), chans, tuple(DEEPEM_LOGT), f"deepem:{os.path.basename(path)}"
        )

    @classmethod
    def from_idl_save(cls, path: str | os.PathLike) -> TemperatureResponse:
        """Read an IDL save file with ``channels``, ``logt`` and ``tr`` (n_channels x n_T), as
        in demregpy's ``aia_tresp_en.dat`` (the table :func:`default_response` reads)."""
        from scipy.io import readsav

        try:
            s = readsav(str(path))
        except Exception as err:
            raise ValueError(f"cannot read IDL save response file {path}: {err}") from err
        for key in ("channels", "logt", "tr"):
            if key not in s:
                raise ValueError(f"{path}: IDL save file has no {key!r} variable")
        units = s.get("units", b"DN cm^5 s^-1 pix^-1")
        units = units.decode() if isinstance(units, bytes) else str(units)
        if u.Unit(units.replace("^", "")) != RESPONSE_UNIT:
            raise ValueError(f"{path}: response units {units!r}, expected {RESPONSE_UNIT}")
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in s["channels"]]
        tr = np.asarray(s["tr"], dtype=np.float64)
        rows = {_channel_from_name(n): tr[i] for i, n in enumerate(names)}
        logt = np.round(np.asarray(s["logt"], dtype=np.float64), 4)
        return cls._from_rows(rows, logt, f"idlsave:{os.path.basename(path)}")

    @classmethod
    def _from_rows(cls, rows: dict[int, np.ndarray], logt: np.ndarray, name: str):
        order = [int(c) for c in AIA_CHANNELS.to_value(u.AA).astype(int) if c in rows]
        if not order:
            raise ValueError(f"{name}: no coronal AIA channel (94..335 Å) found")
        K = np.stack([rows[c] for c in order])
        return cls(K, tuple(order), tuple(float(t) for t in logt), name)

    # -- views ----------------------------------------------------------------------------
    @property
    def wavelength(self) -> u.Quantity:
        """Channel wavelengths (Quantity, Å)."""
        return np.array(self.channels) * u.AA

    @property
    def logt_array(self) -> np.ndarray:
        """The log T grid as a numpy array."""
        return np.asarray(self.logt, dtype=np.float64)

    @property
    def quantity(self) -> u.Quantity:
        """``K`` as a Quantity in DN cm^5 s^-1 pix^-1."""
        return np.asarray(self.K) * RESPONSE_UNIT

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_temperatures(self) -> int:
        return len(self.logt)

    def __repr__(self) -> str:
        lt = self.logt_array
        return (
            f"TemperatureResponse(name={self.name!r}, channels={list(self.channels)} Å, "
            f"logT {lt[0]:.2f}..{lt[-1]:.2f} ({lt.size} bins))"
        )

    # -- transformations ------------------------------------------------------------------
    def select(self, wavelengths: u.Quantity) -> TemperatureResponse:
        """Rows for ``wavelengths`` in the given order (select and/or reorder channels)."""
        wanted = channel_list(wavelengths, "wavelengths")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"duplicate channels requested: {wanted}")
        missing = [w for w in wanted if w not in self.channels]
        if missing:
            raise ValueError(
                f"channels {missing} Å not in response {self.name!r} (has {list(self.channels)})"
            )
        idx = [self.channels.index(w) for w in wanted]
        return TemperatureResponse(np.asarray(self.K)[idx], tuple(wanted), self.logt, self.name)

    def regrid(self, logt: Sequence[float] | np.ndarray) -> TemperatureResponse:
        """Interpolate onto a new log T grid, linearly in log10 K as SolarSoft does.

        Points outside the tabulated range get zero response; so do points interpolated
        next to a tabulated zero.
        """
        new = np.asarray(logt, dtype=np.float64)
        if new.ndim != 1 or not np.all(np.isfinite(new)) or not np.all(np.diff(new) > 0):
            raise ValueError("target log T grid must be finite, 1-D and strictly increasing")
        old = self.logt_array
        K = np.asarray(self.K, dtype=np.float64)
        with np.errstate(divide="ignore"):
            logk = np.where(K > 0, np.log10(np.where(K > 0, K, 1.0)), -np.inf)
        out = np.zeros((K.shape[0], new.size))
        inside = (new >= old[0] - 1e-9) & (new <= old[-1] + 1e-9)
        for c in range(K.shape[0]):
            finite = np.isfinite(logk[c])
            lk = np.interp(new[inside], old, np.where(finite, logk[c], 0.0))
            # zero wherever a bracketing table point is zero (the indicator interpolates > 0)
            touches_zero = np.interp(new[inside], old, (~finite).astype(float)) > 0
            out[c, inside] = np.where(touches_zero, 0.0, 10.0**lk)
        return TemperatureResponse(out, self.channels, tuple(float(t) for t in new), self.name)

    def degrade(
        self,
        obstime: Time | str | Sequence[str],
        correction_table: str | os.PathLike | None = None,
    ) -> TemperatureResponse:
        """Each channel's row times its degradation factor at ``obstime``.

        ``obstime`` is anything `astropy.time.Time` accepts (UTC), one time or one per channel;
        ``correction_table`` is a correction table file, ``None`` for the shipped V10 table (see
        :func:`deepem_jax.calibration.degradation`; no network access). The name records the
        calibration version and time, e.g. ``"<name>+degraded(V10 @ 2024-10-04T16:18)"``.
        """
        d = degradation(self.wavelength, obstime, correction_table)
        K = np.asarray(self.K) * d.factors[:, None]
        return TemperatureResponse(K, self.channels, self.logt, f"{self.name}+degraded({d.label})")


def default_response() -> TemperatureResponse:
    """The embedded default: demregpy's MIT-licensed ``aia_tresp_en.dat`` as shipped in
    ``deepem_jax/tables/`` (channels 94--335 Å, log T 4--9 in steps of 0.05, DN cm^5 s^-1
    pix^-1); read offline without importing demregpy."""
    table = resources.files("deepem_jax") / "tables" / "aia_tresp_en.dat"
    with resources.as_file(table) as path:
        return TemperatureResponse.from_idl_save(path)
