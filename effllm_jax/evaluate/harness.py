"""lm-evaluation-harness's own CLI with our model registered as "effllm".

lm-eval 0.4.13 has no plugin hook that would load a third-party model into its CLI process,
so this wrapper registers the model and then hands every argument to the harness's CLI:

    python -m effllm_jax.evaluate.harness --model effllm \
        --model_args checkpoint=PATH,batch_size=16,device=cpu --tasks piqa --limit 50

`--model_args` takes checkpoint (a run, export, HF directory or .gguf), batch_size,
max_length (default: the model's context length), max_gen_toks, add_bos, device and
tokenizer. Every other flag is the harness's (`run --help` lists them).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Registers "effllm" and runs `lm-eval` with argv (default: this process's arguments)."""
    from effllm_jax.evaluate.harness_adapter import register

    if register() is None:
        raise SystemExit("lm-evaluation-harness is not installed: pip install -e '.[harness]'")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
