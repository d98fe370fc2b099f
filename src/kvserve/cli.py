"""`kvserve serve | generate | bench`: parses flags into EngineArgs or ServerConfig (the frozen configs)."""
from __future__ import annotations

import argparse
import sys
import time

from kvserve.config import KV_CACHE_DTYPES, QUANTIZATIONS, SUPPORTED_DTYPES
from kvserve.server_config import ConfigError, add_serve_args, build_server_config, flag_help

_STARTED_AT = time.monotonic()  # for `kvserve serve`'s "ready N s after start" line


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM's."""
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=SUPPORTED_DTYPES)
    p.add_argument("--quantization", "-q", default=None, choices=[q for q in QUANTIZATIONS if q],
                   help="how weights are kept (default: the checkpoint's own; a GGUF keeps its blocks)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-batched-tokens-while-decoding", type=int, default=None,
                   help="token budget of a step while requests decode (default: the whole budget; "
                   "`kvserve serve` on a CPU: a quarter of it)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=flag_help("kv_cache_dtype"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--enforce-eager", action="store_true", help=flag_help("enforce_eager"))
    p.add_argument("--compilation-config", "-O", default=None, metavar="JSON", help=flag_help("compilation_config"))


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model_flag or args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantization=args.quantization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_batched_tokens_while_decoding=args.max_num_batched_tokens_while_decoding,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_dtype=args.kv_cache_dtype, seed=args.seed, device=args.device, enforce_eager=args.enforce_eager,
        compilation_config=args.compilation_config,
    )  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> None:
    from kvserve import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.sampling_seed)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    print(outputs[0].outputs[0].text)


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        config = build_server_config(args)
    except (ConfigError, OSError) as e:
        parser.error(str(e))
    from kvserve.entrypoints.openai.api_server import run_server

    sys.exit(run_server(config, started_at=_STARTED_AT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kvserve",
        description="kvserve: an LLM serving engine with continuous batching and a paged KV cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI- and TGI-compatible API)",
        description="Serve MODEL over HTTP: /v1/completions, /v1/chat/completions, /v1/models, TGI's /generate "
        "and /generate_stream, /health, /metrics. Every flag can also be set by the environment variable "
        "KVSERVE_<FLAG> (e.g. KVSERVE_MAX_NUM_SEQS=64) or a --config file; the command line wins over the "
        "environment, which wins over the file.",
    )
    add_serve_args(serve)
    serve.set_defaults(func=lambda a: cmd_serve(a, serve))

    gen = sub.add_parser("generate", help="generate a completion for one prompt, offline")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks (offline throughput, serving load)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from kvserve.bench import throughput

    tp = bench_sub.add_parser("throughput", help="offline throughput on random prompts")
    add_engine_args(tp)
    throughput.add_args(tp)
    tp.set_defaults(func=lambda a: throughput.run(a, engine_kwargs(a)))

    from kvserve.bench import serve as bench_serve

    bs = bench_sub.add_parser(
        "serve",
        help="load a running server with random prompts; TTFT/ITL/e2e and throughput",
        description=bench_serve.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_serve.add_args(bs)
    bs.set_defaults(func=bench_serve.run)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
