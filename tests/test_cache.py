"""The persistent compilation cache (deepem_jax._cache): a second process loads BP's compiled
executables instead of compiling them; the environment variable moves it or switches it off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deepem_jax import _cache

# Solves a small batch and reports the cache directory JAX uses and its cache hits and misses.
_SCRIPT = """
import json, jax, numpy as np
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
from deepem_jax import bp
D = np.array([[1.0, 2.0, 0.5], [3.0, 1.0, 0.2]], np.float32)
lo = np.array([[1.0, 1.0], [0.5, 2.0]], np.float32)
res = bp.solve_lp(D, lo, 2 * lo)
jax.block_until_ready(res)
print(json.dumps({
    "dir": jax.config.jax_compilation_cache_dir,
    "hits": events.count("/jax/compilation_cache/cache_hits"),
    "misses": events.count("/jax/compilation_cache/cache_misses"),
    "status": np.asarray(res.status).tolist(),
}))
"""


def _run(env_value: str | None, min_compile: float = 0.0) -> dict:
    env = dict(os.environ)
    env.pop(_cache.ENV_VAR)
    if env_value is not None:
        env[_cache.ENV_VAR] = env_value
    # every compilation is cached, however quick, so the small problem exercises the cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_compile)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_reads_the_cache(tmp_path):
    first = _run(str(tmp_path / "jc"))
    assert first["dir"] == str(tmp_path / "jc") and first["status"] == [0, 0]
    assert first["misses"] > 0 and any((tmp_path / "jc").iterdir())
    second = _run(str(tmp_path / "jc"))
    assert second["hits"] >= first["misses"] and second["misses"] == 0


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_switched_off(value):
    assert _run(value)["dir"] is None


def test_default_directory_is_the_user_cache(monkeypatch):
    import pooch

    monkeypatch.delenv(_cache.ENV_VAR)
    assert _cache.cache_dir() == pooch.os_cache("deepem_jax") / "jax_cache"
    monkeypatch.setenv(_cache.ENV_VAR, "~/elsewhere")
    assert str(_cache.cache_dir()) == os.path.expanduser("~/elsewhere")


def test_uncreatable_directory_warns_and_runs_without_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = _run(str(blocker / "cache"))
    assert not out["dir"] and out["status"] == [0, 0]
