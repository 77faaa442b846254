"""The DeepEM per-pixel network (Wright et al. 2019) in Flax linen, and its inference wrapper.

The original is a PyTorch stack of 1x1 convolutions,
``Conv2d(6->300) -> LeakyReLU(0.01) -> Conv2d(300->300) -> LeakyReLU -> Conv2d(300->18)``,
with no output activation. A 1x1 convolution is a dense layer on the channel axis, so here the
network is an MLP on the last axis of a channels-last array (pixels are the batch).

Transforms (the original's, and the defaults here):

* input:  ``x = sqrt(max(y, 0))``, ``y`` the intensity in DN s^-1 pix^-1
  (:func:`encode_intensities`);
* target: ``t = sqrt(EM / 1e25)`` with ``EM`` in cm^-5 per temperature bin (:func:`encode_em`);
* output: ``EM = 1e25 * out**2`` (:func:`decode_em`; ``"relu_square"`` clips ``out`` at 0 first).

:class:`Predictor` bundles the module, its parameters, the log T grid and the channel order,
and runs jit-compiled, tiled inference on images of any size. :func:`load_pytorch_deepem`
imports the original ``.pth`` weights without executing pickle code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import astropy.units as u
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._units import INTENSITY_UNIT, to_value
from .response import AIA_CHANNELS, DEEPEM_LOGT, TemperatureResponse

__all__ = [
    "CONFIGS",
    "DeepEMNet",
    "ModelConfig",
    "Predictor",
    "decode_em",
    "encode_em",
    "encode_intensities",
    "get_config",
]

_ACTIVATIONS: dict[str, Callable[..., jax.Array]] = {
    "leaky_relu": nn.leaky_relu,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}
_OUTPUTS = ("square", "relu_square")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and transforms of the per-pixel network.

    Attributes
    ----------
    hidden : tuple of int
        Widths of the hidden layers (the original: ``(300, 300)``).
    n_channels : int
        Input channels (AIA passbands).
    n_temperatures : int
        Output temperature bins.
    activation : str
        Hidden activation: one of ``leaky_relu`` (the original), ``relu``, ``gelu``, ``silu``,
        ``tanh``.
    negative_slope : float
        Slope of ``leaky_relu`` for negative inputs (the original: 0.01).
    output : str
        ``"square"`` (the original: ``EM = em_scale * out**2``) or ``"relu_square"``
        (``EM = em_scale * max(out, 0)**2``, so negative outputs mean zero EM, not positive EM).
    em_scale : float
        EM unit of the network in cm^-5 (the original: 1e25).
    """

    hidden: tuple[int, ...] = (300, 300)
    n_channels: int = 6
    n_temperatures: int = 18
    activation: str = "leaky_relu"
    negative_slope: float = 0.01
    output: str = "square"
    em_scale: float = 1e25

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden) or self.n_channels < 1 or self.n_temperatures < 1:
            raise ValueError(f"layer widths must be positive: {self}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose from {sorted(_ACTIVATIONS)}"
            )
        if self.output not in _OUTPUTS:
            raise ValueError(f"unknown output transform {self.output!r}; choose from {_OUTPUTS}")
        if not (math.isfinite(self.em_scale) and self.em_scale > 0):
            raise ValueError(f"em_scale must be finite and positive, got {self.em_scale}")

    @property
    def n_params(self) -> int:
        """Number of trainable parameters."""
        widths = (self.n_channels, *self.hidden, self.n_temperatures)
        return sum(a * b + b for a, b in itertools.pairwise(widths))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (lists, numbers, strings) for serialisation."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


#: Named configurations: the original network and a small one for quick experiments.
CONFIGS: dict[str, ModelConfig] = {
    "deepem": ModelConfig(),
    "small": ModelConfig(hidden=(64, 64)),
}


