"""JAX's persistent compilation cache, in a user cache directory, for every entry point of the project.

`enable()` points JAX at one directory of compiled XLA executables, so that a rerun of the same program
(resuming a run, rerunning a study, calling `python -m decode` again) loads them instead of compiling:

- where: an explicit path (a CLI's `--compile-cache`), else `$LMARCH_COMPILE_CACHE`, else
  `$XDG_CACHE_HOME/lmarch/jax` (default `~/.cache/lmarch/jax`); `off` (or `0`, `none`, `false`) disables it;
- what: every program, however small or quick to compile (thresholds 0: the tiny configs' programs compile
  in well under JAX's default 1 s threshold and would never be cached); the directory is capped at
  `MAX_BYTES`, least recently used entries first out (JAX's LRU eviction).

Keys are JAX's own (the lowered program, the compile options, the backend and the jax/XLA versions), so a
changed model or flag is a miss, never a wrong hit. The cache is trusted code: keep it in a directory only
you can write. Call `enable()` before the first compilation you want cached; calling it again with another
directory moves the cache (tests point it at a temporary directory).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV = "LMARCH_COMPILE_CACHE"
OFF = ("off", "0", "none", "false", "no")
MAX_BYTES = 4 << 30  # 4 GiB, LRU

_active: str | None = None


def default_dir() -> str | None:
    """The directory `enable()` uses without an explicit path (None: disabled by the environment)."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return None if env.strip().lower() in OFF else str(Path(env).expanduser())
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "lmarch" / "jax")


def enable(path: str | os.PathLike | None = None) -> str | None:
    """Turn the persistent compilation cache on (at `path`, or `default_dir()`); returns the directory used,
    or None when disabled ('off'). Never raises for an unusable directory: the run goes on uncached."""
    global _active
    import jax
    from jax._src import compilation_cache as cc

    if path is not None and str(path).strip().lower() in OFF:
        path = None
        target = None
    else:
        target = str(Path(path).expanduser()) if path is not None else default_dir()
    if target is not None:
        try:
            Path(target).mkdir(parents=True, exist_ok=True)
        except OSError:
            target = None
    if target is not None and not os.access(target, os.W_OK):
        target = None  # read-only: run uncached rather than warn at every compilation
    # A cache write that fails mid-run (a full disk) costs only a later recompilation; JAX warns once per
    # program, a screen of warnings in front of the error that matters (the checkpoint save's one line).
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry",
                            category=UserWarning)
    if target == _active and (target is None or jax.config.jax_compilation_cache_dir == target):
        return target
    if cc.is_initialized():  # JAX initialises its cache once per process: move it explicitly
        cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", target)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    _active = target
    return target


def active() -> str | None:
    """The directory enabled in this process (None if none)."""
    return _active
