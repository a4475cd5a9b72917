"""Jobs with prefix caching, n samples per line and preemption by recompute (`shardlm run` on the
tiny random GGUF of test_jobs.py): the records with the cache on equal those with it off, the
summary's counters show the shared system message computed once, every sample equals that sample
run alone, and a pool far too small for the job (also on 2 processes) gives an ample pool's records."""

import json
import subprocess

import pytest
from test_jobs import SLOTS, WORDS, job_lines, launch_argv, launcher_env, read_records, write_tiny_gguf  # noqa: F401

from shardlm.engine import LLM, SamplingParams, jobs, scheduler
from shardlm.engine.cli import main

CONTEXT = 512
SYSTEM = "You are a careful assistant. " + " ".join(WORDS[(7 * j) % len(WORDS)] for j in range(290))


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_long") / "tiny.gguf")
    write_tiny_gguf(path, context=CONTEXT, seed=1)
    return path


def shared_lines(n=64) -> list[dict]:
    """n chat lines opening with the same ~300-token system message, each its own question."""
    lines = []
    for i in range(n):
        question = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + i % 17))
        lines.append({"id": i, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                      "max_new_tokens": 4 + i % 5})
    return lines


def _write(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _common_prefix(seqs) -> int:
    n = min(map(len, seqs))
    return next((j for j in range(n) if len({s[j] for s in seqs}) > 1), n)


@pytest.mark.slow
def test_shared_system_message_is_computed_once_and_the_records_do_not_change(tiny_long, tmp_path):
    lines = shared_lines()
    job = _write(tmp_path / "job.jsonl", lines)
    on = LLM.load(tiny_long, max_seq_len=CONTEXT)
    off = LLM.load(tiny_long, max_seq_len=CONTEXT, prefix_cache=False)
    s_on = jobs.run_job(on, job, str(tmp_path / "on.jsonl"), progress=False)
    s_off = jobs.run_job(off, job, str(tmp_path / "off.jsonl"), progress=False)
    records = read_records(tmp_path / "on.jsonl")
    assert records == read_records(tmp_path / "off.jsonl") and len(records) == 64
    ids = [on.encode(line["messages"]) for line in lines]
    P, submitted = on.engine.page_size, sum(map(len, ids))
    shared = _common_prefix(ids) // P * P
    assert shared >= 288  # the system message spans 18 whole pages or more
    assert s_on["prompt_tokens_submitted"] == s_off["prompt_tokens_submitted"] == submitted
    assert s_off["prefill_tokens_computed"] == submitted and s_off["prefix_cache_hit_rate"] is None
    assert s_on["prefill_tokens_computed"] <= shared + sum(len(x) - shared for x in ids)
    assert s_on["prefill_tokens_cached"] >= 63 * shared
    assert s_on["prefix_cache_hit_rate"] == pytest.approx(s_on["prefill_tokens_cached"] / submitted, abs=1e-4)
    # A pool of 64 pages holds ~3 of these sequences: cached pages are evicted and reused, sequences
    # preempted, and the records stay the same.
    small = LLM.load(tiny_long, max_seq_len=CONTEXT, kv_pages=64)
    s_small = jobs.run_job(small, job, str(tmp_path / "small.jsonl"), progress=False)
    assert read_records(tmp_path / "small.jsonl") == records
    assert s_small["prefill_tokens_cached"] > 0 and s_small["prompts"] == 64


def test_n_samples_per_line_each_equal_that_sample_alone(tiny_long, tmp_path):
    llm = LLM.load(tiny_long, max_seq_len=CONTEXT, max_num_seqs=8)
    prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + 9 * i)) for i in range(3)]
    lines = [{"id": i, "prompt": p, "n": 4, "temperature": 0.9, "seed": 3 + i, "max_new_tokens": 6}
             for i, p in enumerate(prompts)]
    lines += [{"id": "one", "prompt": prompts[0], "max_new_tokens": 6},
              {"id": "zero", "prompt": prompts[0], "n": 0},
              {"id": "text", "prompt": prompts[0], "n": "2"},
              {"id": "many", "prompt": prompts[0], "n": 9}]
    job = _write(tmp_path / "job.jsonl", lines)
    summary = jobs.run_job(llm, job, str(tmp_path / "out.jsonl"), progress=False)
    records = read_records(tmp_path / "out.jsonl")
    for i, line in enumerate(lines[:3]):
        r = records[json.dumps(i)]
        assert set(r) == {"id", "choices", "prompt_tokens", "completion_tokens"}
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        sampling = SamplingParams(temperature=0.9, seed=3 + i, max_new_tokens=6, n=4)
        for c in r["choices"]:
            (alone,) = llm.generate(line["prompt"], scheduler.sample_sampling(sampling, c["index"]))
            assert (c["token_ids"], c["finish_reason"], c["text"]) == (alone.token_ids, alone.finish_reason, alone.text)
            assert c["completion_tokens"] == len(c["token_ids"])
        assert r["completion_tokens"] == sum(c["completion_tokens"] for c in r["choices"])
        assert len({tuple(c["token_ids"]) for c in r["choices"]}) > 1
    assert set(records['"one"']) == {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
    errors = {r["id"]: r["error"] for k, r in records.items() if k[0] == "error"}
    assert "n must be an integer >= 1 (samples of the prompt), got 0" in errors["zero"]
    assert '"n" must be an integer, got "2"' in errors["text"]
    assert "n = 9 samples is more than this engine runs at once: at most 8" in errors["many"]
    # Each prompt prefilled once, not once a sample: 3 four-sample prompts and "one".
    assert summary["prefill_tokens_computed"] <= summary["prompt_tokens_submitted"]
    assert summary["prompt_tokens_submitted"] == sum(len(llm.encode(p)) for p in prompts) + len(llm.encode(prompts[0]))


def test_n_samples_bad_input(tiny_long, tmp_path, capsys):
    llm = LLM.load(tiny_long, max_seq_len=CONTEXT, kv_pages=4, max_num_seqs=8)
    prompt = " ".join(WORDS[j % len(WORDS)] for j in range(24))  # ~30 tokens: 2 pages, the last partial
    n_tokens = len(llm.encode(prompt))
    assert n_tokens % 16
    with pytest.raises(ValueError, match=rf"a prompt of {n_tokens} tokens with max_new_tokens 2 and 3 copies of its "
                                         r"partial last page \(n = 4\) needs 5 KV pages of 16 tokens; the pool has 4"):
        llm.generate(prompt, SamplingParams(max_new_tokens=2, n=4))
    assert len(llm.generate(prompt, SamplingParams(max_new_tokens=2, n=3))[0].outputs) == 3  # 2 + 2 copies fit
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        SamplingParams(n=0)
    for argv, fragment in ((["--n", "0"], "n must be an integer >= 1"),
                           (["--n", "300"], "n = 300 samples is more than this engine runs at once: at most")):
        assert main(["generate", "--model", tiny_long, "--max-seq-len", "128", *argv, "hello"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and fragment in err[-1], err


def test_generate_n_prints_each_sample(tiny_long, capsys):
    assert main(["generate", "--model", tiny_long, "--max-seq-len", "128", "--n", "3", "--temperature", "1",
                 "--max-new-tokens", "4", "--json", "--quiet", "the quick brown fox"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == "the quick brown fox" and [c["index"] for c in record["choices"]] == [0, 1, 2]


@pytest.mark.slow
def test_preemption_on_two_processes_gives_the_ample_pools_records(tiny_long, launcher_env, tmp_path):  # noqa: F811
    """20 prompts, every second one opening with the same 30 words, through 2 processes x 4 devices
    with a pool of 12 pages (4 sequences of 3 to 7 pages each would need more): the prefix is shared,
    sequences are preempted and recomputed, the processes' digests agree every step, and the records
    equal those of one process with an ample pool, each once."""
    header = " ".join(WORDS[(3 * j) % len(WORDS)] for j in range(30)) + " "
    lines = []
    for i, line in enumerate(job_lines()[:20]):
        spec = json.loads(line)
        if i % 2 and "prompt" in spec:
            spec["prompt"] = header + spec["prompt"]
        lines.append(spec)
    job = _write(tmp_path / "job.jsonl", lines)
    ample = LLM.load(tiny_long, batch_size=SLOTS, max_seq_len=128)
    jobs.run_job(ample, job, str(tmp_path / "ample.jsonl"), SamplingParams(max_new_tokens=8), progress=False)
    want = read_records(tmp_path / "ample.jsonl")
    output, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    argv = launch_argv(tiny_long, job, output) + ["--kv-pages", "12", "--summary", str(summary)]
    p = subprocess.run(argv, env=launcher_env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_records(output) == want  # read_records fails on a record written twice
    s = json.loads(summary.read_text())
    assert s["kv_preemptions"] > 0 and s["prefill_tokens_cached"] > 0 and s["done"] == 20 and s["pending"] == 0
    line = f"prefix cache hit {s['prefix_cache_hit_rate']:.0%}, {s['prefill_tokens_computed']} of " \
           f"{s['prompt_tokens_submitted']} prompt tokens computed, {s['kv_preemptions']} sequences preempted and recomputed"
    assert line in p.stderr, p.stderr[-2000:]
