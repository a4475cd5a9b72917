"""What the model-family tests compare with: HF transformers' greedy tokens and logits for one
prompt, and shardlm's logits of a loaded model (one full forward, no cache)."""

import numpy as np
import torch

from shardlm.engine import Engine


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n new tokens of transformers' greedy `generate` (the prompt unpadded)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_logits(model, prompt: list[int]) -> np.ndarray:
    """transformers' logits [T, V] of one prompt."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


def shardlm_logits(model, prompt: list[int]) -> np.ndarray:
    """shardlm's logits [T, V] of one prompt through a one-slot dense engine's full forward."""
    engine = Engine(model, batch_size=1, max_seq_len=model.cfg.max_seq_len)
    return np.asarray(engine.forward(engine.params, [prompt])[0])
