"""Usage mistakes on the command lines: one line on stderr, exit status 2, before any model loads."""
import pytest

from effllm_jax import generate
from effllm_jax.evaluate import __main__ as evaluate_cli

MISSING = "/nonexistent/model"  # never opened: the arguments fail first


@pytest.mark.parametrize("main, argv, message", [
    (evaluate_cli.main, ["--limit=-1"], "argument --limit: -1 must be >= 1"),
    (evaluate_cli.main, ["--batch_size=0"], "argument --batch_size: 0 must be >= 1"),
    (evaluate_cli.main, ["--stride=x"], "argument --stride: 'x' is not a number"),
    (generate.main, ["--max_new_tokens=-1"], "argument --max_new_tokens: -1 must be >= 1"),
    (generate.main, ["--temperature=-1"], "argument --temperature: -1 must be >= 0"),
    (generate.main, ["--top_p=1.5"], "argument --top_p: 1.5 must be in (0, 1]"),
    (generate.main, ["--top_k=0"], "argument --top_k: 0 must be >= 1"),
])
def test_bad_argument_is_one_line_and_exit_2(main, argv, message, capsys):
    required = (["--checkpoint", MISSING] if main is evaluate_cli.main
                else ["--model", MISSING, "--prompt", "hi"])
    with pytest.raises(SystemExit) as exit_:
        main(required + argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(message), lines
    assert lines[0].startswith("python -m effllm_jax.")
