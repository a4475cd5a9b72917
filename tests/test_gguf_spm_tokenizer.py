"""GGUF SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral, Mixtral, Gemma).

`sentencepiece` is not installed here, so the vocabulary is trained in this file: a BPE over a small
corpus in SentencePiece's form (spaces as U+2581, digits never merged, as Llama's), each merged piece
scored by its merge order, the 256 <0xXX> byte tokens, the single characters, and control and
user-defined tokens as a llama-style file (Llama 2 / Mistral: <unk> <s> </s>, [INST], a space prefix)
or a Gemma-style one (no prefix, newline pieces, runs of spaces stored as spaces and user-defined, as
llama.cpp's converter writes them, Gemma 2's chat template). The files are tiny models written by
test_gguf_families' writer: a Mixtral as `llama` and a Gemma 2.

References: transformers' own reading of the same GGUF (AutoTokenizer with gguf_file=, its
GGUFLlamaConverter / Gemma builders), and llama.cpp's SPM tokenizer (llm_tokenizer_spm_session and
tokenizer_st_partition in src/llama-vocab.cpp) transcribed below: text split at control and
user-defined tokens (longest first), a space prepended to each stretch of text when
add_space_prefix, spaces escaped as U+2581, then the adjacent pair whose join has the highest score
merged until none joins, and what is not a token written as its bytes. The two readers differ where
transformers' Metaspace(prepend_scheme="first") is not llama.cpp: text that starts with a space, and
text after a special token, get a prefix space only in llama.cpp (and in the Llama 2 tokenizer.json,
whose normalizer prepends it): there, llama.cpp's is the reference.
"""

import heapq
import json
import os
import re
from collections import Counter
from unittest import mock

import pytest
import test_gguf_families

from shardlm.checkpoints.gguf import CheckpointError, read_metadata
from shardlm.checkpoints.tokenizer import tokenizer_from_file, tokenizer_from_gguf_metadata
from shardlm.engine.detokenize import TextStream

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPACE = "\u2581"
CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps, the fox runs away into the forest.
Hello world! Hello there, how are you today? I am fine, thank you. What is the capital of France?
The capital of France is Paris. Paris is a beautiful city with many museums and parks.
def main(args):
    return tokenize(text) + decode(ids)  # comment
Numbers like 12345 and 3.14 are split into digits. Tokenizers merge the most frequent pairs of pieces.
Some unicode: café naïve résumé Ünïcödé, 日本語 and 中文 text, “quotes” — dashes.
this is a test of the tokenizer on a sentence with spaces and newlines
the the the and and of of to to in in is is it it that that this this with with for for
"""
N_MERGES = 300

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Where transformers' reader and llama.cpp agree (no leading space, no text after a special token).
SHARED = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "the capital of France is Paris",
    "Hello, world! How are you?",
    "multiple   spaces  between    words",
    "trailing spaces   ",
    "line one\nline two\n\nline four",
    "tabs\tand\r\ncarriage returns",
    "12345 and 3.14, 1,000,000 or 2024-06-01",
    "def f(x):\n    return x * 2  # double",
    "café naïve résumé Ünïcödé",
    "日本語 and 中文, 한국어 too",
    "emoji 🙂 and 🚀🚀 fall back to bytes",
    "unknown chars: ß ø ñ Ω ∑ √",
    "“quotes” — dashes … ellipsis",
    "theforestruns",
    "tokenizer tokenizers tokenize",
    "a",
    "x",
    "",
]
# Where they may differ: llama.cpp's prefix space at the start of text that begins with a space and
# after special tokens (a Gemma-style file has none, so there they agree again), and runs of spaces
# longer than Gemma's longest user-defined one.
LLAMA_CPP_ONLY = [
    " leading space",
    "   three leading spaces",
    "\nstarts with a newline",
    " ",
    "[INST] What is the capital of France? [/INST]",
    "<s>Hello</s> world",
    "text<unk>more",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "a     b (five spaces)",
]


# ----- a SentencePiece-style vocabulary, trained here -----

def _train(corpus: str, n_merges: int, newlines: bool) -> list[str]:
    """Merged pieces in merge order: the most frequent adjacent pair first (ties by the pair's text)."""
    text = corpus.replace(" ", SPACE)
    words = Counter(re.findall(rf"{SPACE}?[^{SPACE}\n]+|\n+" if newlines else rf"{SPACE}?[^{SPACE}\n]+", text))
    words = {tuple(w): c for w, c in words.items()}
    pieces: list[str] = []
    while len(pieces) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                if not (any(ch.isdigit() for ch in a + b)):
                    pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if a + b not in pieces:
            pieces.append(a + b)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return pieces


def spm_vocab(style: str) -> dict:
    """tokens, scores, token types, special ids and flags of a llama-style or gemma-style vocabulary."""
    gemma = style == "gemma"
    pieces = _train(CORPUS, N_MERGES, newlines=gemma)
    chars = sorted({ch for ch in CORPUS.replace(" ", SPACE) if ch != "\n"}) + (["\n"] if gemma else [])
    if gemma:
        head = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 3),
                ("<start_of_turn>", 3), ("<end_of_turn>", 3), ("  ", 4), ("   ", 4), ("    ", 4)]
    else:
        head = [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("[INST]", 3), ("[/INST]", 3)]
    tokens = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    types = [ty for _, ty in head] + [6] * 256 + [1] * (len(pieces) + len(chars))
    # Merged pieces score by merge order; single characters below them (never a merge's result anyway);
    # user-defined tokens -1000 as llama.cpp's converter writes them.
    scores = ([-1000.0 if ty == 4 else 0.0 for _, ty in head] + [0.0] * 256
              + [-float(i) for i in range(len(pieces))] + [-float(N_MERGES + i) for i in range(len(chars))])
    assert len(set(tokens)) == len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    if gemma:
        return dict(tokens=tokens, scores=scores, types=types, bos=ids["<bos>"], eos=ids["<eos>"], unk=ids["<unk>"],
                    pad=ids["<pad>"], add_space_prefix=False, chat_template=GEMMA2_TEMPLATE)
    return dict(tokens=tokens, scores=scores, types=types, bos=ids["<s>"], eos=ids["</s>"], unk=ids["<unk>"],
                pad=None, add_space_prefix=True, chat_template=None)


