"""Tokenizers from GGUF metadata or a HF `tokenizer.json`, built on HF `tokenizers`, plus chat templates.

A GGUF carries no `tokenizer.json`, only the vocabulary and what llama.cpp needs to run it, so the
tokenizer is rebuilt to do what llama.cpp does with it (src/llama-vocab.cpp), since llama.cpp is
what the GGUF was made for. Two kinds (`tokenizer.ggml.model`):

- `gpt2`, byte-level BPE (Llama 3, Qwen, SmolLM2): the vocabulary, the merges and a pre-tokenizer
  *name* (`tokenizer.ggml.pre`). The splitting regexes for each name are the ones llama.cpp
  applies (`llm_tokenizer_bpe`). Each regex in a list further splits the pieces of the one before,
  keeping matches and the text between them, which is exactly `tokenizers`' `Split(behavior="isolated")`.
- `llama`, SentencePiece (Llama 2, Mistral, Mixtral, Gemma): tokens with scores and no merges.
  llama.cpp's `llm_tokenizer_spm` starts from the characters of the text (spaces written as U+2581,
  one prepended when `tokenizer.ggml.add_space_prefix`, by default) and repeatedly joins the
  adjacent pair whose join is the highest-scoring token; what is left out of the vocabulary falls
  back to its bytes, the <0xXX> tokens. That is a BPE whose merges are every split of every token
  into two tokens, ranked by the joined token's score: transformers' GGUF reader builds it the same
  way (`generate_merges`, with its tie order).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from shardlm.checkpoints.gguf import CheckpointError

# GGUF token types (llama.cpp `llama_token_type`): 1 normal, 5 unused and 6 byte are plain vocabulary.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_SPACE = "\u2581"  # SentencePiece's visible space

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp spells out the case-insensitive contractions because std::regex lacks `(?i:...)`; the
# Oniguruma regexes of `tokenizers` have it, so these are the original tokenizer.json forms.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Digits one by one, then GPT-2: SmolLM's (StarCoder's) tokenizer.json has Digits(individual_digits)
# before ByteLevel, and llama.cpp writes the same as the regex `\p{N}` before the GPT-2 regex.
_DIGITS_GPT2 = [r"\p{N}", _GPT2]
# llama.cpp's fallback for "default" (and for a missing `pre`).
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (regexes, add_bos when the GGUF does not say, ignore_merges), as in llama.cpp.
_LLAMA3_PRE = ([_LLAMA3], True, True)  # Llama 3 looks a whole piece up in the vocab before merging
_PRE: dict[str, tuple[list[str], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    "gpt-2": ([_GPT2], False, False),
    "gpt2": ([_GPT2], False, False),  # llama.cpp only knows "gpt-2"; accept the obvious spelling too
    "mpt": ([_GPT2], False, False),
    "olmo": ([_GPT2], False, False),
    "smollm": (_DIGITS_GPT2, False, False),
    "starcoder": (_DIGITS_GPT2, False, False),
    "refact": (_DIGITS_GPT2, False, False),
    "codeshell": (_DIGITS_GPT2, False, False),
    "llama-bpe": _LLAMA3_PRE,
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
    "falcon3": _LLAMA3_PRE,
    "dbrx": ([_LLAMA3], False, False),
    "smaug-bpe": ([_LLAMA3], False, False),
    "qwen2": ([_QWEN2], False, False),
    "stablelm2": ([_QWEN2], False, False),
    "megrez": ([_QWEN2], False, False),
}

# Chat end-of-turn tokens: generation stops there as well as at EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """Text <-> token ids, and chat messages -> prompt text, for one model."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        vocab_size: int | None = None,
        eot_token_id: int | None = None,
    ):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = vocab_size if vocab_size is not None else tok.get_vocab_size(with_added_tokens=True)
        stops = [eos_token_id, eot_token_id] + [tok.token_to_id(t) for t in _END_OF_TURN]
        self.stop_token_ids = list(dict.fromkeys(i for i in stops if i is not None))  # ordered, no repeats
        self._template = None  # compiled on first use

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it (like `<|im_start|>`) become single ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        # A chat template that writes the BOS token itself (Gemma's, Llama 3's) gets no second one.
        wants_bos = self.add_bos if add_bos is None else add_bos
        if wants_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int | None) -> str | None:
        """The text of one token, special tokens included (None for None)."""
        return None if token_id is None else self._tok.decode([token_id], skip_special_tokens=False)

    def save(self, path: str) -> None:
        """Write the tokenizer as a tokenizer.json file."""
        self._tok.save(path)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, rendered as HF transformers renders it."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; build the prompt text yourself and use encode()")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self.bos_token_id),
            eos_token=self.token_text(self.eos_token_id),
        )


