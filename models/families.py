"""Which model class builds a config: one entry per `ModelConfig.family`."""

from __future__ import annotations

from flax import nnx

from shardlm.models.config import ModelConfig


def model_class(config: ModelConfig) -> type[nnx.Module]:
    """The nnx.Module class for `config.family` (imported on use: each family is its own file)."""
    if config.family == "llama":
        from shardlm.models.llama import Llama
        return Llama
    if config.family == "moe":
        from shardlm.models.moe import MoE
        return MoE
    if config.family in ("gemma2", "gemma3"):
        from shardlm.models.gemma import Gemma
        return Gemma
    raise ValueError(f"unknown model family {config.family!r}; known: llama, moe, gemma2, gemma3")
