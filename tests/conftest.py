"""Tests run on CPU with 8 forced host devices so that the sharded paths are exercised (docs/ARCHITECTURE.md, "Folder map")."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The persistent compilation cache (core/compile_cache.py) that the CLIs enable: a fresh directory per test
# session, so tests neither read nor write the user's ~/.cache/lmarch/jax and run the same on a clean machine.
if "LMARCH_COMPILE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["LMARCH_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="lmarch-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["LMARCH_COMPILE_CACHE"], ignore_errors=True)
