"""A trained DeepEM network with its grid and channels: jit-compiled, tiled inference on
intensities of any shape (:class:`Predictor`)."""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np

from ._units import INTENSITY_UNIT, to_value
from .model import DeepEMNet, ModelConfig, get_config, network_em
from .refine import init_refine_params
from .response import AIA_CHANNELS, DEEPEM_LOGT, TemperatureResponse

__all__ = ["Predictor", "native_dtype"]

#: CPU flags (Linux ``/proc/cpuinfo``) of instructions that multiply bfloat16 natively.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@partial(jax.jit, static_argnames=("config", "dtype"))
def _predict_tile(params: Any, y: jax.Array, config: ModelConfig, dtype: Any) -> jax.Array:
    """EM (n, n_T) float32 of one tile of intensities (n, C); NaN rows where the input has a
    non-finite channel or the output is not finite."""
    valid = jnp.all(jnp.isfinite(y), axis=-1)
    em = network_em(params, jnp.where(valid[:, None], y, 0.0), config, dtype)
    valid &= jnp.all(jnp.isfinite(em), axis=-1)
    return jnp.where(valid[:, None], em, jnp.nan)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
    """A trained DeepEM network ready for inference (a pytree: ``params`` are its leaves).

    Attributes
    ----------
    params : dict
        Flax parameters of :class:`DeepEMNet` (``{"dense_0": {"kernel", "bias"}, ...}``),
        and ``"refine"`` (:func:`deepem_jax.refine.init_refine_params`) if the config refines.
    config : ModelConfig
        Architecture and transforms (static).
    logt : tuple of float
        log10(T / K) of the output bins (static).
    channels : tuple of int
        AIA channels of the input, in Å and in input order (static).
    dtype : str
        Dtype of the MLP's matrix-product operands (static): ``"bfloat16"`` (the products
        accumulate in float32, and the activations, the refinement steps and the consistency
        step run in float32) or ``"float32"`` throughout
        (``dataclasses.replace(predictor, dtype="float32")``). The default ``"auto"`` becomes
        :func:`native_dtype` of the default device when the predictor is made.
    """

    params: Any
    config: ModelConfig = dataclasses.field(metadata=dict(static=True))
    logt: tuple[float, ...] = dataclasses.field(metadata=dict(static=True))
    channels: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(default="auto", metadata=dict(static=True))

    def __post_init__(self) -> None:
        object.__setattr__(self, "logt", tuple(float(t) for t in self.logt))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if len(self.logt) != self.config.n_temperatures:
            raise ValueError(
                f"log T grid has {len(self.logt)} bins but the network outputs "
                f"{self.config.n_temperatures}"
            )
        if len(self.channels) != self.config.n_channels:
            raise ValueError(
                f"{len(self.channels)} channels given but the network takes "
                f"{self.config.n_channels}"
            )

    @property
    def module(self) -> DeepEMNet:
        """The Flax module, float32 throughout (:attr:`dtype` applies to :meth:`predict` and
        :func:`deepem_jax.invert`)."""
        return DeepEMNet(self.config)

    @property
    def logt_array(self) -> np.ndarray:
        """The output log T grid as a numpy array."""
        return np.asarray(self.logt, dtype=np.float64)

    @classmethod
    def init(
        cls,
        rng: jax.Array,
        config: ModelConfig | str = "deepem",
        logt: tuple[float, ...] | np.ndarray = tuple(DEEPEM_LOGT),
        channels: tuple[int, ...] = tuple(int(c) for c in AIA_CHANNELS.to_value(u.AA)),
    ) -> Predictor:
        """A freshly initialised (untrained) network with Flax's default initialisers (and
        :func:`deepem_jax.refine.init_refine_params` for its refinement steps)."""
        cfg = get_config(config) if isinstance(config, str) else config
        x = jnp.zeros((1, cfg.n_channels), jnp.float32)
        params = dict(DeepEMNet(cfg).init(rng, x)["params"])
        if cfg.refine_steps:
            params["refine"] = init_refine_params(cfg.refine_steps)
        return cls(params, cfg, tuple(logt), tuple(channels))

    def predict(
        self,
        intensities: np.ndarray | jax.Array | u.Quantity,
        *,
        sigma: np.ndarray | jax.Array | u.Quantity | None = None,
        response: TemperatureResponse | None = None,
        tolfac: float = 1.4,
        dtype: Any = None,
        tile_size: int = 4096,
        progress: bool = False,
    ) -> np.ndarray | u.Quantity:
        """EM (..., n_T) in cm^-5 per bin of intensities (..., n_channels) in DN s^-1 pix^-1.

        Any leading shape. Pixels run through one jit-compiled function in tiles of
        ``tile_size`` (the last padded; bounded memory, one compilation), the matrix products on
        ``dtype`` operands (float32, bfloat16 or ``"auto"``: :func:`native_dtype`; default
        :attr:`dtype`), returned as float32.
        A pixel with a non-finite channel or output gets NaN in every bin, never zero. A
        Quantity input gives a Quantity in cm^-5.

        With the 1-sigma errors ``sigma`` the EM is moved into BP's tolerance band (the
        consistency step) by :func:`deepem_jax.invert` (``method="net"``,
        ``degradation=False``: intensities already corrected); ``response`` is the undegraded
        response (default: embedded). :func:`deepem_jax.invert` also gives the per-pixel status.
        """
        is_quantity = isinstance(intensities, u.Quantity)
        y = np.asarray(
            to_value(intensities, INTENSITY_UNIT, "intensities", allow_plain=True),
            dtype=np.float32,
        )
        n_chan = self.config.n_channels
        if y.ndim < 1 or y.shape[-1] != n_chan:
            raise ValueError(
                f"intensities must have shape (..., {n_chan}) with channels {list(self.channels)} "
                f"Å last; got shape {y.shape}"
            )
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        dtype = self.dtype if dtype is None else _dtype_name(dtype)
        if sigma is not None:
            from .pipeline import invert

            em = invert(
                y,
                "net",
                sigma=sigma,
                channels=np.array(self.channels) * u.AA,
                response=response,
                predictor=dataclasses.replace(self, dtype=dtype),
                tolfac=tolfac,
                degradation=False,
                progress=progress,
            ).em
        else:
            if response is not None:
                raise ValueError("response is only used with sigma (the consistency step)")
            if self.config.refine_steps:
                raise ValueError(
                    "this network refines its EM against the data: pass sigma= (and response=)"
                )
            em = _tiled_em(self, y.reshape(-1, n_chan), jnp.dtype(dtype), tile_size, progress)
            em = em.reshape(*y.shape[:-1], self.config.n_temperatures)
        return em * u.cm**-5 if is_quantity else em


