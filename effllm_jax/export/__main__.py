"""CLI: python -m effllm_jax.export --workdir=RUN --out=DIR --format=flax|hf [options].

--workdir may also be a flax export, a Hugging Face directory or a .gguf file (conversion).
A non-empty --out is refused unless --overwrite; the export is written next to it and renamed
into place. Errors are one line with exit status 2 (--debug shows the traceback).
"""
from __future__ import annotations

import logging
import sys

from effllm_jax.cli import OneLineParser, positive_int, user_errors

PROG = "python -m effllm_jax.export"


def main(argv: list[str] | None = None) -> int:
    """Parses flags, exports, prints what was done."""
    parser = OneLineParser(prog=PROG, description=__doc__)
    parser.add_argument("--workdir", required=True,
                        help="training run (or flax export / HF directory / .gguf file)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("flax", "hf"), default="flax")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (atomically: written aside, then renamed)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--round_to", type=positive_int, default=None,
                        help="pad hidden/FFN widths up to a multiple (e.g. 8, 64, 128); exact")
    parser.add_argument("--strict", action="store_true",
                        help="hf: refuse non-uniform widths instead of zero-padding them")
    parser.add_argument("--gqa", choices=("auto", "pad", "mha"), default="auto",
                        help="hf: how uneven GQA groups become stock Llama heads")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--max_position_embeddings", type=positive_int, default=None,
                        help="context length to write (default: the source's, else 2048)")
    parser.add_debug_flag()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("effllm_jax").setLevel(logging.INFO)  # ours only, not jax's chatter
    options = {"round_to": args.round_to, "dtype": args.dtype,
               "max_position_embeddings": args.max_position_embeddings}
    if args.format == "hf":
        options.update(strict=args.strict, gqa=args.gqa)
    with user_errors(PROG, args.debug):
        from effllm_jax.export.api import export_run  # late: keeps a usage error fast
        notes = export_run(args.workdir, args.out, args.format, step=args.step,
                           overwrite=args.overwrite, **options)
    print(f"exported {args.workdir} -> {args.out} ({args.format})")
    for note in notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
