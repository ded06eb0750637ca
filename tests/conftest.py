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


# ---- balance of the two xdist workers (scripts/test.sh: -n 2 --dist loadfile) ----------------------------------
# loadfile sends whole files; by default xdist queues them by their number of tests, so a slow file with few
# tests (test_faults, test_sharding) could start last and run alone at the end. Queue the slowest files first
# (longest-processing-time-first: the other worker fills in with the small ones). Relative costs, measured with
# --durations on the 2-core machine (seconds, rounded); a file not listed is cheap and goes last. The order
# changes no test's result: each file still runs whole in one worker.
FILE_COST = {
    "test_sharding.py": 500, "test_speculative.py": 230, "test_faults.py": 165, "test_train_speed.py": 130,
    "test_engine.py": 125, "test_contract.py": 110, "test_dlcm.py": 95, "test_spec_edges.py": 70,
    "test_compare.py": 65, "test_bf16.py": 58, "test_mamba_reference.py": 56, "test_spec_stretch.py": 52,
    "test_dlcm_reference.py": 51, "test_dlcm_replicated.py": 45, "test_dlcm_mup.py": 44, "test_train.py": 44,
    "test_samba.py": 41, "test_dlcm_train.py": 39, "test_spec_distribution.py": 38, "test_sampling.py": 26,
    "test_decoder.py": 18, "test_hf.py": 18, "test_sam.py": 13, "test_bad_input.py": 13, "test_cli_errors.py": 12,
    "test_attention.py": 10,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist >= 3.6: keep the collection order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-FILE_COST.get(item.path.name, 0), order[id(item)]))
