"""The typed value of a quantized weight as the projection blocks (blocks.py) and the model's matmuls
see it, and the einsum that understands it (models/quant.py makes them and re-exports both)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """int8 `values` times `scale` over the dims not in `contract` (the matmul's output channels)."""

    values: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float, the weight's shape without the contracted dims
    contract: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    def dequantize(self):
        return self.values.astype(self.scale.dtype) * jnp.expand_dims(self.scale, self.contract)


def einsum(eq: str, x, w, **kw):
    """jnp.einsum(eq, x, w) in x's dtype, for a float w or a QArray (the int8 values, then the output
    times the scale). The scale's dims must be the output's trailing dims, in order."""
    if not isinstance(w, QArray):
        return jnp.einsum(eq, x, w.astype(x.dtype), **kw)
    w_letters, out = eq.split(",")[1].split("->")
    kept = "".join(c for d, c in enumerate(w_letters) if d not in w.contract)
    if not out.endswith(kept):
        raise ValueError(f"einsum {eq!r}: the scale's dims {kept!r} are not the output's trailing dims")
    y = jnp.einsum(eq, x, w.values.astype(x.dtype), **kw)
    return y * w.scale.astype(y.dtype)
