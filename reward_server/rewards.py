r"""The built-in reward functions:

* ``math``: the final answer (:func:`extract_answer`) is equivalent to the ground truth, by math-verify;
* ``format``: ``<think>…</think>`` followed by a ``\boxed{…}`` answer (or an ``<answer>…</answer>`` block);
* ``choice``: the chosen multiple-choice letter is the ground truth's;
* ``exact``: the answer equals the ground truth as normalised text;
* ``numeric``: the answer is the ground truth's number, within a relative and an absolute tolerance;
* ``iou``: the intersection over union of the answer's bounding box and the ground truth's.

Nothing here evaluates model output as code: answers are read with string scanning, a few anchored
regular expressions written to run in linear time, ``float()``, and math-verify's LaTeX parser (never
its ``ExprExtractionConfig``, which hands text to sympy's ``parse_expr`` and so to ``eval``). What can
still be slow (sympy on a hostile expression) runs in the worker processes of ``reward_server.pool``,
which enforce the per-item timeout; math-verify's own ``signal.alarm`` timeouts are switched off.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Field

from reward_server.registry import RewardFunction, defined_in, reward_function
from shared.latex import Span, last_boxed

MAX_ANSWER_CHARS = 1000
"""Default longest answer that ``math`` hands to math-verify; longer answers score 0."""
MAX_ANSWER_DEPTH = 10
"""Default deepest bracket nesting that ``math`` hands to math-verify; deeper answers score 0.
math-verify's LaTeX parser slows down sharply with depth (seconds at 12 levels of braces, minutes at 50),
while real final answers rarely nest past five."""
MAX_NUMBER_DIGITS = 1_000_000
"""Default most digits an integer power or factorial written in an answer may have before ``math``
refuses to evaluate it. sympy computes such numbers exactly: a million digits takes it a fraction of a
second, while a tower like ``9^{9^{9}}`` (370 million digits) would hold a worker for minutes."""


# --- finding the final answer ----------------------------------------------------------------------


# Brackets of every kind, for nesting depth; a backslash escapes the next character.
_BRACKET_TOKENS = re.compile(r"\\.|[{}()\[\]]", re.DOTALL)


def last_answer_tag(text: str) -> Span | None:
    """The last ``<answer>…</answer>`` block of ``text``, or None."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    close = text.find("</answer>", start + len("<answer>"))
    if close < 0:
        return None
    return Span(start, close + len("</answer>"), text[start + len("<answer>") : close])


