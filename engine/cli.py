"""The `shardlm` command. User mistakes exit 2 with one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import tempfile
import time


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


_QUIET = False  # --quiet: no status lines or summary on stderr (errors still)


def _status(msg: str) -> None:
    if not _QUIET:
        print(msg, file=sys.stderr, flush=True)


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens to generate per prompt (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    p.add_argument("--seed", type=int, default=0, help="a 32-bit integer (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")


def _n_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--n", type=int, default=1, help=f"samples of each {what}, its prompt prefilled once (default 1; "
                   "sample i is seeded from --seed and i)")


def _sampling(args):
    from shardlm.engine.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos, n=getattr(args, "n", 1))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file, Hugging Face folder or shardlm checkpoint "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 (f32) or bfloat16 (bf16) (default float32)")
    p.add_argument("--max-num-seqs", "--batch-size", dest="batch_size", type=int, default=None,
                   help="sequences decoded together (default: from the KV pool's size, at most 256)")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per sequence, prompt plus generated "
                   "(default: the model's context; 1024 with pipeline stages)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens per prefill step, a multiple of 16 (default 512 on CPU, 2048 on GPU/TPU)")
    p.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default 16)")
    p.add_argument("--kv-pages", type=int, default=None,
                   help="KV pages in the pool (default: what --memory-fraction leaves beside the weights)")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="share of a device's memory for weights and KV pages (default 0.9 on GPU/TPU, 0.1 on CPU)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt whole (default: prompts that begin alike share that prefix's KV pages)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. x=2,y=2,z=2 (default: one device)")
    p.add_argument("--layout", default=None, help="layout for both phases (see `shardlm layouts`)")
    p.add_argument("--prefill-layout", default=None, help="layout for prefill only")
    p.add_argument("--decode-layout", default=None, help="layout for decode only")
    p.add_argument("--attention", default="auto", choices=["auto", "heads", "batch"],
                   help="attention sharding: heads, batch (KV cache split by rows) or auto (default)")
    p.add_argument("--microbatches", type=int, default=None,
                   help="with --mesh stage=N: microbatches per step in the pipeline (default N)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent compilation cache: a later run with the same model, mesh and layout compiles "
                   "nothing it compiled before (default $SHARDLM_COMPILE_CACHE, else ~/.cache/shardlm/jax; any "
                   "path JAX's cache takes, e.g. gs://...)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing")
    _quant_args(p)


def _compile_cache(args) -> None:
    """Point JAX's persistent compilation cache at --compile-cache (or its default) before anything
    compiles; a local directory that cannot be written is refused before the model loads."""
    if args.no_compile_cache:
        if args.compile_cache:
            raise UsageError("give --compile-cache DIR or --no-compile-cache, not both")
        return
    path = args.compile_cache or os.environ.get("SHARDLM_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shardlm", "jax")
    if "://" not in path:  # a bucket is JAX's to reach; a local path is checked here
        path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path):
                pass
        except OSError as e:
            raise UsageError(f"--compile-cache {path} cannot be written ({e.strerror or e}); give a writable "
                             f"directory or --no-compile-cache") from None
    import warnings

    import jax

    from shardlm.engine import programs

    plain = warnings.formatwarning  # the store's warnings as one line each: what and that the run goes on
    warnings.formatwarning = lambda message, category, *a, **kw: (
        f"warning: {message}\n" if category is programs.ProgramStoreWarning else plain(message, category, *a, **kw))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program, so a rerun compiles none
    programs.set_directory(path)  # the paged engine's step programs too, so a rerun traces none


def _quant_args(p: argparse.ArgumentParser, kv_cache: bool = True) -> None:
    p.add_argument("--quantize", default=None, help="int8: int8 weights with per-output-channel scales "
                   "(default: none)")
    if kv_cache:
        p.add_argument("--kv-cache", default=None, help="int8: int8 KV cache with per-token, per-head scales "
                       "(default: the model's dtype)")


def _load_llm(args):
    from tqdm import tqdm

    from shardlm.engine.llm import LLM
    from shardlm.models import quant

    quant.check_mode(args.quantize), quant.check_kv_mode(args.kv_cache)  # before the (slow) load
    _compile_cache(args)
    _status("loading model ...")
    from shardlm.sharding.mesh import parse_mesh
    from shardlm.sharding.pipeline import stages_in

    mesh_shape = parse_mesh(args.mesh) if args.mesh else None
    _check_microbatches(args, stages_in(mesh_shape), args.batch_size or 8, "--max-num-seqs")
    with tqdm(desc="loading weights", unit=" tensors", file=sys.stderr, leave=False,
              disable=True if _QUIET else None) as bar:
        llm = LLM.load(args.model, mesh_shape=mesh_shape, layout=args.layout, prefill_layout=args.prefill_layout,
                       decode_layout=args.decode_layout, attention=args.attention, dtype=args.dtype,
                       batch_size=args.batch_size, max_seq_len=args.max_seq_len, progress=bar.update,
                       quantize=args.quantize, kv_cache=args.kv_cache, microbatches=args.microbatches,
                       max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
                       kv_pages=args.kv_pages, memory_fraction=args.memory_fraction,
                       prefix_cache=not args.no_prefix_cache)
    mesh = dict(llm.placement.mesh.shape)
    _status(f"mesh {','.join(f'{k}={v}' for k, v in mesh.items() if v > 1) or 'one device'}; "
            f"prefill layout {llm.layouts[0]}, decode layout {llm.layouts[1]}")
    if llm.paged:
        _status(llm.engine.plan.describe())
    else:
        _status(f"dense KV cache (pipeline stages): {llm.engine.batch_size} slots of {llm.engine.max_seq_len} tokens")
    return llm


def _read_prompts(prompts: list[str]) -> list[str]:
    """The PROMPT arguments; `-` is stdin (read once, as UTF-8, without its final newline)."""
    if prompts.count("-") > 1:
        raise ValueError("give `-` (read the prompt from stdin) at most once")
    if "-" in prompts:
        try:
            text = sys.stdin.buffer.read().decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"the prompt on stdin is not valid UTF-8 (byte {e.start + 1})") from None
        prompts = [text if p == "-" else p for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("prompt is empty: give some text")
    from shardlm.engine.llm import check_text  # here, not after the model loads

    for p in prompts:
        check_text(p)
    return prompts


class _Stream:
    """Writes one request's text to stdout as its tokens arrive. The text of all ids so far is
    decoded and only what is new is written; a text ending in an incomplete UTF-8 character
    (U+FFFD) waits for the next token, so the pieces join to exactly the completion's text."""

    def __init__(self, llm):
        self.llm, self.written = llm, ""

    def update(self, ids) -> None:
        text = self.llm.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(self.written):
            return
        sys.stdout.write(text[len(self.written):])
        sys.stdout.flush()
        self.written = text

    def finish(self, text: str) -> None:
        sys.stdout.write((text[len(self.written):] if text.startswith(self.written) else "\n" + text) + "\n")
        sys.stdout.flush()


