"""Tests run on 8 virtual CPU devices; the flag must be set before JAX starts its backend."""

import gc
import os
import shutil
import tempfile

# XLA's backend (LLVM) optimisations off: the tests compile hundreds of small programs whose run time
# is a fraction of their compile time (the suite runs ~1.5x faster). The SPMD partitioner and the
# collectives it emits, which test_layouts checks, are HLO passes. Benchmarks and users get the default.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The commands the tests run share one compilation cache, made for the session (never ~/.cache).
_OWN_CACHE = None if "SHARDLM_COMPILE_CACHE" in os.environ else tempfile.mkdtemp(prefix="shardlm-tests-jax-cache-")
if _OWN_CACHE:
    os.environ["SHARDLM_COMPILE_CACHE"] = _OWN_CACHE
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

# This process too: a program compiled again after jax.clear_caches() (test_layouts frees each
# layout's) or by an equal engine in another module is read back, not recompiled.
jax.config.update("jax_compilation_cache_dir", os.environ["SHARDLM_COMPILE_CACHE"])

from shardlm.checkpoints.loader import embedded_model_path  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """XLA:CPU maps each compiled kernel's code on its own (one SmolLM2 prefill and decode take
    ~1,300 memory maps) and a process may hold 65,530 (vm.max_map_count): a worker that kept every
    module's programs crashed in the compiler partway through the suite. Each module's programs
    are freed when it ends (its fixtures are gone by then; the persistent cache makes a later
    module's compile of the same program a read)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return embedded_model_path()


@pytest.fixture(scope="session")
def llm():
    """The embedded SmolLM2-135M-Instruct, float32, on one device, 4 slots."""
    from shardlm.engine import LLM

    return LLM.load(batch_size=4, max_seq_len=256)


# The heaviest files first (serial seconds on the 2-core machine: 250 .. 57): `make test` runs
# `--dist loadfile --no-loadscope-reorder`, so the two workers take whole files in this order and the
# run ends on short ones instead of one worker alone on a long file. The rest keep their order.
HEAVY_FIRST = ("test_jobs.py", "test_layouts.py", "test_paged_engine.py", "test_server.py", "test_quantization.py",
               "test_notebooks.py", "test_pipeline.py", "test_prefix_jobs.py", "test_checkpoints.py",
               "test_cli_people.py", "test_cli.py", "test_prefix_cache.py", "test_qwen3.py", "test_moe.py",
               "test_expert_parallel.py", "test_gemma.py", "test_gguf_families.py", "test_planner_moe.py",
               "test_batch_jobs.py",
               "test_reference_hf.py", "test_engine.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


def pytest_report_header(config):
    return f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices"


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
