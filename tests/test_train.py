"""Training: a tiny end-to-end run lowers validation loss, resume-after-kill equals an
uninterrupted run, and bad inputs give clear errors."""

import dataclasses

import jax
import numpy as np
import pytest

from deepem_jax.checkpoint import CheckpointError, latest_checkpoint, load_predictor
from deepem_jax.forward import random_dems
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.train import Dataset, TrainConfig, build_dataset, train_and_evaluate


@pytest.fixture(scope="module")
def response():
    return default_response().regrid(DEEPEM_LOGT)


def _truth_dataset(response, n, seed):
    """Pixels whose target is the true EM (fast; no BP) -- for the training mechanics."""
    rng = np.random.default_rng(seed)
    em = random_dems(DEEPEM_LOGT, n, rng)
    y = em @ np.asarray(response.K).T
    sigma = np.sqrt(np.abs(y)) + 0.5
    status = np.zeros(n, np.int8)
    status[::50] = 1  # a few "BP failed" pixels with garbage targets: must be ignored
    em[::50] = 1e35
    return Dataset(y, sigma, em, status, np.zeros(n, np.int32))


def test_tiny_training_lowers_validation_loss(tmp_path, response):
    train = _truth_dataset(response, 4000, 0)
    val = _truth_dataset(response, 1000, 1)
    cfg = TrainConfig(model="small", epochs=6, batch_size=256, learning_rate=3e-3, seed=0)
    pred, hist = train_and_evaluate(cfg, train, val, response, tmp_path, log=None)
    assert len(hist) == 6
    assert hist[-1]["val_loss"] < 0.5 * hist[0]["val_loss"]
    assert np.isfinite([h["loss"] for h in hist]).all()  # the 1e35 targets were masked out
    # the checkpoint holds the trained network and loads as a Predictor
    p2 = load_predictor(latest_checkpoint(tmp_path), response=response, strict_response=True)
    assert p2.channels == pred.channels


def test_resume_after_kill_equals_uninterrupted(tmp_path, response):
    train = _truth_dataset(response, 1500, 2)
    val = _truth_dataset(response, 300, 3)
    cfg = TrainConfig(
        model="small", epochs=4, batch_size=128, learning_rate=1e-3, seed=7, patience=None
    )
    ref, ref_hist = train_and_evaluate(cfg, train, val, response, tmp_path / "a", log=None)
    # "killed" after 2 epochs, then restarted from the same work directory
    train_and_evaluate(cfg, train, val, response, tmp_path / "b", log=None, stop_after_epochs=2)
    msgs = []
    res, res_hist = train_and_evaluate(cfg, train, val, response, tmp_path / "b", log=msgs.append)
    assert any("resuming after epoch 2" in m for m in msgs)
    assert [h["val_loss"] for h in res_hist] == [h["val_loss"] for h in ref_hist]
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(res.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a different config must not silently continue someone else's run
    with pytest.raises(CheckpointError, match="different training config"):
        train_and_evaluate(
            dataclasses.replace(cfg, learning_rate=5e-4),
            train,
            val,
            response,
            tmp_path / "b",
            log=None,
        )


def test_whole_image_steps_and_physics_term(tmp_path, response):
    a = _truth_dataset(response, 600, 4)
    b = _truth_dataset(response, 400, 5)
    train = Dataset(
        *(
            np.concatenate([getattr(a, f.name), getattr(b, f.name)])
            for f in dataclasses.fields(Dataset)
        )
    )
    train = dataclasses.replace(train, group=np.r_[np.zeros(600, np.int32), np.ones(400, np.int32)])
    cfg = TrainConfig(
        model="small", epochs=2, batch_size=None, physics_weight=0.1, learning_rate=1e-3
    )
    _, hist = train_and_evaluate(cfg, train, a, response, tmp_path, log=None)
    assert len(hist) == 2 and np.isfinite(hist[-1]["val_loss"])


def test_bp_targets_dataset(response):
    from deepem_jax.train import synthetic_observations

    obs = synthetic_observations(response, 1, (24, 24), seed=0)
    data = build_dataset(obs, response)
    assert len(data) == 24 * 24
    assert data.solved.mean() > 0.9
    # BP targets reproduce the data within tolerance where solved (checked against the forward
    # model with numpy, independently of the solver's own resynthesis)
    y_bp = data.em[data.solved] @ np.asarray(response.K).T
    tol = data.tolfac[data.solved, None] * data.sigma[data.solved]
    y = np.maximum(data.intensity[data.solved], 0)
    assert np.all(np.isin(np.round(data.tolfac[data.solved], 4), [1.4, 2.1, 3.15]))
    assert np.all(y_bp <= (y + tol) * (1 + 1e-4) + 1e-6)
    assert np.all(y_bp >= np.maximum(y - tol, 0) * (1 - 1e-4) - 1e-6)


def test_bad_inputs(tmp_path, response):
    train = _truth_dataset(response, 200, 6)
    with pytest.raises(ValueError, match="channels"):
        train_and_evaluate(
            TrainConfig(model="small"),
            train,
            train,
            response.select(response.wavelength[1:]),
            tmp_path,
            log=None,
        )
    dead = dataclasses.replace(train, status=np.ones(200, np.int8))
    with pytest.raises(ValueError, match="no BP-solved pixel"):
        train_and_evaluate(TrainConfig(model="small"), dead, train, response, tmp_path, log=None)
    with pytest.raises(ValueError, match="unknown model"):
        TrainConfig(model="huge")
    with pytest.raises(ValueError, match="rows"):
        Dataset(train.intensity, train.sigma, train.em[:10], train.status, train.group)


def test_band_excess_by_hand():
    from deepem_jax.train import band_excess

    y = np.array([[10.0, 100.0], [10.0, 100.0]])
    sigma = np.array([[1.0, 10.0], [1.0, 10.0]])
    # band with tolfac 1.4: [8.6, 11.4] and [86, 114]
    inside = np.array([[11.0, 90.0], [8.7, 113.0]])
    np.testing.assert_allclose(
        np.asarray(band_excess(inside, y, sigma, np.array([1.4, 1.4]))), [0.0, 0.0], atol=1e-12
    )
    outside = np.array([[12.4, 100.0], [10.0, 66.0]])  # 1 sigma above; 2 sigma below
    np.testing.assert_allclose(
        np.asarray(band_excess(outside, y, sigma, np.array([1.4, 1.4]))), [0.5, 2.0], rtol=1e-5
    )


# -- stopping on a non-finite loss, and configs that cannot train -----------------------------


def test_non_finite_training_loss_stops_and_keeps_checkpoints(tmp_path, response):
    train = _truth_dataset(response, 600, 8)
    val = _truth_dataset(response, 200, 9)
    cfg = TrainConfig(model="small", epochs=3, batch_size=100, learning_rate=1e-3, patience=None)
    train_and_evaluate(cfg, train, val, response, tmp_path, log=None, stop_after_epochs=1)
    first = latest_checkpoint(tmp_path)
    intensity = train.intensity.copy()
    intensity[1, 2] = np.nan  # pixel 1 is BP-solved: it reaches the loss
    poisoned = dataclasses.replace(train, intensity=intensity)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite training loss nan at epoch 2, step [1-6]; the checkpoint of epoch 1 "
        r"in .* is kept",
    ):
        train_and_evaluate(cfg, poisoned, val, response, tmp_path, log=None)
    assert latest_checkpoint(tmp_path) == first and first.name == "checkpoint_00000001.msgpack"
    kept = load_predictor(first, response=response, strict_response=True)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(kept.params))