def extract_answer(text: str) -> str | None:
    r"""The final answer of a response: the content of its last ``\boxed{…}`` or of its last
    ``<answer>…</answer>``, whichever closes later (a ``\boxed{}`` inside that answer block is unwrapped),
    with surrounding whitespace removed. None when there is neither, or the answer is empty."""
    boxed, tag = last_boxed(text), last_answer_tag(text)
    if tag is not None and (boxed is None or tag.end > boxed.end):
        inner = last_boxed(tag.content)
        answer = inner.content if inner is not None else tag.content
    elif boxed is not None:
        answer = boxed.content
    else:
        return None
    return answer.strip() or None


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``{``, ``(`` and ``[`` (all counted together; escaped ones ignored)."""
    depth = deepest = 0
    for token in _BRACKET_TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in "})]":
            depth = max(depth - 1, 0)
    return deepest


# An integer literal, or a number already estimated and written as <its digits>.
_NUMBER = r"(\d+|<\d+>)"
_GROUPED_NUMBER = re.compile(r"[({]\s*" + _NUMBER + r"\s*[)}]")
_INTEGER_POWER = re.compile(_NUMBER + r"\s*\^\s*" + _NUMBER)
_INTEGER_FACTORIAL = re.compile(_NUMBER + r"\s*!")
_EXACT_DIGITS = 15
"""Numbers under this many digits are written out as the estimate goes on; longer ones as <digits>."""


def _log10(number: str) -> float:
    """log10 of a :data:`_NUMBER` (0 for 0)."""
    if number.startswith("<"):
        return float(number[1:-1])
    if len(number) > _EXACT_DIGITS:
        return float(len(number.lstrip("0")) - 1)
    return math.log10(int(number)) if int(number) > 0 else 0.0


def _is_small(number: str) -> bool:
    return not number.startswith("<") and len(number) <= _EXACT_DIGITS


def _power(base: str, exponent: str) -> tuple[float, str]:
    """(digits of base^exponent, what to write in its place)."""
    if _is_small(exponent) and int(exponent) == 0:
        return 0.0, "1"
    if _is_small(base) and int(base) <= 1:  # 0 and 1 stay what they are, whatever the exponent
        return 0.0, str(int(base))
    if not _is_small(exponent):
        return math.inf, ""
    digits = _log10(base) * int(exponent)
    return digits, str(int(base) ** int(exponent)) if digits < _EXACT_DIGITS else f"<{math.floor(digits)}>"


def _factorial(n: str) -> tuple[float, str]:
    """(digits of n!, what to write in its place)."""
    if not _is_small(n):
        return math.inf, ""
    digits = math.lgamma(int(n) + 1) / math.log(10)
    return digits, str(math.factorial(int(n))) if digits < _EXACT_DIGITS else f"<{math.floor(digits)}>"


def largest_number_digits(text: str) -> float:
    r"""About how many digits the largest integer power or factorial in ``text`` has, nested ones
    included: ``9^{9^{9}}`` -> 3.7e8, ``(10!)!`` -> 2.2e7, ``2^{10}`` -> 3.0. Only integer literals
    are followed (``x^{9}`` is no number), and LaTeX's grouping braces are read as brackets."""
    largest = 0.0
    while True:  # each round replaces one ^ or ! by a number, so it ends
        while (ungrouped := _GROUPED_NUMBER.sub(r"\1", text)) != text:
            text = ungrouped
        if found := _INTEGER_POWER.search(text):
            digits, value = _power(found.group(1), found.group(2))
        elif found := _INTEGER_FACTORIAL.search(text):
            digits, value = _factorial(found.group(1))
        else:
            return largest
        largest = max(largest, digits)
        if largest > 1e12:  # beyond any limit; and its value could not be written down
            return math.inf
        text = text[: found.start()] + value + text[found.end() :]


_TEXT_COMMAND = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}"
)


def unwrap_text_commands(text: str) -> str:
    r"""``\text{red}`` -> ``red``, for ``\text``, ``\textbf``, ``\mathrm`` and their kin, innermost first."""
    for _ in range(16):  # nesting this deep is not an answer; what is left stays wrapped
        unwrapped = _TEXT_COMMAND.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    return text


def _strip_math_delimiters(text: str) -> str:
    text = text.strip()
    for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) >= len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            return text[len(opening) : len(text) - len(closing)].strip()
    return text


def _reference(ground_truth: str) -> str:
    """The answer a ground truth states: its boxed or tagged answer if it has one, else all of it."""
    return extract_answer(ground_truth) or _strip_math_delimiters(ground_truth)


# --- math ----------------------------------------------------------------------------------------

_math_verify: Any = None


def _load_math_verify() -> Any:
    global _math_verify
    if _math_verify is None:
        import math_verify

        # It warns once that its signal-based timeouts are off: they are off on purpose (see the module
        # docstring), and warnings about each unparseable answer are noise in a server log.
        for noisy in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        _math_verify = math_verify
    return _math_verify


def _parse_latex(latex: str) -> list[Any]:
    mv = _load_math_verify()
    return mv.parse(
        "\\boxed{" + latex + "}",
        extraction_config=_latex_only(mv),
        fallback_mode="no_fallback",
        parsing_timeout=None,  # no signal.alarm: the worker pool enforces the timeout
    )


_latex_config: tuple[Any, ...] | None = None


