"""Running a model: KV cache, sampling, prefill/decode steps, continuous batching, CLI.

The names below are imported on first use (PEP 562), so that `shardlm --help` and the CLI's
argument parsing, which import this package, do not start JAX.
"""

import importlib

_NAMES = {"LLM": "llm", "Completion": "llm", "SamplingParams": "sampling", "Engine": "engine",
          "Prefix": "engine", "DecodeState": "engine", "KVCache": "kv_cache", "PagedEngine": "paged_engine"}

__all__ = ["LLM", "Completion", "SamplingParams", "Engine", "Prefix", "DecodeState", "KVCache", "PagedEngine"]


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
