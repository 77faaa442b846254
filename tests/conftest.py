"""Shared fixtures. Real data is found through the DEEPEM_JAX_DATA environment variable
(default: ../shared/data beside the repository); tests that need it skip with a clear message
when it is absent. No test touches the network."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The suite is dominated by XLA compiling many small programs once each: tests (and the
# processes they start, which inherit the environment) ask XLA for its cheap compilation
# pipeline. Set before jax is imported, since jax reads it then.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
if "DEEPEM_JAX_DATA" not in os.environ and DEFAULT_SHARED.is_dir():
    os.environ["DEEPEM_JAX_DATA"] = str(DEFAULT_SHARED)
# Tests never touch the user's compilation cache (deepem_jax._cache): they share one empty
# directory of their own, removed at exit, so the processes they start (Dask workers, the
# benchmark's fresh processes) read what was compiled before them. test_cache.py and
# test_examples.py set their own directories.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="deepem_jax_test_jax_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ["DEEPEM_JAX_COMPILATION_CACHE"] = _COMPILATION_CACHE

# float64 is opt-in for library users; tests that need it use the `x64` fixture.


@pytest.fixture(scope="session", autouse=True)
def strict_dtype_promotion():
    """Every test (and every fixture, module-scoped ones included) runs under JAX's strict
    dtype promotion, so an implicit float32/float64 (or int/float) mix in jnp code raises."""
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def xla_optimized():
    """XLA's full optimisation pipeline for what the test compiles: for tests whose time is
    spent running the compiled programs rather than compiling them."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def shared_path(*parts: str) -> Path:
    """Path of a file under DEEPEM_JAX_DATA, skipping the test if it is absent."""
    root = os.environ.get("DEEPEM_JAX_DATA")
    if not root:
        pytest.skip("DEEPEM_JAX_DATA is not set and ../shared/data does not exist")
    p = Path(root, *parts)
    if not p.exists():
        pytest.skip(f"shared data file {p} is absent (set DEEPEM_JAX_DATA to the data folder)")
    return p


@pytest.fixture
def genx_path():
    return shared_path("deepem", "PaulJWright_DeepEM", "DeepEM_Data", "aia_temperature_resp.genx")


@pytest.fixture
def csv_path():
    return shared_path("deepem", "RobertJaro_DeepEM", "data", "aia_temperature_response.csv")


@pytest.fixture
def npy_path():
    return shared_path("deepem", "HelioML_HelioML", "book", "04", "DeepEM_Data", "AIA_Resp.npy")


#: Scene side, timed calls per row and fit-row pixels of the shared benchmark report.
BENCH_SIZE = 16
BENCH_REPEATS = 2
BENCH_FIT_PIXELS = 32


@pytest.fixture(scope="session")
def bench_report():
    """The benchmark suite's report on one small scene (test_bench checks it; test_cli's
    ``bench`` command gets it from a stand-in that records its arguments)."""
    from deepem_jax.bench import run_suite

    return run_suite(
        [BENCH_SIZE],
        None,
        highs_pixels=6,
        demreg_pixels=12,
        fit_pixels=BENCH_FIT_PIXELS,
        log=None,
        repeats=BENCH_REPEATS,
    )