def _latex_only(mv: Any) -> tuple[Any, ...]:
    # One object, hashable, so that math-verify's compiled-pattern cache is hit on every call.
    global _latex_config
    if _latex_config is None:
        _latex_config = (mv.LatexExtractionConfig(boxed_match_priority=0),)
    return _latex_config


@reward_function("math", fast=True)
def math_reward(
    response: str,
    ground_truth: str,
    max_answer_chars: Annotated[int, Field(ge=1, le=100_000)] = MAX_ANSWER_CHARS,
    max_depth: Annotated[int, Field(ge=1, le=100)] = MAX_ANSWER_DEPTH,
    max_digits: Annotated[int, Field(ge=1, le=100_000_000)] = MAX_NUMBER_DIGITS,
) -> float:
    r"""1.0 if the response's final answer equals the ground truth mathematically, else 0.0.

    The final answer is the content of the last ``\boxed{…}`` (braces matched, escaped ``\{ \}``
    ignored) or of the last ``<answer>…</answer>``, whichever closes later. No answer, an empty one, an
    unclosed ``\boxed{``, one longer than ``max_answer_chars`` characters, one nested deeper than
    ``max_depth`` brackets, or one writing an integer power or factorial of more than ``max_digits``
    digits (``9^{9^{9}}``, ``(10!)!``: :func:`largest_number_digits`) scores 0.0 without being parsed.

    The ground truth may be bare LaTeX (``\frac{1}{2}``), wrapped in ``$…$``, or boxed. Both sides are
    read by math-verify's LaTeX parser and compared with ``math_verify.verify``: fractions, decimals and
    percentages (``\frac12``, ``0.5``, ``50\%``), equivalent expressions (``(x+1)^2`` and ``x^2+2x+1``),
    units and ``\text{}`` (``5\text{ cm}`` and ``5``), sets, intervals and equations (``x=2`` and ``2``)
    count as equal; numbers are compared after rounding to 6 decimals. An answer math-verify cannot read
    scores 0.0; a ground truth it cannot read is an error.
    """
    answer = extract_answer(response)
    if (
        answer is None
        or len(answer) > max_answer_chars
        or nesting_depth(answer) > max_depth
        or largest_number_digits(answer) > max_digits
    ):
        return 0.0
    reference = _reference(ground_truth)
    if largest_number_digits(reference) > max_digits:
        raise ValueError(f"the ground truth writes a number of more than {max_digits} digits")
    gold = _parse_latex(reference)
    if not gold:
        raise ValueError(f"math-verify cannot read the ground truth {ground_truth[:200]!r}")
    predicted = _parse_latex(answer)
    if not predicted:
        return 0.0
    return 1.0 if _load_math_verify().verify(gold, predicted, timeout_seconds=None) else 0.0