def _run_requests(llm, requests, *, on_token=None, on_result=None):
    """llm.run with the summary line on stderr: tokens, tokens/s and time to the first token."""
    import time

    t0, first = time.perf_counter(), []

    def token(key, ids):
        if not first:
            first.append(time.perf_counter() - t0)
        if on_token is not None:
            on_token(key, ids)

    completions = llm.run(requests, on_token=token, on_result=on_result)
    wall = time.perf_counter() - t0
    generated = sum(len(s.token_ids) for c in completions for s in c.outputs)
    prompt = sum(len(c.prompt_token_ids) for c in completions)
    cut = sum(c.finish_reason == "length" for c in completions)
    _status(f"{prompt} prompt tokens, {generated} generated tokens in {wall:.2f} s ({generated / wall:.1f} tokens/s), "
            f"first token after {first[0] if first else wall:.2f} s"
            + (f"; {cut} of {len(completions)} cut by length (--max-new-tokens or --max-seq-len)" if cut else ""))
    return completions


def _chat_hint(llm, chat: bool) -> None:
    if not chat and llm.tokenizer is not None and llm.tokenizer.chat_template:
        _status("note: this model has a chat template; prompts go in as raw text (--chat applies the template)")


def cmd_generate(args) -> int:
    sampling = _sampling(args)
    prompts = _read_prompts(args.prompts)
    llm = _load_llm(args)
    from shardlm.engine.llm import completion_record

    # Every prompt encoded and checked once, before any work.
    requests = [llm.request(p, sampling, chat=args.chat, key=i) for i, p in enumerate(prompts)]
    _chat_hint(llm, args.chat)
    _status("compiling and generating ...")
    if args.json:
        for prompt, c in zip(prompts, _run_requests(llm, requests)):
            print(json.dumps({"prompt": prompt, **completion_record(c)}), flush=True)
    elif sampling.n > 1:  # each prompt's samples, whole, as the prompt finishes
        def show_samples(i, c):
            for s in c.outputs:
                cut = "\n[cut by length]" if s.finish_reason == "length" else ""
                print(f"=== [{i + 1}/{len(prompts)}] sample {s.index + 1}/{sampling.n}: {prompts[i]}\n{s.text}{cut}\n",
                      flush=True)

        _run_requests(llm, requests, on_result=show_samples)
    elif len(prompts) == 1:  # streamed as generated
        stream = _Stream(llm)  # finished when the request ends, so the text's last line precedes the summary
        _run_requests(llm, requests, on_token=lambda key, ids: stream.update(ids),
                      on_result=lambda key, c: stream.finish(c.text))
    else:  # each whole as it finishes, headed by its prompt
        def show(i, c):
            cut = "\n[cut by length]" if c.finish_reason == "length" else ""
            print(f"=== [{i + 1}/{len(prompts)}] {prompts[i]}\n{c.text}{cut}\n", flush=True)

        _run_requests(llm, requests, on_result=show)
    return 0


