"""Running a model: KV cache, sampling, prefill/decode steps, continuous batching, CLI."""

from shardlm.engine.engine import DecodeState, Engine, Prefix
from shardlm.engine.kv_cache import KVCache
from shardlm.engine.llm import LLM, Completion
from shardlm.engine.paged_engine import PagedEngine
from shardlm.engine.sampling import SamplingParams

__all__ = ["LLM", "Completion", "SamplingParams", "Engine", "Prefix", "DecodeState", "KVCache", "PagedEngine"]
