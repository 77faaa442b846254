"""The network weights shipped inside the package (see ``deepem_jax/weights/MODEL_CARD.md``).

Two networks of the original DeepEM width followed by learned Gauss-Newton steps
(``"deepem_gnt"``: six channels, and five without 94 Å for observations where 94 Å is missing),
trained by ``examples/train_pretrained.py`` on deepem_jax's own BP solutions of synthetic
observations and of observations synthesised from the BP solutions of one real date.
"""

from importlib import resources
from pathlib import Path

from ._units import channel_list
from .predictor import Predictor

__all__ = ["SHIPPED", "load_default_predictor", "weights_path"]

#: Shipped weight files by input channels (Å).
SHIPPED: dict[tuple[int, ...], str] = {
    (94, 131, 171, 193, 211, 335): "deepem_aia6.msgpack",
    (131, 171, 193, 211, 335): "deepem_aia5_no94.msgpack",
}


def weights_path(channels=None) -> Path:
    """Path of the shipped weights for ``channels`` (Quantity in Å, in any order; default all
    six). The network takes its channels in its own order (``Predictor.channels``)."""
    key = (
        (94, 131, 171, 193, 211, 335) if channels is None else tuple(sorted(channel_list(channels)))
    )
    if key not in SHIPPED:
        raise ValueError(
            f"no shipped network takes channels {list(key)} Å; shipped: "
            f"{[list(k) for k in SHIPPED]} (use Basis Pursuit, or train one with deepem-jax train)"
        )
    path = Path(str(resources.files("deepem_jax") / "weights" / SHIPPED[key]))
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped weights {path} are missing from this installation; reinstall deepem_jax "
            "or regenerate them with examples/train_pretrained.py"
        )
    return path


def load_default_predictor(channels=None) -> Predictor:
    """The shipped :class:`~deepem_jax.predictor.Predictor` for ``channels`` (default six; in
    any order, see :func:`weights_path`)."""
    from .checkpoint import load_predictor

    return load_predictor(weights_path(channels))