def _chat_lines():
    """The user's turns: from the terminal with a prompt, else one per line of stdin (UTF-8)."""
    if sys.stdin.isatty():
        while True:
            try:
                yield input("> ")
            except EOFError:  # Ctrl-D
                print(file=sys.stderr)
                return
    else:
        for raw in sys.stdin.buffer:
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield ValueError(f"this line is not valid UTF-8 (byte {e.start + 1}); it was skipped")


def cmd_chat(args) -> int:
    """A multi-turn chat through the model's chat template, each answer streamed; /reset, /exit."""
    from shardlm.engine.llm import completion_record

    sampling = _sampling(args)
    llm = _load_llm(args)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise ValueError("this model has no chat template, so `shardlm chat` cannot talk to it; "
                         "use `shardlm generate`")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history, failed = list(system), False
    _status("type a message; /reset forgets the conversation, /exit or Ctrl-D leaves")
    for text in _chat_lines():
        if isinstance(text, ValueError) or not text.strip():
            if text:
                print(f"error: {text}", file=sys.stderr)
                failed = True
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(system)
            _status("(conversation reset)")
            continue
        try:
            request = llm.request(history + [{"role": "user", "content": text}], sampling, key=0)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the chat going
            print(f"error: {_flag_words(e)} (/reset starts over)", file=sys.stderr)
            failed = True
            continue
        if args.json:
            [c] = _run_requests(llm, [request])
            print(json.dumps({"prompt": text, **completion_record(c)}), flush=True)
        else:
            stream = _Stream(llm)
            [c] = _run_requests(llm, [request], on_token=lambda key, ids: stream.update(ids),
                                on_result=lambda key, c: stream.finish(c.text))
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": c.text}]
    return 2 if failed else 0


EX_TEMPFAIL = 75  # a drained job: "try again" to a supervisor, not a failure


def cmd_run(args) -> int:
    import jax

    from shardlm.engine.job_control import JobControl, LockstepError, install_signal_handlers

    # A signal from here on drains the job (none has started yet: then every line stays pending).
    control = JobControl(args.drain_timeout, args.lockstep_every)
    restore = install_signal_handlers(control)
    compile_s = [0.0]  # compiling, or loading compiled programs from the cache, for --summary

    from shardlm.engine.programs import LOAD_EVENT

    def count_compile(event, secs, **kw):
        if event in ("/jax/core/compile/backend_compile_duration", LOAD_EVENT):
            compile_s[0] += secs

    jax.monitoring.register_event_duration_secs_listener(count_compile)
    try:
        return _run_job(args, control, compile_s)
    except LockstepError as e:  # every process raises it at the same step
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        jax.monitoring.unregister_event_duration_listener(count_compile)
        restore()


