"""Training the DeepEM network on Basis Pursuit targets computed by deepem_jax itself.

Shape of the pipeline (after the flax examples)::

    data = build_dataset(observations, response)          # image -> BP (deepem_jax.bp) -> pixels
    train, val = data.split(0.1, seed=0)                  # or separate observations
    predictor, history = train_and_evaluate(TrainConfig(), train, val, response, workdir)

Targets are the BP EM on the same response and grid the network is trained for; pixels whose
BP status is not ``SOLVED`` are masked out of the loss (the original trained on them too).
The loss is the original's MSE on ``sqrt(EM / 1e25)`` plus, optionally, ``physics_weight``
times a physics term on the resynthesised intensities ``forward(K, EM_pred)``: ``"chi2"``, the
mean chi^2 against the data with the AIA uncertainty, or ``"band"``, the mean squared distance
(in sigma) by which they leave BP's tolerance band (zero inside it). Every epoch ends with a
validation pass, a progress line (MSE, validation MSE and total loss, pixels/s) and an atomic
checkpoint; early stopping watches the total validation loss; training resumes from the latest
checkpoint in ``workdir`` and, because each epoch's shuffling is derived from ``(seed, epoch)``,
reaches the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .forward import forward
from .model import (
    DeepEMNet,
    ModelConfig,
    Predictor,
    decode_em,
    encode_em,
    encode_intensities,
    get_config,
)
from .response import TemperatureResponse
from .uncertainty import sigma_values

__all__ = [
    "Dataset",
    "TrainConfig",
    "band_excess",
    "build_dataset",
    "observations_from_dirs",
    "synthetic_observations",
    "train_and_evaluate",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. Defaults follow the original (Adam, lr 1e-4, weight decay 1e-9,
    MSE on sqrt-scaled EM) except ``epochs``/``patience``, which are set for pixel batches.

    ``batch_size=None`` takes whole observations per step (the original: one 512^2 image per
    step); an integer draws random pixel mini-batches of that size.
    ``schedule`` is ``"constant"`` or ``"cosine"`` (cosine decay over all steps).
    ``physics`` is ``"chi2"`` or ``"band"`` (see the module docstring), used when
    ``physics_weight > 0``.
    """

    model: str = "deepem"
    epochs: int = 50
    batch_size: int | None = 4096
    learning_rate: float = 1e-4
    weight_decay: float = 1e-9
    schedule: str = "constant"
    patience: int | None = 10
    physics_weight: float = 0.0
    physics: str = "chi2"
    seed: int = 0

    def __post_init__(self) -> None:
        get_config(self.model)
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be positive or None (whole observations)")
        if self.physics not in ("chi2", "band"):
            raise ValueError(f"physics must be 'chi2' or 'band', got {self.physics!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not (self.learning_rate > 0 and self.weight_decay >= 0 and self.physics_weight >= 0):
            raise ValueError("learning_rate must be > 0; weight_decay, physics_weight >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Training pixels: ``intensity`` (N, C) DN s^-1 pix^-1, ``sigma`` (N, C) DN s^-1 pix^-1,
    BP target ``em`` (N, n_T) cm^-5 per bin, BP ``status`` (N,), ``group`` (N,) the index of
    the observation each pixel came from (for whole-image steps), and ``tolfac`` (N,) the BP
    tolerance factor each pixel was solved with (NaN if unknown)."""

    intensity: np.ndarray
    sigma: np.ndarray
    em: np.ndarray
    status: np.ndarray
    group: np.ndarray
    tolfac: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.intensity.shape[0]
        if self.tolfac is None:
            object.__setattr__(self, "tolfac", np.full(n, np.nan))
        for name in ("sigma", "em", "status", "group", "tolfac"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"dataset field {name} has {getattr(self, name).shape[0]} rows, "
                    f"intensity has {n}"
                )
        if self.sigma.shape != self.intensity.shape:
            raise ValueError("sigma must have the shape of intensity")

    def __len__(self) -> int:
        return self.intensity.shape[0]

    @property
    def solved(self) -> np.ndarray:
        """Boolean mask of pixels BP solved (the ones the loss uses)."""
        return self.status == 0

    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """BP's tolerance band (lower, upper), (N, C) in DN s^-1 pix^-1, with each pixel's own
        tolerance factor (1.4 where unknown)."""
        from .bp import bounds

        tf = np.where(np.isfinite(self.tolfac), self.tolfac, 1.4)[:, None]
        lo, hi = bounds(self.intensity, self.sigma, tf)
        return np.asarray(lo), np.asarray(hi)

    def take(self, idx: np.ndarray) -> Dataset:
        return Dataset(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Random pixel split into (rest, held-out ``fraction``)."""
        if not 0 < fraction < 1:
            raise ValueError("fraction must be in (0, 1)")
        perm = np.random.default_rng(seed).permutation(len(self))
        k = int(round(fraction * len(self)))
        return self.take(np.sort(perm[k:])), self.take(np.sort(perm[:k]))


def build_dataset(
    observations: Sequence[tuple[np.ndarray, np.ndarray]],
    response: TemperatureResponse,
    *,
    progress: bool = False,
    **bp_options: Any,
) -> Dataset:
    """Run deepem_jax's Basis Pursuit on each observation and collect the pixels.

    ``observations`` is a sequence of ``(intensity, sigma)`` pairs, each (..., C) in
    DN s^-1 pix^-1; ``response`` must be on the network's log T grid (the BP basis is built on
    it). ``bp_options`` go to :func:`deepem_jax.bp.solve` (``tolfac``, ``widths`` via a basis,
    ...). Every pixel is kept with its BP status; the loss masks the unsolved ones.
    """
    from . import bp
    from .basis import cheung_basis

    basis = bp_options.pop("basis", None) or cheung_basis(response.logt)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("y", "s", "em", "st", "g", "tf")}
    for i, (y, s) in enumerate(observations):
        y = np.asarray(y, dtype=np.float64)
        s = np.asarray(s, dtype=np.float64)
        if y.shape[-1] != response.n_channels or s.shape != y.shape:
            raise ValueError(
                f"observation {i}: intensity {y.shape} and sigma {s.shape} must match and end "
                f"in {response.n_channels} channels"
            )
        res = bp.solve(y, s, response, basis, progress=progress, **bp_options)
        c = response.n_channels
        rows["y"].append(y.reshape(-1, c))
        rows["s"].append(s.reshape(-1, c))
        rows["em"].append(np.asarray(res.em, dtype=np.float64).reshape(-1, response.n_temperatures))
        rows["st"].append(np.asarray(res.status).reshape(-1))
        rows["g"].append(np.full(rows["st"][-1].shape, i, dtype=np.int32))
        rows["tf"].append(np.asarray(res.tolfac, dtype=np.float64).reshape(-1))
    cat = {k: np.concatenate(v) for k, v in rows.items()}
    return Dataset(cat["y"], cat["s"], cat["em"], cat["st"], cat["g"], cat["tf"])


def synthetic_observations(
    response: TemperatureResponse,
    n: int,
    shape: tuple[int, int] = (128, 128),
    seed: int = 0,
    exptime: float = 2.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` noisy synthetic scenes (:func:`deepem_jax.forward.synthetic_scene`) as
    ``(intensity, sigma)`` pairs in DN s^-1 pix^-1, reproducible from ``seed``."""
    from .forward import synthetic_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        _, y = synthetic_scene(response, shape, rng, exptime)
        out.append((y, sigma_values(y, exptime, response.wavelength)))
    return out


def observations_from_dirs(
    dirs: Sequence[str | Path], response: TemperatureResponse, rebin: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real AIA observations (one directory of FITS files each) as ``(intensity, sigma)``
    pairs for the response's channels; pixels the data layer flags are set to NaN so BP marks
    them invalid."""
    from .io import load_aia

    out = []
    for d in dirs:
        stack = load_aia(d, response.wavelength, rebin=rebin)
        out.append((stack.masked_data, stack.sigma()))
    return out


# -- the step -------------------------------------------------------------------------------


def band_excess(resynth: jax.Array, y: jax.Array, sigma: jax.Array, tolfac: jax.Array) -> jax.Array:
    """Per pixel, the mean over channels of the squared distance (in units of sigma) by which
    ``resynth`` lies outside BP's tolerance band ``bp.bounds(y, sigma, tolfac)``; 0 inside it.
    Shapes: (n, C) arrays, ``tolfac`` (n,); intensities in DN s^-1 pix^-1."""
    from .bp import bounds

    lower, upper = bounds(y, sigma, tolfac[:, None])
    excess = jax.nn.relu(resynth - upper) + jax.nn.relu(lower - resynth)
    return jnp.mean(jnp.square(excess / sigma), axis=-1)


def _loss_fn(params, batch, w, K, config: ModelConfig, physics_weight: float, physics: str):
    """(total, mse): weighted MSE on sqrt-scaled EM plus ``physics_weight`` times the physics
    term; ``w`` (n,) is 1 for pixels used, 0 for padding."""
    y, sigma, em, tolfac = batch
    out = DeepEMNet(config).apply({"params": params}, encode_intensities(y))
    target = encode_em(em, config)
    per_pixel = jnp.mean(jnp.square(out - target), axis=-1)
    wsum = jnp.maximum(w.sum(), 1.0)
    mse = jnp.sum(w * per_pixel) / wsum
    if physics_weight == 0.0:
        return mse, mse
    resynth = forward(K, decode_em(out, config))
    if physics == "chi2":
        term = jnp.mean(jnp.square((resynth - y) / sigma), axis=-1)
    else:
        term = band_excess(resynth, y, sigma, tolfac)
    return mse + physics_weight * jnp.sum(w * term) / wsum, mse


def _make_steps(
    config: ModelConfig, tx: optax.GradientTransformation, physics_weight: float, physics: str
):
    @jax.jit
    def train_step(params, opt_state, batch, w, K):
        (_, mse), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
            params, batch, w, K, config, physics_weight, physics
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mse

    @jax.jit
    def eval_step(params, batch, w, K):
        return _loss_fn(params, batch, w, K, config, physics_weight, physics)

    return train_step, eval_step


def _batches(data: Dataset, batch_size: int | None, rng: np.random.Generator | None):
    """Yield (batch arrays, weights) of fixed shape (padded with zero weight) so jit compiles
    once. ``rng`` None means no shuffling (validation)."""
    idx = np.flatnonzero(data.solved)
    if batch_size is None:
        groups = np.unique(data.group[idx])
        if rng is not None:
            groups = rng.permutation(groups)
        chunks = [idx[data.group[idx] == g] for g in groups]
        size = max((len(c) for c in chunks), default=1)
    else:
        if rng is not None:
            idx = rng.permutation(idx)
        size = batch_size
        chunks = [idx[i : i + size] for i in range(0, len(idx), size)]
    for c in chunks:
        pad = size - len(c)
        take = np.concatenate([c, np.zeros(pad, dtype=c.dtype)]) if pad else c
        w = np.concatenate([np.ones(len(c)), np.zeros(pad)]).astype(np.float32)
        batch = (
            data.intensity[take].astype(np.float32),
            data.sigma[take].astype(np.float32),
            data.em[take].astype(np.float32),
            np.where(np.isfinite(data.tolfac[take]), data.tolfac[take], 1.4).astype(np.float32),
        )
        yield batch, w


def _evaluate(eval_step, params, data: Dataset, K, batch_size: int) -> tuple[float, float]:
    """(total loss, MSE on sqrt-scaled EM) over the solved pixels of ``data``."""
    tot, mse, n = 0.0, 0.0, 0.0
    for batch, w in _batches(data, batch_size, None):
        k = float(w.sum())
        t, m = eval_step(params, batch, w, K)
        tot += float(t) * k
        mse += float(m) * k
        n += k
    return tot / max(n, 1), mse / max(n, 1)


@dataclasses.dataclass(frozen=True)
class _State:
    params: Any
    opt_state: Any
    epoch: int
    best_params: Any
    best_val: float
    bad_epochs: int
    history: list[dict[str, float]]


_HISTORY_KEYS = ("epoch", "loss", "val_loss", "val_mse", "pixels_per_s")


def _save(
    workdir: Path,
    state: _State,
    config: TrainConfig,
    mcfg: ModelConfig,
    response: TemperatureResponse,
) -> None:
    """Atomic checkpoint ``checkpoint_<epoch>.msgpack``; older ones are removed after."""
    from flax import serialization

    from .checkpoint import Checkpoint, ResponseId, checkpoint_path, save_checkpoint

    extra = {
        "train_config": config.to_dict(),
        "best_params": serialization.to_state_dict(state.best_params),
        "best_val": float(state.best_val),
        "bad_epochs": int(state.bad_epochs),
        "history": {k: [float(h[k]) for h in state.history] for k in _HISTORY_KEYS},
    }
    ck = Checkpoint(
        state.params,
        mcfg,
        response.logt,
        response.channels,
        ResponseId.of(response),
        opt_state=state.opt_state,
        epoch=state.epoch,
        metrics=dict(state.history[-1]) if state.history else {},
        extra=extra,
    )
    path = save_checkpoint(checkpoint_path(workdir, state.epoch), ck)
    for old in workdir.glob("checkpoint_*.msgpack"):
        if old != path:
            old.unlink()


def _restore(
    workdir: Path,
    config: TrainConfig,
    response: TemperatureResponse,
    params_template: Any,
    opt_template: Any,
) -> _State | None:
    """The state of the latest checkpoint in ``workdir``, or None if there is none."""
    from flax import serialization

    from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    path = latest_checkpoint(workdir)
    if path is None:
        return None
    ck = load_checkpoint(
        path, response=response, strict_response=True, opt_state_target=opt_template
    )
    saved = dict(ck.extra.get("train_config", {}))
    now = config.to_dict()
    defaults = TrainConfig().to_dict()  # keys added since a checkpoint was written
    differ = sorted(k for k in now if k != "epochs" and saved.get(k, defaults[k]) != now[k])
    if differ:
        raise CheckpointError(
            f"{path} was written with a different training config ({differ}); use a new "
            "work directory or the same settings"
        )
    hist = ck.extra["history"]
    history = [
        {k: (int(v) if k == "epoch" else float(v)) for k, v in zip(_HISTORY_KEYS, row, strict=True)}
        for row in zip(*(hist[k] for k in _HISTORY_KEYS), strict=True)
    ]
    best = serialization.from_state_dict(params_template, ck.extra["best_params"])
    return _State(
        ck.params,
        ck.opt_state,
        ck.epoch,
        best,
        float(ck.extra["best_val"]),
        int(ck.extra["bad_epochs"]),
        history,
    )


def train_and_evaluate(
    config: TrainConfig,
    train: Dataset,
    val: Dataset,
    response: TemperatureResponse,
    workdir: str | Path,
    *,
    log: Callable[[str], None] | None = print,
    stop_after_epochs: int | None = None,
) -> tuple[Predictor, list[dict[str, float]]]:
    """Train, validate each epoch, checkpoint atomically into ``workdir``, stop early.

    Resumes from the latest checkpoint in ``workdir`` if there is one (its config and
    response identity must match). Returns the predictor with the best validation loss and the
    per-epoch history (``epoch``, ``loss``, ``val_loss``, ``pixels_per_s``).
    ``stop_after_epochs`` ends this call after that many epochs (used to test resuming).
    """
    # the named architecture, with input/output sizes taken from the response
    mcfg = dataclasses.replace(
        get_config(config.model),
        n_channels=response.n_channels,
        n_temperatures=response.n_temperatures,
    )
    for name, d in (("train", train), ("val", val)):
        if d.intensity.shape[-1] != mcfg.n_channels or d.em.shape[-1] != mcfg.n_temperatures:
            raise ValueError(
                f"{name} dataset has {d.intensity.shape[-1]} channels x {d.em.shape[-1]} bins "
                f"but the response has {mcfg.n_channels} channels x {mcfg.n_temperatures} bins"
            )
        if not d.solved.any():
            raise ValueError(f"{name} dataset has no BP-solved pixel to learn from")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n_train = int(train.solved.sum())
    if config.batch_size is None:
        steps_per_epoch = len(np.unique(train.group[train.solved]))
    else:
        steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    lr = (
        optax.cosine_decay_schedule(config.learning_rate, total_steps)
        if config.schedule == "cosine"
        else config.learning_rate
    )
    tx = optax.adamw(lr, weight_decay=config.weight_decay)
    K = jnp.asarray(response.K, jnp.float32)
    train_step, eval_step = _make_steps(mcfg, tx, config.physics_weight, config.physics)
    eval_bs = config.batch_size or 65536

    init = Predictor.init(jax.random.PRNGKey(config.seed), mcfg, response.logt, response.channels)
    state = _restore(workdir, config, response, init.params, tx.init(init.params))
    if state is None:
        state = _State(init.params, tx.init(init.params), 0, init.params, math.inf, 0, [])
    elif log:
        log(f"resuming after epoch {state.epoch} from {workdir}")

    done_now = 0
    while state.epoch < config.epochs:
        if config.patience is not None and state.bad_epochs >= config.patience:
            if log:
                log(f"early stop: no validation improvement for {config.patience} epochs")
            break
        if stop_after_epochs is not None and done_now >= stop_after_epochs:
            break
        rng = np.random.default_rng([config.seed, state.epoch])
        t0 = time.perf_counter()
        params, opt_state, tot, n = state.params, state.opt_state, 0.0, 0.0
        for batch, w in _batches(train, config.batch_size, rng):
            params, opt_state, mse = train_step(params, opt_state, batch, w, K)
            k = float(w.sum())
            tot += float(mse) * k
            n += k
        dt = time.perf_counter() - t0
        val_loss, val_mse = _evaluate(eval_step, params, val, K, eval_bs)
        rec = {
            "epoch": state.epoch + 1,
            "loss": tot / max(n, 1),
            "val_loss": val_loss,
            "val_mse": val_mse,
            "pixels_per_s": n / dt,
        }
        improved = val_loss < state.best_val
        state = _State(
            params,
            opt_state,
            state.epoch + 1,
            params if improved else state.best_params,
            val_loss if improved else state.best_val,
            0 if improved else state.bad_epochs + 1,
            [*state.history, rec],
        )
        _save(workdir, state, config, mcfg, response)
        done_now += 1
        if log:
            log(
                f"epoch {rec['epoch']:4d}/{config.epochs}  mse {rec['loss']:.4f}  "
                f"val mse {val_mse:.4f}  val loss {val_loss:.4f}{' *' if improved else '  '}  "
                f"{rec['pixels_per_s']:,.0f} px/s"
            )
    best = Predictor(state.best_params, mcfg, response.logt, response.channels)
    return best, list(state.history)
