"""Hugging Face transformers batched generate on given token-id prompts. Runs in the peer's own
venv as a plain script (it does not import kvserve); prints one JSON line with the timing."""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--prompts", required=True, help="JSON file: list of equal-length token-id lists")
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else pure sampling (no top-k/p)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.model.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(args.model), gguf_file=os.path.basename(args.model), dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    with open(args.prompts) as f:
        prompts = torch.tensor(json.load(f))  # equal lengths: no padding needed

    sampling = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0}

    def generate(batch: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(
            batch, attention_mask=torch.ones_like(batch), max_new_tokens=n, min_new_tokens=n,
            pad_token_id=0, **sampling,
        )  # fmt: skip

    with torch.inference_mode():
        generate(prompts[:2], 4)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(prompts), args.batch_size):
            out = generate(prompts[i : i + args.batch_size], args.output_len)
            assert out.shape[1] == prompts.shape[1] + args.output_len
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