def _compile_chat_template(source: str):
    """The jinja2 setup of transformers' `_compile_jinja_template`: templates come from model files,
    so they run sandboxed; trim_blocks/lstrip_blocks and a JSON `tojson` change what they render."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer described by the metadata of a GGUF file (`gguf.read_metadata`)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_from_gguf(meta)
    if kind != "gpt2":
        raise CheckpointError(
            f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model); supported: 'gpt2' (byte-level "
            "BPE) and 'llama' (SentencePiece)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise CheckpointError(
            f"unknown GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {', '.join(sorted(_PRE))}"
        )
    regexes, default_add_bos, ignore_merges = _PRE[pre]
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    # Control and user-defined tokens are stored as plain text, the rest in GPT-2's byte alphabet;
    # both go into the BPE vocabulary so that every id maps back to its own string.
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # Like llama.cpp, match these whole wherever they are written in the text, before splitting.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )
    return Tokenizer(
        tok,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=meta.get("tokenizer.chat_template"),
        vocab_size=len(tokens),
        eot_token_id=meta.get("tokenizer.ggml.eot_token_id"),
    )


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best first: by the joined token's score, then longer
    left and right parts, then the tokens' order (transformers' `generate_merges`; ties are rare)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    best: dict[str, float] = {}
    for t, score in zip(tokens, scores):
        best[t] = score  # a repeated token keeps its first place and its last score, as a dict does
    merges = [(t[:k], t[k:], score) for t, score in best.items() for k in range(1, len(t))
              if t[:k] in vocab and t[k:] in vocab]
    merges.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """`tokenizer.ggml.model = "llama"`: llama.cpp's SPM tokenizer as a byte-fallback BPE (module docstring).

    Control and unknown tokens (`<s>`, `<start_of_turn>`, `<unk>`) are matched whole wherever they are
    written and are special; user-defined ones too, but not special (Gemma's runs of spaces, stored as
    spaces). Each stretch of text between them gets the prefix space, as llama.cpp gives the text after
    a special token one; decoding takes one leading space off again. `add_eos_token` is not applied:
    a prompt for generation does not end in EOS."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * n
    if len(scores) != n or len(types) != n:
        raise CheckpointError(
            f"GGUF tokenizer: {n} tokens but {len(scores)} scores and {len(types)} token types"
        )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for SPM
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(
        vocab, _merges_from_scores(tokens, scores), byte_fallback=True, fuse_unk=True,
        unk_token=tokens[unk] if unk is not None and 0 <= unk < n else None,
    ))
    replace = normalizers.Replace(" ", _SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return Tokenizer(
        tok,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),  # llama.cpp's default for SPM
        chat_template=meta.get("tokenizer.chat_template"),
        vocab_size=n,
        eot_token_id=meta.get("tokenizer.ggml.eot_token_id"),
    )


def tokenizer_from_file(path: str) -> Tokenizer:
    """A HF `tokenizer.json`, with chat template, BOS/EOS and add_bos from a sibling
    `tokenizer_config.json` (and `chat_template.jinja`, where newer checkpoints keep the template)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"tokenizer file does not exist: {path}")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(f"cannot read tokenizer file {path}: {e}") from None
    folder = os.path.dirname(path)
    config: dict[str, Any] = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            config = json.load(f)

    def token_id(key: str) -> int | None:
        token = config.get(key)
        if isinstance(token, dict):  # serialized AddedToken
            token = token.get("content")
        return None if token is None else tok.token_to_id(token)

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file) as f:
            template = f.read()
    bos = token_id("bos_token")
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        # Fast tokenizers add BOS in tokenizer.json's post-processor; see whether this one does.
        add_bos = bos is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos]
    return Tokenizer(
        tok, bos_token_id=bos, eos_token_id=token_id("eos_token"), add_bos=bool(add_bos), chat_template=template
    )