def native_dtype(device: Any = None) -> str:
    """The network's default matrix-product operand dtype on ``device`` (default: JAX's
    first device): ``"bfloat16"`` where the hardware multiplies bfloat16 natively (TPU; GPU of
    compute capability 8.0 or newer; CPU with AVX512-BF16 or AMX-BF16, read from Linux's
    ``/proc/cpuinfo``), else ``"float32"``: without native instructions bfloat16 operands are
    converted back and run slower than float32."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "tpu":
        return "bfloat16"
    if device.platform == "gpu":
        try:
            capability = float(getattr(device, "compute_capability", ""))
        except ValueError:
            capability = 0.0
        return "bfloat16" if capability >= 8.0 else "float32"
    return "bfloat16" if _cpu_flags() & _BF16_CPU_FLAGS else "float32"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _dtype_name(dtype: Any) -> str:
    """``"float32"`` or ``"bfloat16"`` of a dtype (name, numpy or JAX dtype; ``"auto"``:
    :func:`native_dtype`); ValueError for any other."""
    if isinstance(dtype, str) and dtype == "auto":
        return native_dtype()
    try:
        name = repr(dtype) if dtype is None else jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32, bfloat16 or 'auto', got {name}")
    return name


def _tiled_em(net: Predictor, flat: np.ndarray, dtype: Any, tile_size: int, progress: bool):
    """EM (N, n_T) of intensities (N, C) through :func:`_predict_tile` in fixed-size tiles."""
    from ._batching import bucket, map_rows

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=flat.shape[0], unit="px", desc="network")
    em = map_rows(
        lambda a: _predict_tile(net.params, a, net.config, dtype),
        [flat],
        bucket(flat.shape[0], tile_size, min_size=1),
        on_chunk=None if bar is None else bar.update,
    )
    if bar is not None:
        bar.close()
    return em
