"""Device meshes over the axes of Pope et al.: `stage` (pipeline) and the torus axes x, y, z."""

from __future__ import annotations

import math

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh

AXES = ("stage", "x", "y", "z")


def parse_mesh(text: str) -> dict[str, int]:
    """'x=2,y=2,z=2' -> {'x': 2, 'y': 2, 'z': 2}."""
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit():
            raise ValueError(f"bad mesh {text!r}: expected axis=size pairs like x=2,y=2,z=2")
        if name.strip() in shape:  # x=2,x=4 is a mistake, not x=4
            raise ValueError(f"bad mesh {text!r}: axis {name.strip()!r} is given twice")
        shape[name.strip()] = int(size)
    return shape


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes (stage, x, y, z); axes not given have size 1.

    Uses every device (all hosts' in a multi-host job) unless `devices` is given; the product of
    the sizes must equal the device count.
    """
    shape = dict(shape or {})
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; allowed: {', '.join(AXES)}")
    bad = {a: s for a, s in shape.items() if not isinstance(s, int) or s < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be integers >= 1, got {bad}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(shape.get(a, 1) for a in AXES)
    need = math.prod(sizes)
    if need != len(devices):
        hint = ("" if need < len(devices) else
                "; for experiments on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "(or jax.config.update('jax_num_cpu_devices', N)) before JAX starts")
        raise ValueError(f"mesh {shape or '{}'} needs {need} devices but there are {len(devices)} "
                         f"({jax.default_backend()}){hint}")
    try:  # topology-aware order where the platform has one (TPU torus, GPU NVLink domains)
        arr = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, AXES)
