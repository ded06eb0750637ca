"""Tests run on CPU with 8 forced host devices so that the sharded paths are exercised (docs/ARCHITECTURE.md, "Folder map")."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = (flags + " --xla_force_host_platform_device_count=8").strip()
# The suite is compile-bound (hundreds of small programs, each run for milliseconds): XLA:CPU's LLVM backend at
# optimisation level 1 instead of 3 compiles them faster (test_dlcm alone: 85 -> 63 CPU s). It changes
# code generation only, not the HLO or its fusions, and XLA:CPU does not use fast-math by default, so values are
# the same (train.loop.init_model compiles at level 1 for the same reason; checked equal there). A level given
# in XLA_FLAGS wins; subprocesses that set their own XLA_FLAGS (test_sharding, test_faults) keep the default.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = flags

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


# ---- balance of the two xdist workers (scripts/test.sh: -n 2 --dist loadfile) ----------------------------------
# loadfile sends whole files; by default xdist queues them by their number of tests, so a slow file with few
# tests (test_faults, test_sharding) could start last and run alone at the end. Queue the slowest files first
# (longest-processing-time-first: the other worker fills in with the small ones). Relative costs, measured with
# --durations on the 2-core machine (s23 whole-suite run under load: seconds / 3); a file not listed is cheap
# and goes last. The order changes no test's result: each file still runs whole in one worker.
FILE_COST = {
    "test_sharding.py": 451, "test_speculative.py": 301, "test_faults.py": 142, "test_contract.py": 72,
    "test_engine.py": 69, "test_compare.py": 64, "test_spec_stretch.py": 50, "test_spec_edges.py": 49,
    "test_dlcm.py": 48, "test_samba.py": 39, "test_bf16.py": 33, "test_train.py": 32, "test_dlcm_reference.py": 29,
    "test_train_speed.py": 29, "test_dlcm_mup.py": 28, "test_mamba_scan.py": 28, "test_dlcm_train.py": 26,
    "test_decoder.py": 24, "test_dlcm_replicated.py": 23, "test_sampling.py": 22, "test_spec_distribution.py": 17,
    "test_attention.py": 11, "test_hf.py": 10, "test_mamba_reference.py": 9, "test_bad_input.py": 6,
    "test_sam.py": 3,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist >= 3.6: keep the collection order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-FILE_COST.get(item.path.name, 0), order[id(item)]))
