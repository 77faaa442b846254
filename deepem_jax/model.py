"""The DeepEM per-pixel network (Wright et al. 2019) in Flax linen and its pure apply.

The original is a PyTorch stack of 1x1 convolutions,
``Conv2d(6->300) -> LeakyReLU(0.01) -> Conv2d(300->300) -> LeakyReLU -> Conv2d(300->18)``,
with no output activation. A 1x1 convolution is a dense layer on the channel axis, so here the
network is an MLP on the last axis of a channels-last array (pixels are the batch).

Transforms (the original's, and the defaults here):

* input:  ``x = sqrt(max(y, 0))``, ``y`` the intensity in DN s^-1 pix^-1
  (:func:`encode_intensities`);
* target: ``t = sqrt(EM / 1e25)`` with ``EM`` in cm^-5 per temperature bin (:func:`encode_em`);
* output: ``EM = 1e25 * out**2`` (:func:`decode_em`; ``"relu_square"`` clips ``out`` at 0 first).

:func:`network_em` is the pure apply; :class:`deepem_jax.predictor.Predictor` runs it on
images.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .refine import refine

__all__ = [
    "CONFIGS",
    "TARGET_BOUND",
    "DeepEMNet",
    "ModelConfig",
    "decode_em",
    "encode_em",
    "encode_intensities",
    "get_config",
    "network_em",
    "split_params",
]

_ACTIVATIONS: dict[str, Callable[..., jax.Array]] = {
    "leaky_relu": nn.leaky_relu,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}
_OUTPUTS = ("square", "relu_square")
#: Largest distance, in sigma, of a band target from the data (inside BP's default band, 1.4).
TARGET_BOUND = 1.2


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
    refine_steps : int
        Learned Gauss-Newton steps against the data after the MLP (:mod:`deepem_jax.refine`;
        the original: 0). A refined network needs the intensities' errors and the response.
    band_target : bool
        With refinement, the MLP also outputs ``n_channels`` values ``o``, and the steps aim at
        the intensities ``y + TARGET_BOUND * tanh(o) * sigma`` (inside BP's default band)
        instead of ``y``.
    """

    hidden: tuple[int, ...] = (300, 300)
    n_channels: int = 6
    n_temperatures: int = 18
    activation: str = "leaky_relu"
    negative_slope: float = 0.01
    output: str = "square"
    em_scale: float = 1e25
    refine_steps: int = 0
    band_target: bool = False

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
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {self.refine_steps}")
        if self.band_target and not self.refine_steps:
            raise ValueError("band_target needs refine_steps > 0")
        if not (math.isfinite(self.em_scale) and self.em_scale > 0):
            raise ValueError(f"em_scale must be finite and positive, got {self.em_scale}")

    @property
    def n_params(self) -> int:
        """Number of trainable parameters."""
        widths = (self.n_channels, *self.hidden, self.n_outputs)
        return sum(a * b + b for a, b in itertools.pairwise(widths)) + 2 * self.refine_steps

    @property
    def n_outputs(self) -> int:
        """Width of the MLP's last layer: the bins, and the band targets if any."""
        return self.n_temperatures + (self.n_channels if self.band_target else 0)

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


#: Named configurations: the original network, a small one for quick experiments, and both
#: followed by learned Gauss-Newton steps (:mod:`deepem_jax.refine`); ``mid_gnt`` is a
#: half-width MLP with the steps (a quarter of the original's multiply-adds).
CONFIGS: dict[str, ModelConfig] = {
    "deepem": ModelConfig(),
    "small": ModelConfig(hidden=(64, 64)),
    "deepem_gn": ModelConfig(refine_steps=5),
    "small_gn": ModelConfig(hidden=(64, 64), refine_steps=5),
    "deepem_gnt": ModelConfig(refine_steps=5, band_target=True),
    "small_gnt": ModelConfig(hidden=(64, 64), refine_steps=5, band_target=True),
    "mid_gnt": ModelConfig(hidden=(150, 150), refine_steps=5, band_target=True),
}


def get_config(name: str) -> ModelConfig:
    """The named :class:`ModelConfig` (a key of :data:`CONFIGS`)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose from {sorted(CONFIGS)}") from None


class DeepEMNet(nn.Module):
    """Per-pixel MLP (= stack of 1x1 convolutions): (..., n_channels) -> (..., n_outputs).

    Takes *encoded* intensities (:func:`encode_intensities`) and returns the raw output in the
    sqrt-scaled EM space (:func:`decode_em` turns it into cm^-5), float32. Parameters are
    float32; ``dtype`` is the dtype of each layer's matrix-product operands (its input and
    kernel): ``jnp.float32``, or ``jnp.bfloat16`` for mixed precision, the products
    accumulated, the bias added and the activations computed in float32 either way. Layers are
    named ``dense_0 .. dense_{n_hidden}`` with a ``kernel`` of shape (in, out) and a ``bias``.
    """

    config: ModelConfig = CONFIGS["deepem"]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = _ACTIVATIONS[cfg.activation]
        if cfg.activation == "leaky_relu":
            act = partial(nn.leaky_relu, negative_slope=cfg.negative_slope)
        for i, width in enumerate((*cfg.hidden, cfg.n_outputs)):
            if i > 0:
                x = act(x)
            x = nn.Dense(
                width,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                promote_dtype=_operands_only,
                dot_general=_float32_products,
                name=f"dense_{i}",
            )(x)
        return x


def _operands_only(inputs, kernel, bias, *, dtype):
    """A layer's input and kernel cast to ``dtype``; its bias kept (float32)."""
    return inputs.astype(dtype), kernel.astype(dtype), bias


#: Matrix products accumulated (and returned) in float32 whatever their operands' dtype.
_float32_products = partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


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


def split_params(params: Any) -> tuple[Any, Any]:
    """(MLP params of :class:`DeepEMNet`, refinement params or None) of a network's params."""
    mlp = {k: v for k, v in params.items() if k != "refine"}
    return mlp, params.get("refine")


def network_em(
    params: Any,
    y: jax.Array,
    config: ModelConfig,
    dtype: Any = jnp.float32,
    *,
    sigma: jax.Array | None = None,
    K: jax.Array | None = None,
) -> jax.Array:
    """EM (N, n_T) in cm^-5 per bin (float32) of finite intensities (N, C) in
    DN s^-1 pix^-1: the network's pure apply with its input and output transforms, then its
    refinement steps (if any), which need ``sigma`` (N, C) DN s^-1 pix^-1 (> 0) and the
    response ``K`` (C, n_T) DN cm^5 s^-1 pix^-1 the network was trained with. ``dtype`` is the
    dtype of the MLP's matrix-product operands (:class:`DeepEMNet`); the rest runs in
    float32."""
    mlp, refine_params = split_params(params)
    out = DeepEMNet(config, dtype=dtype).apply({"params": mlp}, encode_intensities(y))
    em = decode_em(out[..., : config.n_temperatures], config)
    if config.refine_steps == 0:
        return em
    if sigma is None or K is None:
        raise ValueError("this network refines its EM against the data: give sigma and K")
    offset = None
    if config.band_target:
        offset = TARGET_BOUND * jnp.tanh(out[..., config.n_temperatures :])
    return refine(refine_params, em, y, sigma, K, offset)
