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

from ._batching import pad_rows
from .forward import forward
from .model import (
    DeepEMNet,
    ModelConfig,
    decode_em,
    encode_em,
    encode_intensities,
    get_config,
    network_em,
)
from .predictor import Predictor
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
        for name, low, none in (
            ("epochs", 1, ""),
            ("batch_size", 1, " or None (whole observations per step)"),
            ("patience", 1, " or None (no early stopping)"),
            ("seed", 0, ""),
        ):
            v = getattr(self, name)
            if none and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}{none}, got {v!r}")
        for name, positive in (
            ("learning_rate", True),
            ("weight_decay", False),
            ("physics_weight", False),
        ):
            v = getattr(self, name)
            real = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
            if not (real and math.isfinite(v) and (v > 0 if positive else v >= 0)):
                bound = "> 0" if positive else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {v!r}")
        if self.physics not in ("chi2", "band"):
            raise ValueError(f"physics must be 'chi2' or 'band', got {self.physics!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (stored in checkpoints to check a resumed run)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Training pixels: ``intensity`` (N, C) DN s^-1 pix^-1, ``sigma`` (N, C) DN s^-1 pix^-1,
    BP target ``em`` (N, n_T) cm^-5 per bin, BP ``status`` (N,), ``group`` (N,) the index of
    the observation each pixel came from (for whole-image steps), and ``tolfac`` (N,) the
    tolerance factor of the band each pixel is judged in (by default 1.4 for every pixel)."""

    intensity: np.ndarray
    sigma: np.ndarray
    em: np.ndarray
    status: np.ndarray
    group: np.ndarray
    tolfac: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.intensity.shape[0]
        if self.tolfac is None:
            object.__setattr__(self, "tolfac", np.full(n, 1.4))
        if not np.all(np.isfinite(self.tolfac) & (self.tolfac > 0)):
            raise ValueError("dataset tolfac must be finite and positive")
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
        tolerance factor."""
        from .bp import bounds

        lo, hi = bounds(self.intensity, self.sigma, self.tolfac[:, None])
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
    observations: Sequence[Any],
    response: TemperatureResponse,
    *,
    tolfac: float = 1.4,
    progress: bool = False,
) -> Dataset:
    """Basis Pursuit targets of each observation through :func:`deepem_jax.invert`.

    Each observation is an :class:`~deepem_jax.AIAStack` (calibrated by ``invert``: error model,
    degradation at its time) or an ``(intensity, sigma)`` pair of arrays (..., C) in
    DN s^-1 pix^-1 already corrected for degradation (e.g. synthetic). ``response`` is the
    undegraded response on the network's log T grid, channels in the order of the inputs.
    The dataset holds the corrected intensities and sigma (what the network sees); every pixel
    is kept with its status, the loss masks the unsolved ones.
    """
    from .io import AIAStack
    from .pipeline import invert

    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("y", "s", "em", "st", "g", "tf")}
    c = response.n_channels
    for i, obs in enumerate(observations):
        if isinstance(obs, AIAStack):
            res = invert(obs, "bp", response=response, tolfac=tolfac, progress=progress)
        else:
            y, s = (np.asarray(a, dtype=np.float64) for a in obs)
            if s.shape != y.shape:
                raise ValueError(f"observation {i}: sigma {s.shape} differs from {y.shape}")
            res = invert(
                y,
                "bp",
                sigma=s,
                channels=response.wavelength,
                response=response,
                tolfac=tolfac,
                degradation=False,
                progress=progress,
            )
        rows["y"].append(res.corrected_intensities.reshape(-1, c).astype(np.float64))
        rows["s"].append(res.corrected_sigma.reshape(-1, c).astype(np.float64))
        rows["em"].append(np.nan_to_num(res.em).reshape(-1, res.em.shape[-1]).astype(np.float64))
        rows["st"].append(res.status.reshape(-1))
        rows["g"].append(np.full(res.status.size, i, dtype=np.int32))
        rows["tf"].append(res.band_tolfac.reshape(-1).astype(np.float64))
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
):
    """Real AIA observations (one directory of FITS files each) as
    :class:`~deepem_jax.AIAStack` for the response's channels, for :func:`build_dataset`."""
    from .io import load_aia

    return [load_aia(d, response.wavelength, rebin=rebin) for d in dirs]


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
    if config.refine_steps:
        em_pred = network_em(params, y, config, sigma=sigma, K=K)
        out = encode_em(em_pred, config)
    else:
        out = DeepEMNet(config).apply({"params": params}, encode_intensities(y))
        em_pred = decode_em(out, config)
    target = encode_em(em, config)
    per_pixel = jnp.mean(jnp.square(out - target), axis=-1)
    wsum = jnp.maximum(w.sum(), 1.0)
    mse = jnp.sum(w * per_pixel) / wsum
    if physics_weight == 0.0:
        return mse, mse
    resynth = forward(K, em_pred)
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
        (loss, mse), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
            params, batch, w, K, config, physics_weight, physics
        )
        # optax's Adam bias correction computes `decay**count` (a Python float to the power
        # of an int32 step count), which JAX's strict dtype promotion refuses: the optimiser
        # update runs under standard promotion whatever the caller set.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, mse

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
        # padding repeats a solved pixel (finite inputs) with weight 0
        take = pad_rows(c, size, fill=c[0])
        w = pad_rows(np.ones(len(c), np.float32), size)
        batch = (
            data.intensity[take].astype(np.float32),
            data.sigma[take].astype(np.float32),
            data.em[take].astype(np.float32),
            data.tolfac[take].astype(np.float32),
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


def _train_epoch(train_step, state: _State, train: Dataset, config: TrainConfig, K, workdir: Path):
    """One pass over the training pixels from ``state``: (params, opt_state, mean MSE, pixels,
    seconds). Raises FloatingPointError at the first step whose loss is not finite."""
    rng = np.random.default_rng([config.seed, state.epoch])
    t0 = time.perf_counter()
    params, opt_state, tot, n = state.params, state.opt_state, 0.0, 0.0
    for step, (batch, w) in enumerate(_batches(train, config.batch_size, rng), start=1):
        params, opt_state, loss, mse = train_step(params, opt_state, batch, w, K)
        if not math.isfinite(float(loss)):
            raise _diverged(
                f"training loss {float(loss)} at epoch {state.epoch + 1}, step {step}",
                state,
                workdir,
            )
        k = float(w.sum())
        tot += float(mse) * k
        n += k
    return params, opt_state, tot / max(n, 1), n, time.perf_counter() - t0


def _diverged(what: str, state: _State, workdir: Path) -> FloatingPointError:
    """The error that stops training at a non-finite loss, saying which checkpoint is kept."""
    kept = (
        f"the checkpoint of epoch {state.epoch} in {workdir} is kept"
        if state.epoch
        else "no checkpoint was written"
    )
    return FloatingPointError(
        f"training stopped: non-finite {what}; {kept}. Lower the learning rate, or look for "
        "NaN/Inf in the data"
    )


def _model_config(config: TrainConfig, response: TemperatureResponse) -> ModelConfig:
    """The named architecture, with input/output sizes taken from the response."""
    return dataclasses.replace(
        get_config(config.model),
        n_channels=response.n_channels,
        n_temperatures=response.n_temperatures,
    )


def _check_datasets(train: Dataset, val: Dataset, mcfg: ModelConfig) -> None:
    """ValueError unless both datasets fit the network's channels and bins and hold a
    BP-solved pixel."""
    for name, d in (("train", train), ("val", val)):
        if d.intensity.shape[-1] != mcfg.n_channels or d.em.shape[-1] != mcfg.n_temperatures:
            raise ValueError(
                f"{name} dataset has {d.intensity.shape[-1]} channels x {d.em.shape[-1]} bins "
                f"but the response has {mcfg.n_channels} channels x {mcfg.n_temperatures} bins"
            )
        if not d.solved.any():
            raise ValueError(f"{name} dataset has no BP-solved pixel to learn from")


def _optimizer(config: TrainConfig, train: Dataset) -> optax.GradientTransformation:
    """AdamW with the configured weight decay and a constant learning rate, or one decaying
    on a cosine over all the steps of ``config.epochs`` epochs of ``train``."""
    if config.batch_size is None:
        steps_per_epoch = len(np.unique(train.group[train.solved]))
    else:
        steps_per_epoch = math.ceil(int(train.solved.sum()) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    lr = (
        optax.cosine_decay_schedule(config.learning_rate, total_steps)
        if config.schedule == "cosine"
        else config.learning_rate
    )
    return optax.adamw(lr, weight_decay=config.weight_decay)


def _start_state(
    workdir: Path,
    config: TrainConfig,
    response: TemperatureResponse,
    mcfg: ModelConfig,
    tx: optax.GradientTransformation,
    log: Callable[[str], None] | None,
) -> _State:
    """The state of the latest checkpoint in ``workdir``, else freshly initialised params
    (from ``config.seed``) and optimiser state."""
    init = Predictor.init(jax.random.PRNGKey(config.seed), mcfg, response.logt, response.channels)
    state = _restore(workdir, config, response, init.params, tx.init(init.params))
    if state is None:
        return _State(init.params, tx.init(init.params), 0, init.params, math.inf, 0, [])
    if log:
        log(f"resuming after epoch {state.epoch} from {workdir}")
    return state


def _run_epoch(
    steps, state: _State, train: Dataset, val: Dataset, config: TrainConfig, K, workdir: Path
) -> tuple[_State, bool]:
    """One epoch of training and a validation pass from ``state``: the next state (its
    history extended by the epoch's record, the best params kept) and whether the validation
    loss improved. Raises FloatingPointError at a non-finite validation loss."""
    train_step, eval_step = steps
    params, opt_state, mse, n, dt = _train_epoch(train_step, state, train, config, K, workdir)
    val_loss, val_mse = _evaluate(eval_step, params, val, K, config.batch_size or 65536)
    if not math.isfinite(val_loss):
        raise _diverged(f"validation loss {val_loss} after epoch {state.epoch + 1}", state, workdir)
    rec = {
        "epoch": state.epoch + 1,
        "loss": mse,
        "val_loss": val_loss,
        "val_mse": val_mse,
        "pixels_per_s": n / dt,
    }
    improved = val_loss < state.best_val
    new = _State(
        params,
        opt_state,
        state.epoch + 1,
        params if improved else state.best_params,
        val_loss if improved else state.best_val,
        0 if improved else state.bad_epochs + 1,
        [*state.history, rec],
    )
    return new, improved


def _epoch_line(rec: dict[str, float], epochs: int, improved: bool) -> str:
    """The progress line of one epoch's record (``*`` marks a better validation loss)."""
    return (
        f"epoch {rec['epoch']:4d}/{epochs}  mse {rec['loss']:.4f}  "
        f"val mse {rec['val_mse']:.4f}  val loss {rec['val_loss']:.4f}"
        f"{' *' if improved else '  '}  {rec['pixels_per_s']:,.0f} px/s"
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
    A training step or a validation pass with a non-finite loss raises FloatingPointError
    naming the epoch (and step); the checkpoints of the epochs before it are kept.
    """
    mcfg = _model_config(config, response)
    _check_datasets(train, val, mcfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tx = _optimizer(config, train)
    K = jnp.asarray(response.K, jnp.float32)
    steps = _make_steps(mcfg, tx, config.physics_weight, config.physics)
    state = _start_state(workdir, config, response, mcfg, tx, log)
    done_now = 0
    while state.epoch < config.epochs:
        if config.patience is not None and state.bad_epochs >= config.patience:
            if log:
                log(f"early stop: no validation improvement for {config.patience} epochs")
            break
        if stop_after_epochs is not None and done_now >= stop_after_epochs:
            break
        state, improved = _run_epoch(steps, state, train, val, config, K, workdir)
        _save(workdir, state, config, mcfg, response)
        done_now += 1
        if log:
            log(_epoch_line(state.history[-1], config.epochs, improved))
    best = Predictor(state.best_params, mcfg, response.logt, response.channels)
    return best, list(state.history)