def get_config(name: str) -> ModelConfig:
    """The named :class:`ModelConfig` (``"deepem"`` or ``"small"``)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose from {sorted(CONFIGS)}") from None


class DeepEMNet(nn.Module):
    """Per-pixel MLP (= stack of 1x1 convolutions): (..., n_channels) -> (..., n_temperatures).

    Takes *encoded* intensities (:func:`encode_intensities`) and returns the raw output in the
    sqrt-scaled EM space (:func:`decode_em` turns it into cm^-5). Parameters are float32;
    ``dtype`` is the computation dtype (e.g. ``jnp.bfloat16``). Layers are named
    ``dense_0 .. dense_{n_hidden}`` with a ``kernel`` of shape (in, out) and a ``bias``.
    """

    config: ModelConfig = CONFIGS["deepem"]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = _ACTIVATIONS[cfg.activation]
        if cfg.activation == "leaky_relu":
            act = partial(nn.leaky_relu, negative_slope=cfg.negative_slope)
        for i, width in enumerate((*cfg.hidden, cfg.n_temperatures)):
            if i > 0:
                x = act(x)
            x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=f"dense_{i}")(x)
        return x


def encode_intensities(y: jax.Array) -> jax.Array:
    """Network input ``sqrt(max(y, 0))`` of intensities ``y`` in DN s^-1 pix^-1."""
    return jnp.sqrt(jnp.maximum(y, 0.0))


def encode_em(em: jax.Array, config: ModelConfig = CONFIGS["deepem"]) -> jax.Array:
    """Training target ``sqrt(EM / em_scale)`` of EM in cm^-5 per bin (negative EM -> 0)."""
    return jnp.sqrt(jnp.maximum(em, 0.0) / config.em_scale)


def decode_em(out: jax.Array, config: ModelConfig = CONFIGS["deepem"]) -> jax.Array:
    """EM in cm^-5 per bin from raw network output: ``em_scale * out**2`` (``"square"``) or
    ``em_scale * max(out, 0)**2`` (``"relu_square"``)."""
    if config.output == "relu_square":
        out = jnp.maximum(out, 0.0)
    return config.em_scale * jnp.square(out)


def network_em(
    params: Any, y: jax.Array, config: ModelConfig, dtype: Any = jnp.float32
) -> jax.Array:
    """EM (..., n_T) in cm^-5 per bin (float32) of finite intensities (..., C) in
    DN s^-1 pix^-1: the network's pure apply with its input and output transforms."""
    x = encode_intensities(y).astype(dtype)
    out = DeepEMNet(config, dtype=dtype).apply({"params": params}, x).astype(jnp.float32)
    return decode_em(out, config)


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
        Flax parameters of :class:`DeepEMNet` (``{"dense_0": {"kernel", "bias"}, ...}``).
    config : ModelConfig
        Architecture and transforms (static).
    logt : tuple of float
        log10(T / K) of the output bins (static).
    channels : tuple of int
        AIA channels of the input, in Å and in input order (static).
    """

    params: Any
    config: ModelConfig = dataclasses.field(metadata=dict(static=True))
    logt: tuple[float, ...] = dataclasses.field(metadata=dict(static=True))
    channels: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self) -> None:
        object.__setattr__(self, "logt", tuple(float(t) for t in self.logt))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
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
        """The Flax module (float32 computation)."""
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
        """A freshly initialised (untrained) network with Flax's default initialisers."""
        cfg = get_config(config) if isinstance(config, str) else config
        x = jnp.zeros((1, cfg.n_channels), jnp.float32)
        params = DeepEMNet(cfg).init(rng, x)["params"]
        return cls(params, cfg, tuple(logt), tuple(channels))

    def predict(
        self,
        intensities: np.ndarray | jax.Array | u.Quantity,
        *,
        sigma: np.ndarray | jax.Array | u.Quantity | None = None,
        response: TemperatureResponse | None = None,
        tolfac: float = 1.4,
        dtype: Any = jnp.float32,
        tile_size: int = 65536,
        progress: bool = False,
    ) -> np.ndarray | u.Quantity:
        """EM (..., n_T) in cm^-5 per bin of intensities (..., n_channels) in DN s^-1 pix^-1.

        Works on any leading shape: ``(N, C)`` pixel lists, ``(H, W, C)`` images, ``(B, H, W, C)``
        batches. Pixels run through a jit-compiled function in tiles of ``tile_size`` pixels
        (the last tile padded), so device memory stays bounded for 4096^2 images and one
        compilation serves every image; inputs smaller than a tile use the next power of two.
        ``dtype`` is the computation dtype (``jnp.float32`` or ``jnp.bfloat16``); the result is
        float32. A pixel with a non-finite channel, or whose output is not finite, gets NaN in
        every bin, never zero.

        With the 1-sigma errors ``sigma`` (same shape and unit) the network's EM is moved into
        Basis Pursuit's tolerance band (the consistency step of the shipped model), through
        :func:`deepem_jax.invert` with ``method="net"`` and ``degradation=False`` (the
        intensities must already be corrected for degradation); ``response`` is the undegraded
        response (default: the embedded one). Use :func:`deepem_jax.invert` itself for the
        per-pixel status (which pixels stayed outside the band).

        A Quantity input gives a Quantity in cm^-5; a plain array gives a numpy array.
        ``progress=True`` shows a tqdm bar over pixels.
        """
        from ._batching import bucket, map_rows

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
        if sigma is not None:
            from .pipeline import invert

            em = invert(
                y,
                "net",
                sigma=sigma,
                channels=np.array(self.channels) * u.AA,
                response=response,
                predictor=self,
                tolfac=tolfac,
                degradation=False,
                progress=progress,
            ).em
        else:
            if response is not None:
                raise ValueError("response is only used with sigma (the consistency step)")
            flat = y.reshape(-1, n_chan)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=flat.shape[0], unit="px", desc="network")
            em = map_rows(
                lambda a: _predict_tile(self.params, a, self.config, jnp.dtype(dtype)),
                [flat],
                bucket(flat.shape[0], tile_size, min_size=1),
                on_chunk=None if bar is None else bar.update,
            )
            if bar is not None:
                bar.close()
            em = em.reshape(*y.shape[:-1], self.config.n_temperatures)
        return em * u.cm**-5 if is_quantity else em
