"""What every command line shares: a usage mistake is one line on stderr and exit status 2.

argparse's own error() prints the whole usage before the message; `OneLineParser` prints only
`prog: error: message`. The argument types below reject out-of-range numbers while parsing,
so a CLI fails before it loads a model. `user_errors` turns what the user can fix (a missing
file, a bad value, a damaged checkpoint) into the same one line; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator, NoReturn

# What a user can fix: bad values (ValueError, and DataError/PathError under it), files that
# are missing, present, unreadable or damaged (OSError), checkpoints that cannot be read.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def one_line(error: BaseException | str) -> str:
    """The message of `error` on one line (a KeyError's quotes dropped)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        error = str(error.args[0])
    return " ".join(str(error).split())


def report(prog: str, error: BaseException | str) -> int:
    """Prints `prog: error: message` on stderr; returns the exit status, 2."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2


def fail(prog: str, error: BaseException | str) -> NoReturn:
    """Prints `prog: error: message` on stderr and exits with status 2."""
    sys.exit(report(prog, error))


@contextlib.contextmanager
def user_errors(prog: str, debug: bool = False,
                extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turns the user's errors raised inside into one line and exit 2 (re-raises with debug)."""
    from effllm_jax.checkpoint import CheckpointError  # late: orbax is slow to import
    try:
        yield
    except (*USER_ERRORS, CheckpointError, *extra) as e:
        if debug:
            raise
        fail(prog, e)


def run_absl(prog: str, define_flags: Callable[[], None], main: Callable,
             argv: list[str] | None = None) -> None:
    """Runs an absl app whose flag, config-file and override errors are one line, exit 2.

    `define_flags` runs first: ml_collections loads --config and applies --config.* overrides
    while its flag is defined, so a bad config file or field fails there.
    """
    from absl import app, flags
    argv = list(sys.argv if argv is None else argv)
    sys.argv = argv  # config_flags reads the overrides from sys.argv
    debug = any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv[1:])

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            if debug:
                raise
            fail(prog, e)

    try:
        define_flags()
    except Exception as e:  # noqa: BLE001 -- the config file is the user's code
        if debug:
            raise
        fail(prog, e if isinstance(e, ValueError) else f"--config: {type(e).__name__}: {e}")
    app.run(main, argv=argv, flags_parser=parse)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`--help` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)

    def add_debug_flag(self) -> None:
        """--debug: show the traceback of an error instead of one line."""
        self.add_argument("--debug", action="store_true",
                          help="show the traceback of an error instead of one line")


def _number(cast: Callable, ok: Callable[[float], bool], must: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {must}")
        return value
    parse.__name__ = must  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, ">= 1")
non_negative_int = _number(int, lambda v: v >= 0, ">= 0")
non_negative_float = _number(float, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: v > 0, "> 0")
unit_interval = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