_WARM_UP = [
    ("\\frac{1}{2}", "0.5"),
    ("2^{10}", "1024"),
    ("x^{2}+2x+1", "(x+1)^2"),
    ("\\sqrt{3}\\pi", "\\pi\\sqrt{3}"),
    ("[0, 1)", "x \\in [0, 1)"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("50\\%", "0.5"),
    ("5\\text{ cm}", "5"),
    ("\\binom{5}{2}", "10"),
    ("3!", "6"),
    ("-\\frac{\\sqrt{2}}{2}", "\\cos(3\\pi/4)"),
]
"""An answer and a ground truth of each kind math-verify handles along a path of its own."""


def warm_up() -> None:
    """Run math-verify once along each of its main paths, so that a worker's first items are not slow
    (sympy compiles and caches as it first meets each kind of expression)."""
    for answer, ground_truth in _WARM_UP:
        math_reward(f"\\boxed{{{answer}}}", ground_truth)


# --- format --------------------------------------------------------------------------------------


@reward_function("format", needs_ground_truth=False, fast=True)
def format_reward(
    response: str, ground_truth: str = "", style: Literal["boxed", "answer"] = "boxed"
) -> float:
    r"""1.0 if the response has the required layout, else 0.0; the ground truth is not used.

    Leading and trailing whitespace is ignored. The response must start with ``<think>`` and hold
    exactly one ``<think>`` and one ``</think>``. Then, with ``style="boxed"`` (the CPPO paper's
    format), a ``\boxed{…}`` with matched braces and a non-empty content must follow the ``</think>``
    (other text may surround it, but the last ``\boxed{`` must close). With ``style="answer"``, only
    whitespace and one non-empty ``<answer>…</answer>`` block may follow the ``</think>``.
    """
    text = response.strip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return 0.0
    after = text[text.index("</think>") + len("</think>") :]
    if style == "boxed":
        boxed = last_boxed(after)
        return 1.0 if boxed is not None and boxed.content.strip() else 0.0
    after = after.strip()
    if not (after.startswith("<answer>") and after.endswith("</answer>")):
        return 0.0
    if after.count("<answer>") != 1 or after.count("</answer>") != 1:
        return 0.0
    return 1.0 if after[len("<answer>") : -len("</answer>")].strip() else 0.0


# --- choice --------------------------------------------------------------------------------------

# "B", "(B)", "B.", "B)", "B: Paris", "(B) Paris"; not "Bob" or "(Bob)".
_LETTER = re.compile(r"\(?([A-Za-z])(?:\)|(?=[.:\s]|$))")
# "the answer is B", "Answer: (C)", "answer B"; the letter in capitals, so that "answer is a" is no answer.
_ANSWER_IS = re.compile(r"[Aa][Nn][Ss][Ww][Ee][Rr](?:\s+is)?(?:\s*:)?\s*\(?([A-Z])\)?(?![A-Za-z0-9])")
# A response that is a letter, or opens with one: "B", "(B)", "B.", "B) because", "(C) Paris".
_OPENING_LETTER = re.compile(r"\(([A-Z])\)|([A-Z])(?:[.):](?:\s|$)|$)")


def choice_letter(text: str) -> str | None:
    r"""The letter that an answer or a ground truth names (``B``, ``(b)``, ``B.``, ``\text{B}``,
    ``B: Paris``), in capitals; None if it names none."""
    match = _LETTER.match(_strip_math_delimiters(unwrap_text_commands(text)).strip())
    return match.group(1).upper() if match else None


def _check_choice(ground_truth: str) -> None:
    if choice_letter(_reference(ground_truth)) is None:
        raise ValueError(f"{ground_truth[:100]!r} is not an option letter such as 'B' or '(B)'")


@reward_function("choice", check_ground_truth=_check_choice, fast=True)
def choice_reward(response: str, ground_truth: str) -> float:
    r"""1.0 if the response picks the ground truth's option letter (A–Z), else 0.0.

    The ground truth is a letter, in forms such as ``B``, ``(B)``, ``b.`` or ``\boxed{B}``. The
    response's letter is, in order: that of its final answer (``\boxed{B}``, ``\boxed{(B)}``,
    ``<answer>B. Paris</answer>``), when it has one; else the capital letter after the last "answer is"
    or "answer:" (``The answer is (B)``); else the capital letter the response consists of or opens
    with (``B``, ``(B)``, ``B. Because…``). A response with none of these scores 0.0.
    """
    expected = choice_letter(_reference(ground_truth))
    if expected is None:
        raise ValueError(f"{ground_truth[:100]!r} is not an option letter")
    answer = extract_answer(response)
    if answer is not None:
        chosen = choice_letter(answer)
    else:
        chosen = None
        for chosen_match in _ANSWER_IS.finditer(response):
            chosen = chosen_match.group(1)
        if chosen is None:
            opening = _OPENING_LETTER.match(response.strip())
            chosen = (opening.group(1) or opening.group(2)) if opening else None
    return 1.0 if chosen == expected else 0.0


# --- exact ---------------------------------------------------------------------------------------

_SURROUNDING = " \t\n.,;:!?\"'`*"


def normalize_text(text: str, case_sensitive: bool = False) -> str:
    r"""Text as ``exact`` compares it: ``\text{}``-like wrappers and ``$`` removed, runs of whitespace
    made one space, surrounding whitespace and punctuation (``. , ; : ! ? " ' ` *``) stripped, and
    case folded unless ``case_sensitive``."""
    text = " ".join(unwrap_text_commands(text).replace("$", "").split()).strip(_SURROUNDING)
    return text if case_sensitive else text.casefold()


def _check_exact(ground_truth: str) -> None:
    if not normalize_text(_reference(ground_truth), case_sensitive=True):
        raise ValueError("the ground truth is empty once normalised")


@reward_function("exact", check_ground_truth=_check_exact, fast=True)
def exact_reward(response: str, ground_truth: str, case_sensitive: bool = False) -> float:
    r"""1.0 if the answer equals the ground truth as normalised text, else 0.0.

    The answer is the response's final answer (last ``\boxed{…}`` or ``<answer>…</answer>``) or, when
    it has none, the whole response; the ground truth is likewise its boxed answer or all of it. Both
    are normalised by :func:`normalize_text`: so ``\text{Red}.``, ``red`` and `` RED `` are equal (unless
    ``case_sensitive``), while ``red`` and ``dark red`` are not.
    """
    answer = extract_answer(response)
    if answer is None:
        answer = response
    expected = normalize_text(_reference(ground_truth), case_sensitive)
    return 1.0 if expected and normalize_text(answer, case_sensitive) == expected else 0.0


# --- numeric -------------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUMBER_IN_TEXT = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_SLASH = re.compile(r"([^/]+)/([^/]+)")
_TIMES_TEN = re.compile(r"(.+?)\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^\s*\{?\s*([+-]?\d{1,4})\s*\}?")
# A trailing unit, percent sign or degree sign: "5 cm", "50%", "30°", "30^\circ", "12 apples".
_UNIT = re.compile(r"\s*(?:%|°|\^\s*\{?\\circ\}?|\\circ|[A-Za-z][A-Za-z .]{0,40})$")


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 (the loop is how to reach the last match)
        pass
    return last


def _plain(text: str) -> float | None:
    text = text.strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    value = float(text.replace(",", ""))
    return value if math.isfinite(value) else None


def parse_number(text: str) -> float | None:
    r"""The number an answer states, or None. Accepts ``-1,234.5``, ``1e3``, ``.5``, ``\frac{3}{4}``
    (and ``\dfrac``, ``\tfrac``), ``3/4``, ``2.5\times10^{3}``, LaTeX spacing (``1{,}000``, ``1\,000``),
    ``$…$``, ``\text{}``, and a trailing unit, percent or degree sign, which is dropped (``50\%`` is 50,
    ``5\text{ cm}`` is 5). Infinite results are not numbers."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    text = _strip_math_delimiters(unwrap_text_commands(text))
    for old, new in (("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\ ", " "), ("\\%", "%"), ("−", "-")):
        text = text.replace(old, new)
    text = text.replace("\\left", "").replace("\\right", "").strip().rstrip(".").strip()
    text = _UNIT.sub("", text).strip()
    if (fraction := _FRACTION.fullmatch(text)) is not None:
        sign, numerator, denominator = fraction.groups()
        return _ratio(_plain(numerator), _plain(denominator), -1.0 if sign == "-" else 1.0)
    if (slash := _SLASH.fullmatch(text)) is not None:
        return _ratio(_plain(slash.group(1)), _plain(slash.group(2)), 1.0)
    if (scaled := _TIMES_TEN.fullmatch(text)) is not None:
        mantissa = _plain(scaled.group(1))
        if mantissa is None:
            return None
        value = mantissa * 10.0 ** int(scaled.group(2))
        return value if math.isfinite(value) else None
    return _plain(text)


def _ratio(numerator: float | None, denominator: float | None, sign: float) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    value = sign * numerator / denominator
    return value if math.isfinite(value) else None


def _check_numeric(ground_truth: str) -> None:
    if parse_number(_reference(ground_truth)) is None:
        raise ValueError(f"{ground_truth[:100]!r} is not a number")


@reward_function("numeric", check_ground_truth=_check_numeric, fast=True)
def numeric_reward(
    response: str,
    ground_truth: str,
    rel_tol: Annotated[float, Field(ge=0, le=1)] = 1e-6,
    abs_tol: Annotated[float, Field(ge=0)] = 0.0,
) -> float:
    r"""1.0 if the answer is the ground truth's number within tolerance, else 0.0.

    The answer is the response's final answer (last ``\boxed{…}`` or ``<answer>…</answer>``), read by
    :func:`parse_number`; a response without one is read for its last number (``1,000``, ``-2.5``,
    ``1e3``). Equal means ``math.isclose(answer, truth, rel_tol=rel_tol, abs_tol=abs_tol)``. A final
    answer that is not a number, or a response with no number, scores 0.0.
    """
    expected = parse_number(_reference(ground_truth))
    if expected is None:
        raise ValueError(f"{ground_truth[:100]!r} is not a number")
    answer = extract_answer(response)
    if answer is not None:
        value = parse_number(answer)
    else:
        last = _last_match(_NUMBER_IN_TEXT, response)
        value = _plain(last.group()) if last is not None else None
    if value is None:
        return 0.0
    return 1.0 if math.isclose(value, expected, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


# --- iou -----------------------------------------------------------------------------------------

_COORD = r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*"
_BOX = re.compile(r"[\[(]" + ",".join([_COORD] * 4) + r"[\])]")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The last ``[x1, y1, x2, y2]`` (or ``(x1, y1, x2, y2)``) of four numbers in ``text``, or None."""
    last = _last_match(_BOX, text)
    if last is None:
        return None
    box = tuple(float(value) for value in last.groups())
    return box if all(math.isfinite(value) for value in box) else None  # type: ignore[return-value]


def _proper(box: tuple[float, float, float, float] | None) -> bool:
    return box is not None and box[2] > box[0] and box[3] > box[1]


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes with ``x2 > x1`` and ``y2 > y1``."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union


def _check_iou(ground_truth: str) -> None:
    if not _proper(parse_box(ground_truth)):
        raise ValueError(f"{ground_truth[:100]!r} is not a box [x1, y1, x2, y2] with x2 > x1 and y2 > y1")


@reward_function("iou", check_ground_truth=_check_iou, fast=True)
def iou_reward(
    response: str,
    ground_truth: str,
    mode: Literal["threshold", "continuous"] = "threshold",
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5,
) -> float:
    r"""How well the response's bounding box matches the ground truth's.

    Boxes are four numbers ``[x1, y1, x2, y2]`` (or in parentheses), corners top-left then
    bottom-right, in any one unit (pixels or fractions of the image). The response's box is the last
    one in its final answer (last ``\boxed{…}`` or ``<answer>…</answer>``), or in the whole response when
    it has none; the ground truth's is the last one in it. With ``mode="threshold"`` the score is 1.0
    when IoU ≥ ``threshold`` and 0.0 otherwise; with ``mode="continuous"`` it is the IoU itself. A
    response with no box, or with a degenerate one (``x2 ≤ x1`` or ``y2 ≤ y1``), scores 0.0.
    """
    expected = parse_box(ground_truth)
    if expected is None or not _proper(expected):
        raise ValueError(f"{ground_truth[:100]!r} is not a proper box")
    answer = extract_answer(response)
    predicted = parse_box(answer if answer is not None else response)
    if predicted is None or not _proper(predicted):
        return 0.0
    iou = box_iou(predicted, expected)
    if mode == "continuous":
        return iou
    return 1.0 if iou >= threshold else 0.0


BUILTINS: tuple[RewardFunction, ...] = tuple(
    replace(function, source="builtin") for function in defined_in(__name__)
)
"""The built-in reward functions: every one this module marks."""
