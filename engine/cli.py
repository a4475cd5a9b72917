"""The `shardlm` command. User mistakes exit 2 with one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file, Hugging Face folder or shardlm checkpoint "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default float32)")
    p.add_argument("--batch-size", type=int, default=8, help="decode slots (default 8)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="tokens per slot, prompt plus generated (default 1024)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. x=2,y=2,z=2 (default: one device)")
    p.add_argument("--layout", default=None, help="layout for both phases (see `shardlm layouts`)")
    p.add_argument("--prefill-layout", default=None, help="layout for prefill only")
    p.add_argument("--decode-layout", default=None, help="layout for decode only")
    p.add_argument("--attention", default="auto", choices=["auto", "heads", "batch"],
                   help="attention sharding: heads, batch (KV cache split by rows) or auto (default)")
    p.add_argument("--microbatches", type=int, default=None,
                   help="with --mesh stage=N: microbatches per step in the pipeline (default N)")
    _quant_args(p)


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
    _status("loading model ...")
    from shardlm.sharding.mesh import parse_mesh

    mesh_shape = parse_mesh(args.mesh) if args.mesh else None
    with tqdm(desc="loading weights", unit=" tensors", file=sys.stderr, leave=False, disable=None) as bar:
        llm = LLM.load(args.model, mesh_shape=mesh_shape, layout=args.layout, prefill_layout=args.prefill_layout,
                       decode_layout=args.decode_layout, attention=args.attention, dtype=args.dtype,
                       batch_size=args.batch_size, max_seq_len=args.max_seq_len, progress=bar.update,
                       quantize=args.quantize, kv_cache=args.kv_cache, microbatches=args.microbatches)
    mesh = dict(llm.placement.mesh.shape)
    _status(f"mesh {','.join(f'{k}={v}' for k, v in mesh.items() if v > 1) or 'one device'}; "
            f"prefill layout {llm.layouts[0]}, decode layout {llm.layouts[1]}")
    return llm


def cmd_generate(args) -> int:
    from shardlm.engine.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
    if any(not p for p in args.prompts):
        raise ValueError("prompt is empty: give some text")
    llm = _load_llm(args)
    from shardlm.engine.llm import completion_record

    # Every prompt encoded and checked once, before any work.
    requests = [llm.request(p, sampling, chat=args.chat, key=i) for i, p in enumerate(args.prompts)]
    _status("compiling and generating ...")
    completions = llm.run(requests)
    for prompt, c in zip(args.prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, **completion_record(c)}), flush=True)
        else:
            print(c.text if len(args.prompts) == 1 else f"[{prompt}] {c.text}", flush=True)
    return 0


def cmd_run(args) -> int:
    from shardlm.engine import jobs
    from shardlm.engine.sampling import SamplingParams

    # Before anything touches a device: every process of the job joins here.
    jobs.init_distributed(args.coordinator, args.num_processes, args.process_id,
                          heartbeat_timeout=args.heartbeat_timeout)
    import jax

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
    jobs.read_lines(args.input)  # a missing input or a bad output fails before the model loads
    if jax.process_index() == 0:  # only process 0 sees the output
        jobs.check_output(args.output, args.input)
    if jax.process_count() > 1 and not args.mesh:
        raise ValueError(f"a job of {jax.process_count()} processes needs --mesh over all {jax.device_count()} "
                         f"devices, e.g. --mesh x={jax.device_count()}")
    llm = _load_llm(args)
    if jax.process_index() == 0:
        _status(f"process 0 of {jax.process_count()}: {args.input} -> {args.output}")
    summary = jobs.run_job(llm, args.input, args.output, sampling, chat=args.chat)
    if jax.process_index() == 0:
        _status(jobs.format_summary(summary))
    return 0


def cmd_launch(args) -> int:
    from shardlm.engine import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch.launch(args.num_processes, args.devices_per_process, command)


def cmd_convert(args) -> int:
    from tqdm import tqdm

    from shardlm.checkpoints.convert import convert

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
    llm = _load_llm(args)
    result = perplexity(llm, text, max_tokens=args.max_tokens, window=args.window)
    if args.json:
        print(json.dumps({"perplexity": result["perplexity"], "tokens": result["tokens"]}))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")
    return 0


def cmd_inspect(args) -> int:
    from shardlm.checkpoints.convert import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['path']} ({info['format']})")
    print(f"parameters: {info['n_params']:,}  size on disk: {info['size_bytes'] / 2**20:,.1f} MiB")
    print("dtypes: " + ", ".join(f"{d} {n:,}" for d, n in sorted(info["dtypes"].items())))
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
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


def _plan_pipeline(args, config, mesh: dict[str, int]) -> int:
    from shardlm.sharding import pipeline

    if math.prod(mesh.values()) != args.chips:
        raise ValueError(f"mesh {args.mesh} has {math.prod(mesh.values())} chips, not {args.chips}")
    wb = {"int8": 1, "bf16": 2, "bfloat16": 2}[args.weights]
    context = args.context or min(config.max_seq_len, 2048)
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


def cmd_plan(args) -> int:
    from shardlm.models.config import preset
    from shardlm.sharding import pipeline, planner
    from shardlm.sharding.mesh import parse_mesh

    config = preset(args.model)
    if args.chips < 1:
        raise ValueError(f"--chips must be >= 1, got {args.chips}")
    if args.mesh and pipeline.stages_in(parse_mesh(args.mesh)) > 1:
        return _plan_pipeline(args, config, parse_mesh(args.mesh))
    mesh = parse_mesh(args.mesh) if args.mesh else planner.default_mesh(args.chips)
    mesh = planner.check_mesh(mesh, args.chips)
    wb = {"int8": 1, "bf16": 2, "bfloat16": 2}[args.weights]
    context = args.context or min(config.max_seq_len, 2048)
    out = {}
    for phase in [args.phase] if args.phase else ["prefill", "decode"]:
        ranked = planner.plan(config, args.chip, mesh, phase, args.batch, context, weight_bytes=wb)
        chosen = planner.best(config, args.chip, mesh, phase, args.batch, context, weight_bytes=wb)
        chosen = ranked[0]  # best() is the first of the ranking that fits
        out[phase] = {"best": {"layout": chosen.layout, "attention": chosen.attention,
                               "step_time_s": chosen.step_time_s, "mfu": chosen.mfu, "mbu": chosen.mbu},
                      "mesh": mesh, "layouts": [e.as_dict() for e in ranked]}
        if not args.json:
            print(f"{config.name} {phase}: {args.chips} x {args.chip}, mesh "
                  f"{','.join(f'{a}={s}' for a, s in mesh.items())}, batch {args.batch}, context {context}, "
                  f"{args.weights} weights (step = max(compute, memory) + communication)")
            print(f"  {'layout':22} {'attn':5} {'step ms':>10} {'compute':>9} {'memory':>9} {'comm':>9} "
                  f"{'GiB/chip':>8} {'MFU':>5} {'MBU':>5}")
            for e in ranked:
                mark = "*" if e is chosen else " "
                print(f"{mark} {e.layout:22} {e.attention:5} {e.step_time_s * 1e3:10.2f} {e.compute_s * 1e3:9.2f} "
                      f"{e.memory_s * 1e3:9.2f} {e.comm_s * 1e3:9.2f} {e.bytes_per_chip / 2**30:8.1f} "
                      f"{e.mfu:5.2f} {e.mbu:5.2f}" + ("" if e.fits else "  does not fit"))
            print(f"  chosen: {chosen.layout} with {chosen.attention}-sharded attention\n")
    if args.json:
        print(json.dumps(out[args.phase] if args.phase else out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardlm", description="JAX inference with the partitioning layouts of Pope et al. 2022")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="complete prompts with a model")
    _model_args(g)
    _sampling_args(g)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template (one user turn per prompt)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.set_defaults(func=cmd_generate)

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
    pl.add_argument("--json", action="store_true", help="one JSON object")
    pl.set_defaults(func=cmd_plan)

    cv = sub.add_parser("convert", help="GGUF file or Hugging Face folder -> shardlm (Orbax) checkpoint")
    cv.add_argument("src", metavar="SRC", help="GGUF file, Hugging Face folder or shardlm checkpoint")
    cv.add_argument("dst", metavar="DST", help="checkpoint folder to create")
    cv.add_argument("--dtype", default=None, choices=["bf16", "f32"],
                    help="parameter dtype (default: bf16 for a bf16 source, else f32)")
    cv.add_argument("--force", action="store_true", help="replace DST if it exists (once the new one is complete)")
    _quant_args(cv, kv_cache=False)
    cv.set_defaults(func=cmd_convert)

    pp = sub.add_parser("perplexity", help="perplexity of a UTF-8 text file under a model (sliding window)")
    _model_args(pp)
    pp.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    pp.add_argument("--window", type=int, default=512, help="tokens per window (default 512, at most --max-seq-len)")
    pp.add_argument("--json", action="store_true", help='print {"perplexity", "tokens"}')
    pp.add_argument("file", metavar="FILE", help="UTF-8 text file")
    pp.set_defaults(func=cmd_perplexity, batch_size=1)

    ins = sub.add_parser("inspect", help="config, parameter count, dtypes and size of a model")
    ins.add_argument("path", metavar="PATH", help="GGUF file, Hugging Face folder or shardlm checkpoint")
    ins.add_argument("--json", action="store_true", help="one JSON object")
    ins.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="a decoding job: JSONL prompts in, JSONL completions out (multi-host)")
    r.add_argument("--input", required=True, help='JSONL, one {"id": ..., "prompt" or "messages": ...} per line')
    r.add_argument("--output", required=True, help="JSONL results, appended; a rerun skips ids already done")
    _model_args(r)
    _sampling_args(r)
    r.add_argument("--chat", action="store_true", help='apply the chat template to "prompt" lines too')
    r.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host without auto-detection)")
    r.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    r.add_argument("--process-id", type=int, default=None, help="this process, 0 .. N-1")
    r.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent process counts as lost and the job stops (default 100)")
    r.set_defaults(func=cmd_run)

    la = sub.add_parser("launch", help="start N local processes of a multi-host command (development, tests)")
    la.add_argument("--num-processes", type=int, required=True, help="processes to start")
    la.add_argument("--devices-per-process", type=int, default=1, help="virtual CPU devices in each (default 1)")
    la.add_argument("command", nargs=argparse.REMAINDER, help="-- run --input ... (a shardlm command)")
    la.set_defaults(func=cmd_launch)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
