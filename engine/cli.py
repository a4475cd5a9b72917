"""The `shardlm` command. User mistakes exit 2 with one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default float32)")
    p.add_argument("--batch-size", type=int, default=8, help="decode slots (default 8)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="tokens per slot, prompt plus generated (default 1024)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. x=2,y=2,z=2 (default: one device)")
    p.add_argument("--layout", default=None, help="layout for both phases (see `shardlm layouts`)")
    p.add_argument("--prefill-layout", default=None, help="layout for prefill only")
    p.add_argument("--decode-layout", default=None, help="layout for decode only")
    p.add_argument("--attention", default="auto", choices=["auto", "heads", "batch"],
                   help="attention sharding: heads, batch (KV cache split by rows) or auto (default)")


def _load_llm(args):
    from tqdm import tqdm

    from shardlm.engine.llm import LLM

    _status("loading model ...")
    from shardlm.sharding.mesh import parse_mesh

    mesh_shape = parse_mesh(args.mesh) if args.mesh else None
    with tqdm(desc="loading weights", unit=" tensors", file=sys.stderr, leave=False, disable=None) as bar:
        llm = LLM.load(args.model, mesh_shape=mesh_shape, layout=args.layout, prefill_layout=args.prefill_layout,
                       decode_layout=args.decode_layout, attention=args.attention, dtype=args.dtype,
                       batch_size=args.batch_size, max_seq_len=args.max_seq_len, progress=bar.update)
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
    for p in args.prompts:  # validate every prompt before any work
        llm.encode(p, chat=args.chat)
    _status("compiling and generating ...")
    completions = llm.generate(args.prompts, sampling, chat=args.chat)
    for prompt, c in zip(args.prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "prompt_tokens": len(c.prompt_token_ids),
                              "completion_tokens": len(c.token_ids)}), flush=True)
        else:
            print(c.text if len(args.prompts) == 1 else f"[{prompt}] {c.text}", flush=True)
    return 0


def cmd_layouts(args) -> int:
    from shardlm.sharding.layouts import LAYOUTS

    width = max(map(len, LAYOUTS))
    for name, layout in LAYOUTS.items():
        print(f"{name:{width}}  {layout.description}")
    print("\nattention: heads (split by heads like F) or batch (Q/K/V all-to-all to a batch-split KV cache, for "
          "multiquery/GQA); auto uses batch in decode when the kv heads cannot be split and the batch can")
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
    lay.set_defaults(func=cmd_layouts)
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