def _run_job(args, control, compile_s) -> int:
    from shardlm.engine import jobs
    from shardlm.sharding.mesh import parse_mesh
    from shardlm.sharding.pipeline import stages_in

    if args.precompile and stages_in(parse_mesh(args.mesh) if args.mesh else None) > 1:
        raise UsageError("--precompile is for the paged engine; pipeline stages (a stage axis in --mesh) "
                         "compile each prompt bucket at its first use")
    if args.summary is not None:
        jobs.check_summary_path(args.summary)
    # Before anything touches a device: every process of the job joins here.
    jobs.init_distributed(args.coordinator, args.num_processes, args.process_id,
                          heartbeat_timeout=args.heartbeat_timeout)
    import jax

    from shardlm.engine.job_control import install_signal_handlers

    if jax.process_count() > 1:  # jax.distributed put its own SIGTERM handler in place of ours
        install_signal_handlers(control)
    sampling = _sampling(args)
    jobs.check_input(args.input)  # a missing input or a bad output fails before the model loads
    if jax.process_index() == 0:  # only process 0 sees the output
        jobs.check_output(args.output, args.input)
    if jax.process_count() > 1 and not args.mesh:
        raise ValueError(f"a job of {jax.process_count()} processes needs --mesh over all {jax.device_count()} "
                         f"devices, e.g. --mesh x={jax.device_count()}")
    llm = _load_llm(args)
    if args.precompile:
        _precompile(llm.engine, show=jax.process_index() == 0)
    if jax.process_index() == 0:
        _status(f"process 0 of {jax.process_count()}: {args.input} -> {args.output}")
    summary = jobs.run_job(llm, args.input, args.output, sampling, chat=args.chat, control=control,
                           model_name=jobs.served_model_name(args.served_model_name, args.model))
    if jax.process_index() == 0:
        _status(jobs.format_summary(summary))
        if args.summary is not None:
            jobs.write_summary(args.summary, jobs.summary_record(summary, input_path=args.input, output_path=args.output,
                                                                 compile_s=compile_s[0], previous=args.summary))
    if summary["preempted"]:
        if jax.process_index() == 0:
            print(f"preempted at step {control.steps}: {summary['prompts']} done, {summary['pending']} pending; run "
                  f"the same command again to resume (exit {EX_TEMPFAIL})", file=sys.stderr)
        else:
            print(f"process {jax.process_index()}: preempted at step {control.steps}", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


def _precompile(engine, show: bool) -> None:
    """Every step program of the engine compiled before the first step (a bar on a terminal, else
    a line per program)."""
    from tqdm import tqdm

    programs = engine.programs()
    t0 = time.perf_counter()
    with tqdm(total=len(programs), desc="precompiling", unit=" programs", file=sys.stderr, leave=False,
              disable=True if (_QUIET or not show) else None) as bar:
        def done(phase, bucket, secs):
            bar.update(1)
            if show and not sys.stderr.isatty():
                what = f"{bucket} tokens" if phase == "prefill" else f"batch {bucket}"
                _status(f"precompiled {bar.n}/{len(programs)}: {phase} {what} in {secs:.1f} s")

        engine.precompile(done)
    if show:
        _status(f"precompiled {len(programs)} programs in {time.perf_counter() - t0:.1f} s")


def cmd_serve(args) -> int:
    from shardlm.engine import jobs
    from shardlm.sharding.mesh import parse_mesh
    from shardlm.sharding.pipeline import stages_in

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.grace_period >= 0:
        raise UsageError(f"--grace-period must be a number of seconds >= 0, got {args.grace_period}")
    if stages_in(parse_mesh(args.mesh) if args.mesh else None) > 1:
        raise UsageError("shardlm serve runs the paged KV cache; pipeline stages (a stage axis in --mesh) are for "
                         "jobs (`shardlm run`): give a mesh without a stage axis")
    jobs.init_distributed(args.coordinator, args.num_processes, args.process_id,
                          heartbeat_timeout=args.heartbeat_timeout)
    import jax

    from shardlm.engine import server

    if jax.process_count() > 1 and not args.mesh:
        raise ValueError(f"a server of {jax.process_count()} processes needs --mesh over all {jax.device_count()} "
                         f"devices, e.g. --mesh x={jax.device_count()}")
    llm = _load_llm(args)
    leader = jax.process_index() == 0
    if args.precompile:
        _precompile(llm.engine, show=leader)
    name = jobs.served_model_name(args.served_model_name, args.model)
    ready = lambda: _status(f"serving {name} at http://{args.host}:{args.port}/v1 "  # noqa: E731
                            f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")
    return server.serve(llm, host=args.host, port=args.port, model_name=name, api_key=args.api_key,
                        max_queue=args.max_queue, grace_s=args.grace_period, on_ready=ready if leader else None)


def cmd_launch(args) -> int:
    from shardlm.engine import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch.launch(args.num_processes, args.devices_per_process, command)


def cmd_convert(args) -> int:
    import shutil

    from tqdm import tqdm

    from shardlm.checkpoints.convert import convert
    from shardlm.checkpoints.orbax_io import check_destination

    partial = check_destination(args.dst, args.force) + ".partial"
    if os.path.lexists(partial):  # what a convert killed mid-save (SIGKILL, power loss) left
        shutil.rmtree(partial) if os.path.isdir(partial) and not os.path.islink(partial) else os.remove(partial)
        _status(f"removed {partial}, left by an interrupted convert")
    _ON_INTERRUPT.append(lambda: shutil.rmtree(partial, ignore_errors=True))
    with tqdm(desc="converting", unit=" tensors", file=sys.stderr, disable=None) as bar:
        dst = convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=bar.update,
                      quantize=args.quantize)
    _status(f"wrote {dst}")
    return 0


def cmd_perplexity(args) -> int:
    from shardlm.engine.perplexity import perplexity

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {args.file} as UTF-8 text: {e}") from None
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.window is not None and args.window < 2:
        raise ValueError(f"--window must be >= 2 (tokens per window), got {args.window}")
    llm = _load_llm(args)
    if args.window is not None and args.window > llm.engine.max_seq_len:
        raise ValueError(f"--window {args.window} is more than --max-seq-len {llm.engine.max_seq_len}")
    result = perplexity(llm, text, max_tokens=args.max_tokens, window=args.window)
    if args.json:
        print(json.dumps({"perplexity": result["perplexity"], "tokens": result["tokens"]}))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")
    return 0


def _plain(value) -> str:
    """A config value in words: yes/no, none, key value pairs; never a Python repr."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_plain(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_plain, value)) or "none"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cmd_inspect(args) -> int:
    from shardlm.checkpoints.convert import describe
    from shardlm.checkpoints.loader import embedded_model_path

    info = describe(args.path or embedded_model_path())
    if args.json:
        print(json.dumps(info))
        return 0
    rows = [("path", info["path"]), ("format", info["format"]), ("parameters", f"{info['n_params']:,}"),
            ("size on disk", f"{info['size_bytes'] / 2**20:,.1f} MiB"),
            ("dtypes", ", ".join(f"{d} {n:,}" for d, n in sorted(info["dtypes"].items())))]
    if info["n_active_params"] != info["n_params"]:  # a mixture of experts: what one token uses
        rows.insert(3, ("active parameters", f"{info['n_active_params']:,} per token"))
    rows += [(key.replace("_", " "), _plain(value)) for key, value in info["config"].items()]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def cmd_layouts(args) -> int:
    from shardlm.sharding.layouts import LAYOUTS

    width = max(map(len, LAYOUTS))
    for name, layout in LAYOUTS.items():
        print(f"{name:{width}}  {layout.description}")
    print("\nattention: heads (split by heads like F) or batch (Q/K/V all-to-all to a batch-split KV cache, for "
          "multiquery/GQA); auto uses batch in decode when the kv heads cannot be split and the batch can")
    print(pipeline_text(args))
    return 0


def pipeline_text(args) -> str:
    """The stage axis: how layers split, the bubble, and the bytes passed between stages."""
    from shardlm.models.config import preset
    from shardlm.sharding import pipeline
    from shardlm.sharding.mesh import parse_mesh

    lines = ["\npipeline (mesh axis stage=N): the layers split into N stages (L layers: the first L mod N stages "
             "take one more), each stage's devices hold only its layers and their KV cache and run any layout above; "
             "a step's tokens go through in M microbatches (decode: rows, prefill: chunks of positions), so a "
             "step takes M + N - 1 ticks: bubble fraction (N - 1) / (M + N - 1); between stages pass "
             "(N - 1) x B x T x D activation bytes per step"]
    stages = pipeline.stages_in(parse_mesh(args.mesh) if args.mesh else None)
    _check_microbatches(args, stages, args.batch, "--batch")
    if stages > 1:
        config = preset(args.model)
        sizes = pipeline.stage_sizes(config.n_layers, stages)
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        M = pipeline.microbatches_for(args.batch, args.microbatches or stages)
        per_stage = f"{sizes[0]}" if len(set(sizes)) == 1 else f"{max(sizes)} or {min(sizes)}"
        lines.append(f"  {config.name}, {stages} stages of {per_stage} layers, decode batch "
                     f"{args.batch} in {M} microbatches: bubble {pipeline.bubble_fraction(stages, M):.0%}, "
                     f"{pipeline.stage_transfer_bytes(args.batch, 1, config.d_model, 2, stages):,.0f} bytes "
                     f"(bf16) between stages per decode step")
    return "\n".join(lines)


def _context(args, config) -> int:
    if args.context is None:
        return min(config.max_seq_len, 2048)
    if args.context < 1:
        raise ValueError(f"--context must be >= 1 tokens, got {args.context}")
    return args.context


def _check_microbatches(args, stages: int, rows: int, what: str) -> None:
    """--microbatches is honoured exactly or refused: without a stage axis it would be ignored, and a
    count that does not divide the rows would silently become a smaller one."""
    if args.microbatches is None:
        return
    if stages == 1:
        raise ValueError(f"--microbatches {args.microbatches} needs pipeline stages: give --mesh a stage axis, "
                         "e.g. --mesh stage=2,x=4")
    if args.microbatches < 1 or rows % args.microbatches:
        raise ValueError(f"--microbatches {args.microbatches} must be >= 1 and divide {what} ({rows})")


def _plan_pipeline(args, config, mesh: dict[str, int]) -> int:
    from shardlm.sharding import pipeline

    if math.prod(mesh.values()) != args.chips:
        raise ValueError(f"mesh {args.mesh} has {math.prod(mesh.values())} chips, not {args.chips}")
    wb = {"int8": 1, "bf16": 2, "bfloat16": 2}[args.weights]
    context = _context(args, config)
    out = {}
    for phase in [args.phase] if args.phase else ["prefill", "decode"]:
        ranked = pipeline.pipeline_plan(config, args.chip, mesh, phase, args.batch, context, args.microbatches, wb)
        out[phase] = {"mesh": mesh, "pipelines": [e.as_dict() for e in ranked]}
        if args.json:
            continue
        first = ranked[0]
        print(f"{config.name} {phase}: {args.chips} x {args.chip}, mesh {args.mesh}, batch {args.batch}, context "
              f"{context}: {first.stages} stages of up to {-(-config.n_layers // first.stages)} layers, {first.microbatches} "
              f"microbatches, bubble {first.bubble_fraction:.0%} (step = (M + stages - 1) ticks)")
        print(f"  {'layout':22} {'attn':5} {'step ms':>10} {'tick ms':>9} {'stage bytes':>12} {'GiB/chip':>8}")
        for e in ranked:
            print(f"{'*' if e is first else ' '} {e.tick.layout:22} {e.tick.attention:5} {e.step_time_s * 1e3:10.2f} "
                  f"{e.tick.step_time_s * 1e3:9.2f} {e.stage_bytes:12,.0f} {e.bytes_per_chip / 2**30:8.1f}"
                  + ("" if e.fits else "  does not fit"))
        print()
    if args.json:
        print(json.dumps(out[args.phase] if args.phase else out))
    return 0


def _not_shown(ranked, mesh: dict[str, int], phase: str, batch: int) -> str:
    """Why the layouts missing from a plan's table are missing (they do not apply here)."""
    from shardlm.sharding.layouts import LAYOUTS

    chips, shown = math.prod(mesh.values()), {e.layout for e in ranked}
    moe = any(e.moe for e in ranked)
    why = []
    for name, layout in LAYOUTS.items():
        if name in shown or (layout.weights.get("expert") and not moe):  # expert-parallel: for experts only
            continue
        if name == "replicated":
            why.append("replicated (only considered on one chip)")
        elif chips == 1:
            why.append(f"{name} (needs more than one chip)")
        elif layout.weights.get("expert"):
            why.append(f"{name} (its experts or expert F do not split over its axes of this mesh)")
        else:
            tokens = "batch" if phase == "decode" else "batch or context"
            why.append(f"{name} (cannot split the {tokens} over its gathered axes, so it would run as 2D)")
    if chips > 1 and batch % chips and not any(e.attention == "batch" for e in ranked):
        why.append(f"batch-sharded attention (batch {batch} is not a multiple of the {chips} chips)")
    return "  not shown: " + "; ".join(why) if why else "  every layout is shown"


def cmd_plan(args) -> int:
    from shardlm.models.config import preset
    from shardlm.sharding import pipeline, planner
    from shardlm.sharding.mesh import parse_mesh

    config = preset(args.model)
    if args.chips < 1:
        raise ValueError(f"--chips must be >= 1, got {args.chips}")
    # A mixture of experts' routing: planner.plan's imbalance and capacity_factor ({} for a dense model).
    imbalance, cf = args.expert_imbalance, args.capacity_factor
    if not 1 <= imbalance < math.inf:  # also NaN
        raise ValueError(f"--expert-imbalance must be a finite number >= 1 (1: every expert group gets the mean "
                         f"slots), got {imbalance:g}")
    if cf is not None and not 0 < cf < math.inf:
        raise ValueError(f"--capacity-factor must be a finite number > 0 (leave it out for dropless), got {cf:g}")
    if not config.n_experts and (imbalance != 1 or cf is not None):
        raise ValueError(f"--expert-imbalance and --capacity-factor apply to a mixture of experts; {config.name} is dense")
    moe = dict(imbalance=imbalance, capacity_factor=cf) if config.n_experts else {}
    stages = pipeline.stages_in(parse_mesh(args.mesh)) if args.mesh else 1
    _check_microbatches(args, stages, args.batch, "--batch")
    if stages > 1:
        if imbalance != 1 or cf is not None:
            raise ValueError("--expert-imbalance and --capacity-factor are not planned with pipeline stages yet")
        return _plan_pipeline(args, config, parse_mesh(args.mesh))
    mesh = parse_mesh(args.mesh) if args.mesh else planner.default_mesh(args.chips)
    mesh = planner.check_mesh(mesh, args.chips)
    wb = {"int8": 1, "bf16": 2, "bfloat16": 2}[args.weights]
    context = _context(args, config)
    out = {}
    for phase in [args.phase] if args.phase else ["prefill", "decode"]:
        ranked = planner.plan(config, args.chip, mesh, phase, args.batch, context, weight_bytes=wb, **moe)
        chosen = planner.best(config, args.chip, mesh, phase, args.batch, context, weight_bytes=wb, **moe)
        chosen = ranked[0]  # best() is the first of the ranking that fits
        out[phase] = {"best": {"layout": chosen.layout, "attention": chosen.attention,
                               "step_time_s": chosen.step_time_s, "mfu": chosen.mfu, "mbu": chosen.mbu},
                      "mesh": mesh, "layouts": [e.as_dict() for e in ranked]}
        if not args.json:
            print(f"{config.name} {phase}: {args.chips} x {args.chip}, mesh "
                  f"{','.join(f'{a}={s}' for a, s in mesh.items())}, batch {args.batch}, context {context}, "
                  f"{args.weights} weights (step = max(compute, memory, hidden comm) + exposed comm; "
                  f"comm = all collectives)")
            if moe:
                print(f"  mixture of experts: {config.n_params / 1e9:.1f}B parameters, {config.n_active_params / 1e9:.1f}B "
                      f"active per token ({config.experts_per_token} of {config.n_experts} experts); expert imbalance "
                      f"{args.expert_imbalance:g}, {'dropless' if cf is None else f'capacity factor {cf:g}'}; "
                      f"a2a = the all-to-alls' operand MiB per chip per step, EPxTP = expert groups x devices in one "
                      f"(TP: every expert on every group, its F split as the dense MLP's)")
            print(f"  {'layout':22} {'attn':5} {'step ms':>10} {'compute':>9} {'memory':>9} {'comm':>9} "
                  f"{'GiB/chip':>8} {'MFU':>5} {'MBU':>5}" + (f" {'a2a MiB':>8} {'EPxTP':>6}" if moe else ""))
            for e in ranked:
                mark = "*" if e is chosen else " "
                split = f"{e.moe['ep']}x{e.moe['tp']}" if moe and e.moe["ep"] > 1 else "TP"
                extra = f" {e.moe['all_to_all_bytes'] / 2**20:8.1f} {split:>6}" if moe else ""
                print(f"{mark} {e.layout:22} {e.attention:5} {e.step_time_s * 1e3:10.2f} {e.compute_s * 1e3:9.2f} "
                      f"{e.memory_s * 1e3:9.2f} {e.comm_s * 1e3:9.2f} {e.bytes_per_chip / 2**30:8.1f} "
                      f"{e.mfu:5.2f} {e.mbu:5.2f}" + extra + ("" if e.fits else "  does not fit"))
            print(f"  chosen: {chosen.layout} with {chosen.attention}-sharded attention")
            print(_not_shown(ranked, mesh, phase, args.batch) + "\n")
    if args.json:
        print(json.dumps(out[args.phase] if args.phase else out))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardlm")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardlm", description="JAX inference with the partitioning layouts of Pope et al. 2022")
    parser.add_argument("--version", action="version", version=f"shardlm {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    g = sub.add_parser("generate", help="complete prompts with a model")
    _model_args(g)
    _sampling_args(g)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template (one user turn per prompt)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    g.add_argument("--quiet", action="store_true", help="no status lines or summary on stderr")
    _n_arg(g, "prompt")
    g.add_argument("prompts", nargs="+", metavar="PROMPT", help="text; - reads it from stdin")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk with a model: the chat template, history, streamed answers")
    _model_args(c)
    _sampling_args(c, max_new_tokens=256)
    c.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    c.add_argument("--json", action="store_true", help="each answer as one JSON object (the fields of generate)")
    c.add_argument("--quiet", action="store_true", help="no status lines or summary on stderr")
    c.set_defaults(func=cmd_chat, batch_size=1)

    lay = sub.add_parser("layouts", help="list the partitioning layouts and what each shards where")
    lay.add_argument("--mesh", default=None, help="with a stage axis, e.g. stage=2,x=2,y=2: the pipeline's costs")
    lay.add_argument("--model", default="smollm2-135m", help="model preset for the pipeline's figures")
    lay.add_argument("--batch", type=int, default=8, help="decode batch for the pipeline's figures (default 8)")
    lay.add_argument("--microbatches", type=int, default=None, help="pipeline microbatches (default: the stages)")
    lay.set_defaults(func=cmd_layouts)

    pl = sub.add_parser("plan", help="estimate step time, memory and communication of each layout (no devices)")
    pl.add_argument("--model", required=True, help="model preset, e.g. palm-540b, llama3-70b")
    pl.add_argument("--chip", required=True, help="tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, h100, h200 or cpu")
    pl.add_argument("--chips", type=int, required=True, help="number of chips")
    pl.add_argument("--mesh", default=None, help="x=4,y=4,z=4 (default: the most cubic for --chips)")
    pl.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    pl.add_argument("--context", type=int, default=None, help="tokens of context (default min(max_seq_len, 2048))")
    pl.add_argument("--phase", default=None, choices=["prefill", "decode"], help="default: both")
    pl.add_argument("--weights", default="bf16", choices=["int8", "bf16", "bfloat16"], help="weight dtype")
    pl.add_argument("--microbatches", type=int, default=None, help="with a stage axis in --mesh (default: the stages)")
    pl.add_argument("--expert-imbalance", type=float, default=1.0, metavar="M",
                    help="mixture of experts: the busiest expert group gets M x the mean token-slots (>= 1; default 1)")
    pl.add_argument("--capacity-factor", type=float, default=None, metavar="C",
                    help="mixture of experts: expert-parallel slots per destination, C x the mean (> 0; default dropless)")
    pl.add_argument("--json", action="store_true", help="one JSON object")
    pl.set_defaults(func=cmd_plan)

    cv = sub.add_parser("convert", help="GGUF file or Hugging Face folder -> shardlm (Orbax) checkpoint")
    cv.add_argument("src", metavar="SRC", help="GGUF file, Hugging Face folder or shardlm checkpoint")
    cv.add_argument("dst", metavar="DST", help="checkpoint folder to create")
    cv.add_argument("--dtype", default=None, choices=["float32", "f32", "bfloat16", "bf16"],
                    help="parameter dtype (default: bf16 for a bf16 source, else f32)")
    cv.add_argument("--force", action="store_true", help="replace DST if it exists (once the new one is complete)")
    _quant_args(cv, kv_cache=False)
    cv.set_defaults(func=cmd_convert)

    pp = sub.add_parser("perplexity", help="perplexity of a UTF-8 text file under a model (sliding window)")
    _model_args(pp)
    pp.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    pp.add_argument("--window", type=int, default=None,
                    help="tokens per window (default 512 or --max-seq-len if less; at most --max-seq-len)")
    pp.add_argument("--json", action="store_true", help='print {"perplexity", "tokens"}')
    pp.add_argument("file", metavar="FILE", help="UTF-8 text file")
    pp.set_defaults(func=cmd_perplexity, batch_size=1)

    ins = sub.add_parser("inspect", help="config, parameter count, dtypes and size of a model")
    ins.add_argument("path", metavar="PATH", nargs="?", default=None,
                     help="GGUF file, Hugging Face folder or shardlm checkpoint (default: the embedded model)")
    ins.add_argument("--json", action="store_true", help="one JSON object")
    ins.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="a decoding job: JSONL prompts in, JSONL completions out (multi-host)")
    r.add_argument("--input", required=True, help='JSONL, one {"id": ..., "prompt" or "messages": ...} per line, '
                   'or an OpenAI batch file (one {"custom_id", "method", "url", "body"} per line)')
    r.add_argument("--output", required=True, help="JSONL results, appended; a rerun skips ids already done")
    _model_args(r)
    _sampling_args(r)
    _n_arg(r, 'line (a line\'s own "n" wins)')
    r.add_argument("--chat", action="store_true", help='apply the chat template to "prompt" lines too')
    r.add_argument("--served-model-name", default=None, metavar="NAME",
                   help='the "model" an OpenAI batch file\'s bodies must name (default: --model as given, '
                        "or SmolLM2-135M-Instruct for the embedded model)")
    r.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host without auto-detection)")
    r.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    r.add_argument("--process-id", type=int, default=None, help="this process, 0 .. N-1")
    r.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent process counts as lost and the job stops (default 100)")
    r.add_argument("--drain-timeout", type=float, default=20.0,
                   help="on SIGTERM/SIGINT, seconds running sequences may take to finish before the job stops "
                        f"(default 20); a drained job exits {EX_TEMPFAIL}, to be rerun")
    r.add_argument("--precompile", action="store_true",
                   help="compile every prefill and decode bucket before the first step, so no step stops to compile")
    r.add_argument("--summary", default=None, metavar="FILE",
                   help="write a JSON summary of the run here at the end (or at a drain)")
    r.add_argument("--lockstep-every", type=int, default=1, metavar="N",
                   help="processes of a multi-host job compare digests of their steps every N steps (default 1: "
                        "they exchange flags every step anyway; a finished record is written once checked; 0: never)")
    r.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions, metrics)")
    _model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    sv.add_argument("--served-model-name", default=None, metavar="NAME",
                    help="the model's name in requests and /v1/models (default: --model as given)")
    sv.add_argument("--max-queue", type=int, default=1024, metavar="N",
                    help="requests that may wait for a place in the batch; more are answered 429 (default 1024)")
    sv.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                    help="on SIGTERM/SIGINT, seconds running requests may take to finish (default 30)")
    sv.add_argument("--precompile", action="store_true",
                    help="compile every prefill and decode bucket before listening, so no request waits on a compile")
    sv.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host without auto-detection)")
    sv.add_argument("--num-processes", type=int, default=None, help="processes of the server")
    sv.add_argument("--process-id", type=int, default=None, help="this process, 0 .. N-1")
    sv.add_argument("--heartbeat-timeout", type=int, default=100,
                    help="seconds after which a silent process counts as lost (default 100)")
    sv.set_defaults(func=cmd_serve)

    la = sub.add_parser("launch", help="start N local processes of a multi-host command (development, tests)")
    la.add_argument("--num-processes", type=int, required=True, help="processes to start")
    la.add_argument("--devices-per-process", type=int, default=1, help="virtual CPU devices in each (default 1)")
    la.add_argument("command", nargs=argparse.REMAINDER, help="-- run --input ... (a shardlm command)")
    la.set_defaults(func=cmd_launch)
    return parser


