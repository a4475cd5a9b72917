"""sharding.report.placement_report: each row's PartitionSpec, shard shape and bytes are the arrays' own."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shardlm.sharding.report import placement_report
from shardlm.sharding.rules import KV_CACHE_AXES, ShardingRules

RULES = ShardingRules.of({"mlp": ("x", "y"), "vocab": "y", "attn_batch": "x", "attn_kv_heads": "y"})


class Layer(nnx.Module):
    def __init__(self):
        self.up = nnx.Param(jnp.ones((8, 16)), axes=("embed", "mlp"))
        self.norm = nnx.Param(jnp.ones((8,)), axes=("embed",))


class Tiny(nnx.Module):
    def __init__(self):
        self.embed = nnx.Param(jnp.ones((32, 8)), axes=("vocab", "embed"))
        self.layers = nnx.List([Layer() for _ in range(3)])


def placed(mesh):
    """A tiny model's state and a 2-layer cache, every array put in its sharding under RULES."""
    state = nnx.state(Tiny())
    flat = [(path, var.replace(jax.device_put(var[...], RULES.sharding(mesh, var.get_metadata()["axes"], var.shape))))
            for path, var in nnx.to_flat_state(state)]
    kv = NamedSharding(mesh, RULES.spec(KV_CACHE_AXES, (4, 16, 2, 4), mesh))
    cache = {"k": [jax.device_put(np.zeros((4, 16, 2, 4), np.float32), kv) for _ in range(2)],
             "v": [jax.device_put(np.zeros((4, 16, 2, 4), np.float32), kv) for _ in range(2)]}
    return nnx.from_flat_state(flat), cache


def check_rows(report, state, cache):
    arrays = {".".join("*" if isinstance(p, int) else str(p) for p in path): var[...]
              for path, var in nnx.to_flat_state(state)}
    arrays.update({f"{name}.*": layers[0] for name, layers in cache.items()})
    assert {r.name for r in report.rows} == set(arrays)
    for r in report.rows:
        x = arrays[r.name]
        shard = x.addressable_shards[0].data
        assert r.shape == x.shape and r.spec == x.sharding.spec
        assert r.shard_shape == shard.shape and r.shard_bytes == shard.nbytes
        assert r.count == (3 if r.name.startswith("layers.") else 2 if r.group == "cache" else 1)
        assert r.name in report.text and str(r.spec) in report.text
    leaves = jax.tree.leaves((jax.tree.leaves(state), cache))
    device = jax.devices()[0]
    held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)
    assert report.bytes_per_device["params"] + report.bytes_per_device["cache"] == held


def test_one_device():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("x", "y"))
    state, cache = placed(mesh)
    report = placement_report(state, cache)
    check_rows(report, state, cache)
    assert all(r.shard_shape == r.shape for r in report.rows)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (tests/conftest.py makes 8 CPU devices)")
def test_four_devices():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("x", "y"))
    state, cache = placed(mesh)
    report = placement_report(state, cache)
    check_rows(report, state, cache)
    rows = {r.name: r for r in report.rows}
    assert rows["layers.*.up"].spec == PartitionSpec(None, ("x", "y")) and rows["layers.*.up"].shard_shape == (8, 4)
    assert rows["embed"].shard_shape == (16, 8)  # vocab over y
    assert rows["k.*"].axes == KV_CACHE_AXES and rows["k.*"].shard_shape == (2, 16, 1, 4)
    assert rows["layers.*.norm"].shard_shape == (8,)  # replicated: each device holds all of it
    # A mapping of (array, axes) gives the same rows as the State.
    flat = {tuple(path): (var[...], var.get_metadata()["axes"]) for path, var in nnx.to_flat_state(state)}
    assert placement_report(flat, cache).rows == report.rows
    per_device = sum(math.prod(r.shard_shape) * 4 * r.count for r in report.rows)
    assert sum(report.bytes_per_device.values()) == per_device
