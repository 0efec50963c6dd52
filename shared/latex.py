r"""Reading ``\boxed{…}`` out of LaTeX text, brace for brace: the reward server's answers and the trainer's
ground truths (ViRL39K writes its answers boxed) are read by the same code."""

from __future__ import annotations

import re
from typing import NamedTuple


class Span(NamedTuple):
    start: int
    end: int
    content: str


# A backslash escapes the next character (so ``\{`` and ``\}`` are literal braces); everything else is
# skipped by the regular expression engine, not by a Python loop.
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)


def group_end(text: str, open_at: int) -> int | None:
    """The index just past the brace that closes the one at ``open_at``, or None if it never closes."""
    depth = 0
    for token in _BRACE_TOKENS.finditer(text, open_at):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return token.end()
    return None


def last_boxed(text: str) -> Span | None:
    r"""The last ``\boxed{…}`` of ``text``, matched brace for brace; None if there is none or it never
    closes (a truncated response has no final answer)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    open_at = start + len("\\boxed")
    end = group_end(text, open_at)
    if end is None:
        return None
    return Span(start, end, text[open_at + 1 : end - 1])
