"""What every command line shares: a usage mistake is one line on stderr and exit status 2.

argparse's own error() prints the whole usage before the message; `OneLineParser` prints only
`prog: error: message`. The argument types below reject out-of-range numbers while parsing,
so a CLI fails before it loads a model.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`--help` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


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
unit_interval = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
