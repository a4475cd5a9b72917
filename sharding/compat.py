"""The few JAX/Flax version shims (supported: jax 0.10.x on Python 3.11, 0.11.x on 3.12)."""

from __future__ import annotations

import contextlib

import jax

try:  # jax >= 0.7 exports shard_map at the top level (check_vma); older releases in experimental (check_rep)
    _shard_map = jax.shard_map
    _CHECK = "check_vma"
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map

    _CHECK = "check_rep"


def shard_map(f, *, mesh, in_specs, out_specs):
    """shard_map without the replication check (our blocks reduce explicitly, so the check only
    rejects valid programs whose inputs are replicated over the reduced axes)."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK: False})


def cluster_detected() -> bool:
    """Whether jax.distributed.initialize() can find its peers by itself here (Cloud TPU, SLURM,
    Open MPI, ...). JAX keeps its detectors private; without them, assume a single process."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover - jax moved them
        return False
    return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)



@contextlib.contextmanager
def without_compilation_cache():
    """Compiles inside skip JAX's persistent compilation cache, reading and writing (an executable
    XLA:CPU reads back from that cache serializes without its code). JAX decides once per process
    whether its cache is in use: reset_cache makes it decide again, on the way in and out."""
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()
