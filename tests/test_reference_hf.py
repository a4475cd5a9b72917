"""The embedded model against an independent reference: HF transformers on the same GGUF file."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from shardlm.engine import SamplingParams  # noqa: E402

PROMPTS = [  # (text, chat)
    ("What is the capital of France?", True),
    ("Write a haiku about the sea.", True),
    ("Explain what a KV cache is in one sentence.", True),
    ("The quick brown fox", False),
    ("def fibonacci(n):\n    ", False),
    ("1, 2, 3, 5, 8, 13,", False),
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # decode exactly NEW_TOKENS, through EOS like ignore_eos
    return model.eval()


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
def test_greedy_tokens_equal_hf(llm, hf_model):
    prompts = [llm.encode(text, chat=chat) for text, chat in PROMPTS]
    ours = llm.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for ids, completion in zip(prompts, ours):
        assert completion.token_ids == _hf_greedy(hf_model, ids, NEW_TOKENS), llm.decode(ids)


def test_prompt_logits_match_hf(llm, hf_model, record_property):
    """Logits over a whole prompt (a forward without cache on both sides) agree in float32."""
    ids = llm.encode("What is the capital of France?", chat=True)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(llm_forward(llm, ids))
    diff = float(np.abs(ours - ref).max())
    record_property("max_logit_diff", diff)
    print(f"largest |logit difference| over the {len(ids)}-token prompt: {diff:.2e}")
    assert diff < 2e-3, diff
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def llm_forward(llm, ids):
    """All-position logits [T, V] from one forward over the prompt with a fresh cache."""
    return llm.engine.forward(llm.params, [ids])[0]