def _spm_tokenizer_keys(vocab: dict):
    """test_gguf_families' `_tokenizer_keys`, writing this vocabulary as llama.cpp's converter does."""
    def write(w, vocab_size):
        assert vocab_size == len(vocab["tokens"])
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(vocab["eos"])
        w.add_unk_token_id(vocab["unk"])
        if vocab["pad"] is not None:
            w.add_pad_token_id(vocab["pad"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(vocab["add_space_prefix"])
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])
    return write


# style -> (gguf arch, the HF model of test_gguf_families' cases with this vocabulary's size)
MODELS = {
    "llama": ("llama", lambda v: test_gguf_families._moe("mixtral", vocab_size=v)),
    "gemma": ("gemma2", lambda v: test_gguf_families._gemma("gemma2", query_pre_attn_scalar=16, vocab_size=v)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def spm(request, tmp_path_factory):
    """(style, vocabulary, HF model, GGUF path, our tokenizer, transformers' tokenizer of the GGUF)."""
    import transformers

    style = request.param
    vocab = spm_vocab(style)
    arch, build = MODELS[style]
    model = build(len(vocab["tokens"]))
    path = str(tmp_path_factory.mktemp(style) / f"tiny-{style}.gguf")
    with mock.patch.object(test_gguf_families, "_tokenizer_keys", _spm_tokenizer_keys(vocab)):
        test_gguf_families.write_gguf(model, path, arch)
    ours = tokenizer_from_gguf_metadata(read_metadata(path))
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return style, vocab, model, path, ours, ref


# ----- llama.cpp's SPM tokenizer, transcribed -----

def llama_cpp_tokenize(text: str, vocab: dict) -> list[int]:
    """llama_vocab::impl::tokenize for LLAMA_VOCAB_TYPE_SPM with parse_special, add_special=false."""
    tokens, scores = vocab["tokens"], vocab["scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    special = sorted((i for i, ty in enumerate(vocab["types"]) if ty in (2, 3, 4)), key=lambda i: -len(tokens[i]))
    fragments: list = [text] if text else []
    for i in special:  # tokenizer_st_partition: longest special token first
        split = []
        for f in fragments:
            if isinstance(f, int):
                split.append(f)
                continue
            for k, part in enumerate(f.split(tokens[i])):
                split += ([i] if k else []) + ([part] if part else [])
        fragments = split
    out, prev_special = [], True
    for f in fragments:
        if isinstance(f, int):
            out.append(f)
            prev_special = True
            continue
        text = ((" " if vocab["add_space_prefix"] and prev_special else "") + f).replace(" ", SPACE)
        prev_special = False
        sym = list(text)  # UTF-8 characters
        prev, nxt = list(range(-1, len(sym) - 1)), list(range(1, len(sym))) + [-1]
        queue = []

        def bigram(left, right):
            if left >= 0 and right >= 0 and sym[left] + sym[right] in ids:
                joined = sym[left] + sym[right]  # highest score first, then the leftmost
                heapq.heappush(queue, (-scores[ids[joined]], left, right, len(joined)))

        for i in range(1, len(sym)):
            bigram(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue  # outdated
            sym[left], sym[right] = sym[left] + sym[right], ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            bigram(prev[left], left)
            bigram(left, nxt[left])
        i = 0
        while i != -1:
            if sym[i] in ids:
                out.append(ids[sym[i]])
            else:  # byte fallback
                out += [ids[f"<0x{b:02X}>"] for b in sym[i].encode("utf-8")]
            i = nxt[i]
    return out


# ----- the tokenizer -----

def test_vocabulary_shape(spm):
    """The trained vocabulary is what a SentencePiece GGUF holds: bytes, merged pieces, characters."""
    style, vocab, _, path, ours, ref = spm
    meta = read_metadata(path)
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert len([t for t in vocab["tokens"] if t.startswith(SPACE) and len(t) > 3]) > 100  # real word pieces
    assert ours.vocab_size == len(vocab["tokens"]) == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (vocab["bos"], vocab["eos"])
    assert ours.add_bos is True  # tokenizer.ggml.add_bos_token


@pytest.mark.parametrize("text", SHARED)
def test_ids_equal_transformers_and_llama_cpp(spm, text):
    """The same ids as transformers' reader and llama.cpp's algorithm; decode(encode(s)) == s."""
    _, vocab, _, _, ours, ref = spm
    ids = ours.encode(text, add_bos=False)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ids == llama_cpp_tokenize(text, vocab)
    assert ours.decode(ids) == text == ref.decode(ids)
    assert ours.encode(text) == [vocab["bos"]] + ids


@pytest.mark.parametrize("text", LLAMA_CPP_ONLY)
def test_ids_equal_llama_cpp_at_leading_spaces_and_special_tokens(spm, text):
    """llama.cpp's ids where transformers' reader differs. Special tokens written in the text are single
    ids; without them, decode(encode(s)) == s. Gemma-style (no prefix space): transformers' ids too,
    but for five spaces (transformers joins U+2581 pairs, llama.cpp matches the longest user-defined run)."""
    style, vocab, _, _, ours, ref = spm
    ids = ours.encode(text, add_bos=False)
    assert ids == llama_cpp_tokenize(text, vocab)
    specials = [t for t, ty in zip(vocab["tokens"], vocab["types"]) if ty in (2, 3) and t in text]
    for t in specials:
        assert vocab["tokens"].index(t) in ids
    if not specials:
        assert ours.decode(ids) == text
    if style == "gemma" and "five" not in text:
        assert ids == ref.encode(text, add_special_tokens=False)


def test_prefix_space_as_llama_cpp_and_llama2_tokenizer_json(spm):
    """The llama-style file's prefix space: one before the text and one after each special token
    (llama.cpp; the Llama 2 tokenizer.json's Prepend normalizer does the same). transformers' reader
    (Metaspace "first") gives the first only and none to text starting with a space."""
    style, vocab, _, _, ours, ref = spm
    if style != "llama":
        pytest.skip("a Gemma-style file has no prefix space")
    tokens = ours.encode("<s>Hello", add_bos=False)
    assert [vocab["tokens"][i] for i in tokens][:2] == ["<s>", SPACE + "Hello"]
    assert vocab["tokens"][ours.encode(" Hello", add_bos=False)[0]] == SPACE  # "▁▁Hello": ▁ then ▁Hello
    assert vocab["tokens"][ref.encode(" Hello", add_special_tokens=False)[0]] == SPACE + "Hello"


def test_defaults_of_absent_keys(spm):
    """Without tokenizer.ggml.add_space_prefix and add_bos_token, llama.cpp's SPM defaults: both on."""
    _, vocab, _, path, _, _ = spm
    meta = {k: v for k, v in read_metadata(path).items()
            if k not in ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token")}
    tok = tokenizer_from_gguf_metadata(meta)
    text = "Hello world, the fox"
    assert tok.encode(text) == [vocab["bos"]] + llama_cpp_tokenize(text, dict(vocab, add_space_prefix=True))
    assert tok.decode(tok.encode(text)) == text


def test_special_and_user_defined_tokens(spm):
    """Control tokens (and <unk>) are special: single ids, skipped by decode; user-defined ones (Gemma's
    runs of spaces) are single ids kept by decode; byte tokens are never matched in text."""
    style, vocab, _, _, ours, _ = spm
    ids = {t: i for i, t in enumerate(vocab["tokens"])}
    eos = vocab["tokens"][vocab["eos"]]
    assert ours.encode(f"hi{eos}", add_bos=False)[-1] == vocab["eos"]
    assert ours.decode(ours.encode(f"hi{eos}", add_bos=False)) == "hi"
    assert ours.decode(ours.encode(f"hi{eos}", add_bos=False), skip_special_tokens=False) == f"hi{eos}"
    assert ours.encode("<0x41>", add_bos=False) != [ids["<0x41>"]]
    assert ours.vocab_size == len(ids) and ours.eos_token_id in ours.stop_token_ids
    if style == "gemma":
        assert ids["<end_of_turn>"] in ours.stop_token_ids
        assert ours.encode("a    b", add_bos=False) == [ids["a"], ids["    "], ids["b"]]
        assert ours.decode([ids["a"], ids["    "], ids["b"]]) == "a    b"


def test_decode_token_by_token(spm):
    """engine/detokenize's TextStream over the ids one at a time: the text, with emoji and CJK falling
    back to bytes (held back until whole) and each piece's space restored between tokens."""
    _, vocab, _, _, ours, _ = spm
    text = "Hello world 🙂 日本語 ß and the fox\nrunning  twice"
    ids = ours.encode(text, add_bos=False)
    assert sum(vocab["types"][i] == 6 for i in ids) >= 6  # the emoji's 4 bytes, ß's 2
    stream, seen = TextStream(ours), []
    for i in ids:
        stream.add(i)
        assert not stream.text.endswith("\ufffd")
        seen.append(stream.take())
    stream.finish()
    seen.append(stream.take())
    assert "".join(seen) == text
    assert ours.token_text(vocab["bos"]) == vocab["tokens"][vocab["bos"]]  # what save_tokenizer writes


def test_saved_tokenizer_json_reads_back(spm, tmp_path):
    """Saved as tokenizer.json (what `shardlm convert` writes) it encodes and decodes the same."""
    from shardlm.checkpoints.orbax_io import save_tokenizer

    _, _, _, _, ours, _ = spm
    save_tokenizer(ours, str(tmp_path))
    again = tokenizer_from_file(str(tmp_path / "tokenizer.json"))
    assert (again.bos_token_id, again.eos_token_id, again.add_bos) == (ours.bos_token_id, ours.eos_token_id, True)
    for text in SHARED + LLAMA_CPP_ONLY:
        assert again.encode(text) == ours.encode(text)
        assert again.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_merges_from_the_vocabulary(spm):
    """Every split of a token into two tokens is a merge, ranked by the joined token's score."""
    _, vocab, _, _, ours, _ = spm
    model = json.loads(ours._tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    assert model["byte_fallback"] and len(merges) >= N_MERGES
    score = dict(zip(vocab["tokens"], vocab["scores"]))
    ranks = [score[a + b] for a, b in merges]
    assert ranks == sorted(ranks, reverse=True)
    assert (SPACE + "t", "he") in merges and (SPACE + "th", "e") in merges  # both splits of ▁the


def test_unknown_tokenizer_model_names_the_supported_ones(spm):
    meta = read_metadata(spm[3])
    with pytest.raises(CheckpointError, match=r"unsupported GGUF tokenizer model 'bert'.*'gpt2'.*'llama'"):
        tokenizer_from_gguf_metadata(dict(meta, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(CheckpointError, match=r"5 tokens but 4 scores"):
        tokenizer_from_gguf_metadata(dict(meta, **{"tokenizer.ggml.tokens": ["a"] * 5,
                                                   "tokenizer.ggml.scores": [0.0] * 4}))


# ----- a model with this tokenizer, end to end -----

PROMPT = "The capital of France is Paris. Hello world 🙂"


@pytest.mark.slow
def test_llm_generate_from_text_equals_transformers(spm, capsys):
    """LLM.load on the GGUF and `shardlm generate`: the prompt's ids are transformers' (BOS added as the
    file says), the greedy tokens are HF's model's from those ids, the text is their decoding."""
    from hf_reference import hf_greedy

    from shardlm.engine import SamplingParams
    from shardlm.engine.cli import main
    from shardlm.engine.llm import LLM

    style, vocab, model, path, _, ref = spm
    expected_ids = ref.encode(PROMPT)  # add_special_tokens: BOS, as tokenizer.ggml.add_bos_token says
    assert expected_ids[0] == vocab["bos"] and expected_ids.count(vocab["bos"]) == 1
    llm = LLM.load(path, max_num_seqs=1, max_seq_len=128)
    assert llm.encode(PROMPT) == expected_ids
    new = 8
    out = llm.generate([PROMPT], SamplingParams(max_new_tokens=new, ignore_eos=True))[0]
    assert out.prompt_token_ids == expected_ids
    assert out.token_ids == hf_greedy(model, expected_ids, new)
    assert out.text == ref.decode(out.token_ids, skip_special_tokens=True)
    rc = main(["generate", "--model", path, "--json", "--quiet", "--max-new-tokens", str(new), "--ignore-eos",
               "--max-seq-len", "128", PROMPT])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and record["prompt_tokens"] == len(expected_ids) and record["token_ids"] == out.token_ids
    if style == "gemma":  # the chat template writes <bos> itself: one BOS, as transformers' ids
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert llm.tokenizer.apply_chat_template(messages) == prompt
        assert llm.encode("What is the capital of France?", chat=True) == ref.encode(prompt, add_special_tokens=False)