# Library messages name Python parameters; on the command line the same values are flags.
_FLAG_WORDS = re.compile(r"(?<![\w\"'-])(max_new_tokens|temperature|top_k|top_p|seed|max_seq_len|batch_size|"
                         r"microbatches|max_tokens|max_num_seqs|max_num_batched_tokens|kv_pages|memory_fraction)(?![\w\"'])")


def _flag_words(e: Exception) -> str:
    from shardlm.checkpoints.gguf import CheckpointError

    text = str(e)
    return text if isinstance(e, CheckpointError) else _FLAG_WORDS.sub(lambda m: "--" + m[1].replace("_", "-"), text)


def _exit_now(code: int) -> None:
    """Flush and leave without interpreter teardown (JAX/XLA and Orbax threads may still run)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # RuntimeError: reentrant, inside a signal handler
            pass
    os._exit(code)


_ON_INTERRUPT: list = []  # cleanups for Ctrl-C (a convert's DST.partial), run before exiting 130


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: clean up and exit 130 here, not by raising KeyboardInterrupt. Raised, it can land in
    a callback whose exceptions Python ignores (JAX's gc callback: the command went on and exited
    0), or unwind into interpreter teardown while XLA threads run (a segfault, exit 139)."""
    os.write(2, b"\ninterrupted\n")
    for cleanup in _ON_INTERRUPT:
        cleanup()
    _exit_now(130)


def main(argv=None) -> int:
    if argv is None:  # the command itself (in-process callers such as tests keep their own handler)
        signal.signal(signal.SIGINT, _on_sigint)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:  # bare `shardlm`: what there is to do
            parser.print_help(sys.stderr)
            return 2
        global _QUIET
        _QUIET = getattr(args, "quiet", False)
        return args.func(args)
    except (UsageError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {_flag_words(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, print nothing more to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141 if argv is not None else _exit_now(141)
    except OSError as e:  # the system said no (disk full, permissions): one line, exit 1
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # in-process callers; the command exits in _on_sigint
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
