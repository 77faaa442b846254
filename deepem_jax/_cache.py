"""Persistent JAX compilation cache, so a new process does not compile the solvers again.

:func:`enable_compilation_cache` points JAX's persistent compilation cache at a directory; the
compiled executables of every later ``jax.jit`` compilation that takes at least
``jax_persistent_cache_min_compile_time_secs`` (JAX's default: 1 s) are written there and read
back by the next process with the same JAX version, device and XLA flags. The Basis Pursuit
entry points (:func:`deepem_jax.bp.solve_lp` and what calls it) call it on first use.

The directory, from the ``DEEPEM_JAX_COMPILATION_CACHE`` environment variable:

* unset: ``jax_cache`` in the user cache directory (``pooch.os_cache("deepem_jax")``, e.g.
  ``~/.cache/deepem_jax/jax_cache`` on Linux);
* ``0``, ``off``, ``false``, ``no`` or empty: no cache (nothing is changed in JAX's config);
* anything else: that directory.

A cache directory already configured in JAX (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update("jax_compilation_cache_dir", ...)``) is left as it is. JAX treats the cache
as trusted code: do not point it at a directory others can write to.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

__all__ = ["ENV_VAR", "cache_dir", "enable_compilation_cache"]

#: Environment variable choosing the cache directory or switching the cache off.
ENV_VAR = "DEEPEM_JAX_COMPILATION_CACHE"
_OFF = {"", "0", "off", "false", "no"}
_done = False


def cache_dir() -> Path | None:
    """The directory ``DEEPEM_JAX_COMPILATION_CACHE`` selects (None when switched off)."""
    env = os.environ.get(ENV_VAR)
    if env is None:
        import pooch

        return Path(pooch.os_cache("deepem_jax")) / "jax_cache"
    if env.strip().lower() in _OFF:
        return None
    return Path(env).expanduser()


def enable_compilation_cache() -> Path | None:
    """Switch JAX's persistent compilation cache on at :func:`cache_dir` unless JAX already has
    a cache directory; returns the directory in use (None when off). Only the first call in a
    process reads the environment; later calls return what JAX uses."""
    global _done
    current = jax.config.jax_compilation_cache_dir
    if _done or current:
        _done = True
        return Path(current) if current else None
    _done = True
    path = cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        warnings.warn(
            f"compilation cache {path} cannot be created ({err}); compiling without it "
            f"(set {ENV_VAR} to another directory or to 'off')",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
