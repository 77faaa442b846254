"""The learned Gauss-Newton refinement, against a per-pixel numpy implementation of the same
steps (dense ``numpy.linalg.solve``), and on analytic properties of Gauss-Newton."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepem_jax.forward import forward, random_dems
from deepem_jax.model import network_em
from deepem_jax.predictor import Predictor
from deepem_jax.refine import FLOOR, init_refine_params, refine
from deepem_jax.response import DEEPEM_LOGT, default_response


def _case(n: int, seed: int):
    """Noiseless six-channel data of prior DEMs, sigma 2 % of the data plus 0.5 DN/s, and a
    starting EM 0.5x-2x off the true EM per bin."""
    rng = np.random.default_rng(seed)
    K = np.asarray(default_response().regrid(DEEPEM_LOGT).K, np.float64)
    em = random_dems(DEEPEM_LOGT, n, rng)
    y = np.asarray(forward(K, em))
    sigma = 0.02 * y + 0.5
    em0 = em * np.exp(rng.uniform(-0.7, 0.7, em.shape))
    return K, y, sigma, em0


def _numpy_steps(eta, lam, em, y, sigma, K):
    """The refinement (deepem_jax.refine's docstring) pixel by pixel in float64 numpy."""
    out = []
    for e, yy, s in zip(em, y, sigma, strict=True):
        u = np.log(np.maximum(e, FLOOR))
        for a, b in zip(eta, lam, strict=True):
            x = np.exp(u)
            J = K * x[None, :] / s[:, None]
            r = (K @ x - yy) / s
            A = J @ J.T
            A += b * np.trace(A) / len(s) * np.eye(len(s))
            du = -a * J.T @ np.linalg.solve(A, r)
            u = u + 3.0 * np.tanh(du / 3.0)
        out.append(np.exp(u))
    return np.array(out)


def test_refine_matches_numpy_reference(x64):
    K, y, sigma, em0 = _case(50, 0)
    params = {"eta": jnp.array([0.3, 1.2, 0.8]), "lam": jnp.array([1.0, 0.05, 0.2])}
    got = np.asarray(refine(params, jnp.asarray(em0), jnp.asarray(y), jnp.asarray(sigma), K))
    want = _numpy_steps(
        np.log1p(np.exp([0.3, 1.2, 0.8])), np.log1p(np.exp([1.0, 0.05, 0.2])), em0, y, sigma, K
    )
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_refine_fits_reachable_data():
    """Data from a non-negative EM are reachable: undamped-ish Gauss-Newton steps from a
    start 0.5x-2x off cut the median chi^2 by orders of magnitude (float32)."""
    K, y, sigma, em0 = _case(2000, 1)
    chi2 = lambda em: np.median(np.sum(((em @ K.T) - y) ** 2 / sigma**2, -1))  # noqa: E731
    params = init_refine_params(8)
    params = {"eta": params["eta"], "lam": jnp.full(8, -6.0)}  # damping softplus(-6) ~ 2.5e-3
    args = (jnp.asarray(a, jnp.float32) for a in (em0, y, sigma))
    em = np.asarray(refine(params, *args, jnp.asarray(K, jnp.float32)), np.float64)
    assert np.all(np.isfinite(em)) and np.all(em > 0)
    assert chi2(em) < 1e-3 * chi2(em0)


def test_refine_gradient_matches_finite_differences(x64):
    K, y, sigma, em0 = _case(20, 2)
    args = tuple(jnp.asarray(a) for a in (em0, y, sigma))

    def loss(p):
        em = refine(p, *args, K)
        return jnp.sum(jnp.square(jnp.sqrt(em / 1e25) - jnp.sqrt(em0 / 1e25)))

    params = {"eta": jnp.array([0.1, -0.4]), "lam": jnp.array([-1.0, 0.5])}
    grad = jax.grad(loss)(params)
    h = 1e-6
    for key in ("eta", "lam"):
        for k in range(2):
            plus = {n: v.at[k].add(h) if n == key else v for n, v in params.items()}
            minus = {n: v.at[k].add(-h) if n == key else v for n, v in params.items()}
            fd = (loss(plus) - loss(minus)) / (2 * h)
            assert float(grad[key][k]) == pytest.approx(float(fd), rel=1e-5)


def test_refined_network_needs_sigma_and_response():
    net = Predictor.init(jax.random.key(0), "small_gn")
    y = np.full((3, 6), 100.0, np.float32)
    with pytest.raises(ValueError, match="sigma"):
        net.predict(y)
    with pytest.raises(ValueError, match="sigma and K"):
        network_em(net.params, jnp.asarray(y), net.config)
    K = np.asarray(default_response().regrid(DEEPEM_LOGT).K, np.float32)
    em = network_em(net.params, jnp.asarray(y), net.config, sigma=jnp.ones_like(y), K=K)
    assert em.shape == (3, 18) and bool(jnp.all(em > 0))