def test_diverging_learning_rate_stops_in_the_first_epoch(tmp_path, response):
    train = _truth_dataset(response, 600, 10)
    cfg = TrainConfig(model="small", epochs=3, batch_size=100, learning_rate=1e30)
    with pytest.raises(
        FloatingPointError, match=r"at epoch 1, step \d+; no checkpoint was written"
    ):
        train_and_evaluate(cfg, train, train, response, tmp_path, log=None)
    assert latest_checkpoint(tmp_path) is None


def test_non_finite_validation_loss_stops_before_saving(tmp_path, response):
    train = _truth_dataset(response, 300, 11)
    val = _truth_dataset(response, 100, 12)
    val.intensity[1] = np.inf
    cfg = TrainConfig(model="small", epochs=2, batch_size=100)
    with pytest.raises(FloatingPointError, match="non-finite validation loss nan after epoch 1"):
        train_and_evaluate(cfg, train, val, response, tmp_path, log=None)
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("physics_weight", float("nan"), "physics_weight must be a finite number >= 0, got nan"),
        ("physics_weight", float("inf"), "physics_weight must be a finite number >= 0"),
        ("physics_weight", -0.5, "physics_weight must be a finite number >= 0"),
        ("physics_weight", "1", "physics_weight must be a finite number"),
        ("learning_rate", 0.0, "learning_rate must be a finite number > 0"),
        ("learning_rate", float("inf"), "learning_rate must be a finite number > 0"),
        ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0"),
        ("epochs", -1, "epochs must be an integer >= 1, got -1"),
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("epochs", 2.5, "epochs must be an integer >= 1"),
        ("epochs", True, "epochs must be an integer >= 1"),
        ("batch_size", 0, r"batch_size must be an integer >= 1 or None"),
        ("patience", 0, r"patience must be an integer >= 1 or None"),
        ("seed", -1, "seed must be an integer >= 0"),
        ("schedule", "linear", "schedule must be"),
        ("physics", "mse", "physics must be"),
    ],
)
def test_train_config_rejects(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(model="small", **{field: value})


def test_train_config_accepts_numpy_numbers():
    cfg = TrainConfig(
        model="small", epochs=np.int64(3), learning_rate=np.float32(1e-3), patience=None
    )
    assert cfg.epochs == 3 and cfg.batch_size == 4096
