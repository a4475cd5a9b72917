"""Which model class builds a config: one entry per `ModelConfig.family`."""

from __future__ import annotations

from flax import nnx

from shardlm.models.config import ModelConfig


def model_class(config: ModelConfig) -> type[nnx.Module]:
    """The nnx.Module class for `config.family` (imported on use: each family is its own file)."""
    if config.family == "llama":
        from shardlm.models.llama import Llama
        return Llama
    raise ValueError(f"unknown model family {config.family!r}; known: llama")
