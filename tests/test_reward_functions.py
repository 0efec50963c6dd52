r"""The reward functions against known answers (right, wrong, equivalent forms, malformed), the
registry that combines them, plugins, and the server's settings. No server, no worker processes: these
call the functions directly."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from reward_server.config import PAPER_REWARD, RewardSettings, parse_reward_spec
from reward_server.examples.length_penalty import length_penalty
from reward_server.plugins import PluginError, load_registry
from reward_server.registry import (
    ItemProblem,
    Registry,
    RewardFunction,
    ScoringError,
    Task,
    combine,
    defined_in,
    evaluate,
    reward_function,
)
from reward_server.rewards import (
    BUILTINS,
    box_iou,
    choice_reward,
    exact_reward,
    extract_answer,
    format_reward,
    iou_reward,
    largest_number_digits,
    math_reward,
    nesting_depth,
    numeric_reward,
    parse_number,
)
from shared.latex import last_boxed
from shared.settings import exposure_problem


def marked(fn: Callable[..., float]) -> RewardFunction:
    """What the registry knows of a function marked in this module."""
    return next(function for function in defined_in(__name__) if function.fn is fn)


def boxed(answer: str) -> str:
    return "<think>Let me work it out.</think> The final answer is \\boxed{" + answer + "}."


# --- finding the answer ----------------------------------------------------------------------------


def test_last_boxed_matches_braces_and_skips_escaped_ones():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}").content == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\{1, 2\}} done").content == r"\{1, 2\}"  # \{ \} are literal braces
    assert last_boxed(r"\boxed{a{b{c}}d}").content == "a{b{c}}d"
    assert last_boxed(r"\boxed{1} and then \boxed{2") is None  # the final box never closes: no answer
    assert last_boxed("no box here") is None


def test_extract_answer_takes_whichever_closes_last():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer(r"\boxed{1} ... <answer>2</answer>") == "2"
    assert extract_answer(r"<answer>2</answer> ... \boxed{3}") == "3"
    assert extract_answer(r"<answer>so \boxed{4}</answer>") == "4"  # a box inside the answer is unwrapped
    assert extract_answer(r"\boxed{ }") is None
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("plain text") is None


def test_nesting_depth_counts_all_brackets_but_escaped_ones():
    assert nesting_depth("1") == 0
    assert nesting_depth(r"\frac{\sqrt{3}}{2}") == 2
    assert nesting_depth(r"\left(\frac{1}{2}\right)") == 2
    assert nesting_depth(r"\{1,2\}") == 0
    assert nesting_depth("[0,1)") == 1
    assert nesting_depth("{" * 50 + "}" * 50) == 50


# --- math ----------------------------------------------------------------------------------------

EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"0.5", r"\frac{1}{2}"),
    (r"1/2", r"\frac{1}{2}"),
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"(x+1)^2", "x^2+2x+1"),
    (r"5\text{ cm}", "5"),
    (r"50\%", "0.5"),
    (r"\{2, 1\}", r"\{1, 2\}"),
    (r"[0, 1)", "[0,1)"),
    (r"x = 2", "2"),
    (r"1,000", "1000"),
    (r"2^{1/2}", r"\sqrt{2}"),
    (r"-3", "-3"),
]


@pytest.mark.parametrize(("answer", "truth"), EQUIVALENT)
def test_math_accepts_equivalent_forms(answer, truth):
    assert math_reward(boxed(answer), truth) == 1.0


WRONG = [
    ("3", "4"),
    (r"[0,1]", "(0,1]"),  # closed and half-open intervals differ
    ("0.333", r"\frac{1}{3}"),  # rounded too early
    ("x^2+1", "(x+1)^2"),
    ("(2,1)", "(1,2)"),
    ("-3", "3"),
]


@pytest.mark.parametrize(("answer", "truth"), WRONG)
def test_math_rejects_wrong_answers(answer, truth):
    assert math_reward(boxed(answer), truth) == 0.0


def test_math_reads_the_answer_tag_and_boxed_or_dollar_ground_truths():
    assert math_reward("<think>hm</think><answer>\\frac{3}{4}</answer>", "0.75") == 1.0
    assert math_reward(boxed("7"), r"\boxed{7}") == 1.0
    assert math_reward(boxed("7"), "$7$") == 1.0
    # The last box is the answer, even when an earlier one was right.
    assert math_reward(r"\boxed{7} no wait, \boxed{8}", "7") == 0.0


@pytest.mark.parametrize(
    "response",
    [
        "the answer is 7",  # no box, no tag
        r"\boxed{7",  # never closes
        r"\boxed{}",  # empty
        r"\boxed{\frac{}{}}",  # unreadable
        "\\boxed{" + "7" * 1001 + "}",  # longer than max_answer_chars
        "\\boxed{" + "{" * 11 + "7" + "}" * 11 + "}",  # deeper than max_depth
        r"\boxed{9^{9^{9^{9}}}}",  # more digits than max_digits: sympy would compute it for ever
        r"\boxed{(10!)!}",
    ],
)
def test_math_scores_malformed_answers_zero(response):
    assert math_reward(response, "7") == 0.0


def test_math_bounds_are_parameters():
    deep = "\\boxed{" + "(" * 11 + "7" + ")" * 11 + "}"
    assert math_reward(deep, "7") == 0.0
    assert math_reward(deep, "7", max_depth=12) == 1.0
    assert math_reward(boxed("7" * 5), "77777", max_answer_chars=4) == 0.0


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("x^{2}+1", 0.0),  # no number: nothing to estimate
        (r"\frac{1}{2}", 0.0),
        ("2^{10}", math.log10(1024)),
        ("10^{10^{2}}", 100.0),  # the inner power first: 10^{100}
        ("{(2^{3})}^{4}", math.log10(4096)),  # braces and brackets around a number group it
        ("9^{9^{9}}", 9**9 * math.log10(9)),
        ("100!", math.lgamma(101) / math.log(10)),
        ("(10!)!", math.lgamma(3628801) / math.log(10)),
        ("3!=6", math.log10(6)),
        ("1^{9^{99}}", 99 * math.log10(9)),  # 1 stays 1, but sympy still meets 9^{99} first
        ("0^{0}", 0.0),
        ("9^{9^{9^{9}}}", math.inf),  # the exponent alone has 370 million digits
        ("(10^{20})!", math.inf),
    ],
)
def test_largest_number_digits_estimates_powers_and_factorials(text, digits):
    assert largest_number_digits(text) == pytest.approx(digits)


def test_math_digit_bound_is_a_parameter_and_guards_the_ground_truth_too():
    assert math_reward(boxed("2^{100}"), "2^{100}") == 1.0
    assert math_reward(boxed("2^{100}"), "2^{100}", max_digits=30) == 0.0  # 2^100 has 31 digits
    with pytest.raises(ValueError, match="ground truth writes a number of more than 30 digits"):
        math_reward(boxed("1"), "2^{100}", max_digits=30)


def test_math_refuses_a_ground_truth_it_cannot_read():
    with pytest.raises(ValueError, match="ground truth"):
        math_reward(boxed("1"), "???")


def test_math_works_off_the_main_thread():
    # math-verify's default timeouts use signal.alarm, which raises off the main thread; ours are off.
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_reward, boxed(r"\frac{1}{2}"), "0.5").result() == 1.0
        assert pool.submit(math_reward, boxed("2"), "3").result() == 0.0


# --- format --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"<think>reasoning</think> so \boxed{42}", 1.0),
        ("\n  <think>reasoning</think>\\boxed{42}\n", 1.0),  # surrounding whitespace is ignored
        (r"<think></think>\boxed{x}", 1.0),
        (r"\boxed{42}", 0.0),  # no thinking
        (r"The answer: <think>r</think>\boxed{42}", 0.0),  # must open with <think>
        (r"<think>r</think><think>again</think>\boxed{42}", 0.0),  # two think blocks
        (r"<think>r \boxed{42}</think> done", 0.0),  # the box is inside the thinking
        (r"<think>r</think>\boxed{}", 0.0),  # empty box
        (r"<think>r</think>\boxed{42", 0.0),  # unclosed box
        (r"<think>r</think><answer>42</answer>", 0.0),  # the other style
    ],
)
def test_format_boxed_style(response, expected):
    assert format_reward(response, "") == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>r</think> <answer>42</answer>", 1.0),
        ("<think>r</think>\n<answer>\\boxed{42}</answer>\n", 1.0),
        ("<think>r</think><answer>42</answer> trailing text", 0.0),
        ("<think>r</think><answer> </answer>", 0.0),
        ("<think>r</think>42", 0.0),
        ("<answer>42</answer>", 0.0),
    ],
)
def test_format_answer_style(response, expected):
    assert format_reward(response, "", style="answer") == expected


# --- choice --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        r"\boxed{B}",
        r"<think>A or B?</think> \boxed{(B)}",
        r"\boxed{\text{B}}",
        "<answer>B. Paris</answer>",
        "The answer is (B).",
        "Answer: B",
        "I first thought the answer is C, but on reflection the answer is B",
        "B",
        "(B)",
        "B.",
        "B) because it is",
    ],
)
def test_choice_finds_the_letter(response):
    assert choice_reward(response, "B") == 1.0


@pytest.mark.parametrize(
    "response",
    [r"\boxed{C}", "The answer is C.", "Bob", "a cat", "(Bob)", "", r"\boxed{Paris}", "The answer is b"],
)
def test_choice_rejects_other_or_no_letters(response):
    assert choice_reward(response, "B") == 0.0


@pytest.mark.parametrize("truth", ["B", "(b)", "B.", r"\boxed{B}", " B "])
def test_choice_reads_ground_truth_forms(truth):
    assert choice_reward(r"\boxed{B}", truth) == 1.0


def test_choice_refuses_a_ground_truth_that_is_no_letter():
    registry = Registry(BUILTINS)
    with pytest.raises(ItemProblem) as problem:
        registry.plan("choice", r"\boxed{B}", "Paris")
    assert problem.value.field == "ground_truth"


# --- exact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response", [r"\boxed{\text{Red}}", "Red.", "  RED  ", "**red**", "<answer>red</answer>"]
)
def test_exact_normalises_case_space_punctuation_and_text_wrappers(response):
    assert exact_reward(response, "red") == 1.0


@pytest.mark.parametrize("response", ["dark red", r"\boxed{blue}", "", r"\boxed{red} or blue"])
def test_exact_rejects_other_text(response):
    # The last one has a final answer (red): it is what counts, not the words around it.
    expected = 1.0 if response == r"\boxed{red} or blue" else 0.0
    assert exact_reward(response, "red") == expected


def test_exact_case_sensitive_and_boxed_truth():
    assert exact_reward("Red", "red", case_sensitive=True) == 0.0
    assert exact_reward("Red", r"\boxed{Red}", case_sensitive=True) == 1.0
    assert exact_reward("circle", r"\boxed{\text{circle}}") == 1.0


# --- numeric -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42.0),
        ("-1,234.5", -1234.5),
        ("1e3", 1000.0),
        (".5", 0.5),
        (r"\frac{3}{4}", 0.75),
        (r"-\dfrac{1}{8}", -0.125),
        ("3/4", 0.75),
        (r"2.5\times10^{3}", 2500.0),
        (r"1{,}000", 1000.0),
        (r"50\%", 50.0),
        (r"5\text{ cm}", 5.0),
        ("30^\\circ", 30.0),
        ("$7$", 7.0),
        ("12 apples", 12.0),
        ("abc", None),
        ("1/0", None),
        ("1e999", None),  # infinite
        ("1.2.3", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numeric_compares_within_tolerance():
    assert numeric_reward(r"\boxed{1,000}", "1e3") == 1.0
    assert numeric_reward(r"\boxed{\frac{3}{4}}", "0.75") == 1.0
    assert numeric_reward(r"\boxed{0.3333334}", r"\frac{1}{3}") == 1.0  # relative error 2e-7 < 1e-6
    assert numeric_reward(r"\boxed{3.1416}", "3.14159") == 0.0  # 3e-6 off, over the default 1e-6
    assert numeric_reward(r"\boxed{3.1416}", "3.14159", rel_tol=1e-4) == 1.0
    assert numeric_reward(r"\boxed{0.001}", "0") == 0.0
    assert numeric_reward(r"\boxed{0.001}", "0", abs_tol=0.01) == 1.0
    assert numeric_reward(r"\boxed{41}", "42") == 0.0


def test_numeric_without_a_final_answer_reads_the_last_number():
    assert numeric_reward("We had 3 bags of 14, so 42 apples in all.", "42") == 1.0
    assert numeric_reward("42 apples, minus 2, leaves 40.", "42") == 0.0
    assert numeric_reward("no numbers at all", "42") == 0.0
    assert numeric_reward(r"\boxed{forty-two}", "42") == 0.0  # a final answer that is no number


# --- iou -----------------------------------------------------------------------------------------


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    # Overlap 5 x 10 = 50; union 100 + 100 - 50 = 150.
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # Overlap 5 x 5 = 25; union 100 + 100 - 25 = 175.
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area


def test_iou_modes_and_forms():
    truth = "[0, 0, 10, 10]"
    assert iou_reward(r"\boxed{[0, 0, 10, 10]}", truth) == 1.0
    assert iou_reward("The box is (5, 0, 15, 10).", truth) == 0.0  # IoU 1/3 < 0.5
    assert iou_reward("The box is (5, 0, 15, 10).", truth, threshold=0.3) == 1.0
    assert iou_reward("[5, 0, 15, 10]", truth, mode="continuous") == pytest.approx(1 / 3)
    assert iou_reward("first [50, 50, 60, 60], then [0, 0, 10, 10]", truth) == 1.0  # the last box
    assert iou_reward("[0.0, 0.0, 0.5, 0.5]", "[0, 0, 0.5, 0.5]", mode="continuous") == 1.0


@pytest.mark.parametrize(
    "response",
    ["[10, 10, 0, 0]", "[0, 0, 0, 10]", "[0, 0, 10]", "no box", "[a, b, c, d]", "[1e999, 0, 2, 2]"],
)
def test_iou_scores_degenerate_or_missing_boxes_zero(response):
    assert iou_reward(response, "[0, 0, 10, 10]", mode="continuous") == 0.0


def test_iou_refuses_a_degenerate_ground_truth():
    with pytest.raises(ItemProblem, match="not a box"):
        Registry(BUILTINS).plan("iou", "[0, 0, 1, 1]", "[5, 5, 5, 9]")


# --- registry and combinations -------------------------------------------------------------------


def test_combine_is_the_weighted_sum():
    assert combine({"math": 0.9, "format": 0.1}, {"math": 1.0, "format": 1.0}) == pytest.approx(1.0)
    assert combine({"math": 0.9, "format": 0.1}, {"math": 0.0, "format": 1.0}) == pytest.approx(0.1)
    assert combine({"math": 0.9, "format": 0.1}, {"math": 1.0, "format": 0.0}) == pytest.approx(0.9)
    assert combine({"a": 2.0, "b": -0.5}, {"a": 0.25, "b": 1.0}) == pytest.approx(0.0)


def test_plan_names_the_field_at_fault():
    registry = Registry(BUILTINS)

    def field(*args, **kwargs) -> str:
        with pytest.raises(ItemProblem) as problem:
            registry.plan(*args, **kwargs)
        return problem.value.field

    assert field("nope", "r", "1") == "reward"
    assert field({"math": 0.5, "nope": 0.5}, "r", "1") == "reward"
    assert field("math", "r", "  ") == "ground_truth"
    assert field({"math": 0.9, "format": 0.1}, "r", "") == "ground_truth"
    assert field("numeric", "r", "many") == "ground_truth"
    assert field("iou", "r", "[0,0,1,1]", {"iou": {"mode": "fuzzy"}}) == "meta.iou.mode"
    assert field("iou", "r", "[0,0,1,1]", {"iou": {"treshold": 0.4}}) == "meta.iou.treshold"
    assert field("iou", "r", "[0,0,1,1]", {"iou": "continuous"}) == "meta.iou"
    assert field("numeric", "r", "1", {"numeric": {"rel_tol": -1}}) == "meta.numeric.rel_tol"


def test_plan_makes_the_task():
    registry = Registry(BUILTINS)
    weights, task = registry.plan(
        {"math": 0.9, "format": 0.1}, "resp", "7", {"math": {"max_depth": 4}, "question": "q"}
    )
    assert weights == {"math": 0.9, "format": 0.1}
    assert task == Task(("math", "format"), "resp", "7", {"math": {"max_depth": 4}}, {}, fast=True)
    # format alone needs no ground truth
    assert registry.plan("format", "resp", "")[1].names == ("format",)


def test_evaluate_runs_each_component_with_its_parameters():
    registry = Registry(BUILTINS)
    _, task = registry.plan(
        {"math": 0.9, "format": 0.1, "iou": 1.0},
        r"<think>t</think>\boxed{[0, 0, 10, 10]} and [5, 0, 15, 10]",
        "[5, 0, 15, 10]",
        {"iou": {"mode": "continuous"}},
    )
    # The final answer is the boxed box: IoU 1/3 with the truth, and not the same tuple for math; the
    # layout is right.
    assert evaluate(registry, task) == {"math": 0.0, "format": 1.0, "iou": pytest.approx(1 / 3)}


def test_evaluate_refuses_non_numbers_and_names_the_function():
    @reward_function("nan_maker", needs_ground_truth=False)
    def nan_maker(response: str, ground_truth: str) -> float:
        return math.nan

    @reward_function("thrower", needs_ground_truth=False)
    def thrower(response: str, ground_truth: str) -> float:
        raise RuntimeError("boom")

    registry = Registry([*BUILTINS, marked(nan_maker), marked(thrower)])
    with pytest.raises(ScoringError, match="nan_maker returned nan, not a finite number"):
        evaluate(registry, registry.plan("nan_maker", "r", "")[1])
    with pytest.raises(ScoringError, match="thrower failed: RuntimeError: boom"):
        evaluate(registry, registry.plan("thrower", "r", "")[1])


def test_functions_with_a_meta_parameter_receive_the_whole_meta():
    @reward_function("mentions_question", needs_ground_truth=False)
    def mentions_question(response: str, ground_truth: str, meta: dict | None = None) -> float:
        return 1.0 if (meta or {}).get("question", "\0") in response else 0.0

    registry = Registry([marked(mentions_question)])
    _, task = registry.plan("mentions_question", "why is the sky blue? because", "", {"question": "sky"})
    assert evaluate(registry, task) == {"mentions_question": 1.0}


def _first_parameter_misnamed(text, ground_truth):
    return 1.0


def _parameter_without_default(response, ground_truth, k):
    return 1.0


def _keyword_catch_all(response, ground_truth, **kwargs):
    return 1.0


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (_first_parameter_misnamed, "must take \\(response, ground_truth"),
        (_parameter_without_default, "'k' needs a default"),
        (_keyword_catch_all, "kwargs"),
    ],
)
def test_reward_function_refuses_unusable_signatures(function, message):
    with pytest.raises(TypeError, match=message):
        reward_function("f")(function)


def test_reward_function_refuses_unusable_names():
    with pytest.raises(TypeError, match="not a usable reward function name"):
        reward_function("math:0.9")(lambda response, ground_truth: 1.0)


def test_registry_lists_functions_with_parameters():
    info = {entry.name: entry for entry in Registry(BUILTINS).info()}
    assert sorted(info) == ["choice", "exact", "format", "iou", "math", "numeric"]
    assert info["iou"].parameters["mode"] == {
        "default": "threshold",
        "enum": ["threshold", "continuous"],
        "type": "string",
    }
    assert info["iou"].parameters["threshold"] == {
        "default": 0.5,
        "minimum": 0,
        "maximum": 1,
        "type": "number",
    }
    assert info["format"].needs_ground_truth is False and info["math"].needs_ground_truth is True
    assert info["choice"].parameters == {}
    assert all(entry.source == "builtin" and entry.summary for entry in info.values())


# --- plugins -------------------------------------------------------------------------------------

PLUGIN = """
from reward_server.plugins import reward_function
from reward_server.rewards import math_reward  # imported, not defined here: not registered again

@reward_function("shouty", needs_ground_truth=False)
def shouty(response: str, ground_truth: str, threshold: float = 0.5) -> float:
    '''The share of letters in capitals, 1.0 past the threshold.'''
    letters = [c for c in response if c.isalpha()]
    share = sum(c.isupper() for c in letters) / len(letters) if letters else 0.0
    return 1.0 if share >= threshold else share
"""


def test_plugins_load_from_a_file_and_from_a_module(tmp_path: Path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    registry = load_registry([str(path), "reward_server.examples.length_penalty"])
    assert registry.names() == sorted(
        ["choice", "exact", "format", "iou", "math", "numeric", "shouty", "length_penalty"]
    )
    assert registry["shouty"].fn("Abcd", "") == 0.25
    assert registry["shouty"].fn("ABCd", "") == 1.0
    assert registry["length_penalty"].source == "reward_server.examples.length_penalty"


def test_example_plugin_by_hand():
    assert length_penalty("x" * 2000, "") == 0.0
    assert length_penalty("x" * 3000, "") == 0.5
    assert length_penalty("x" * 10, "", max_chars=5) == 1.0
    assert length_penalty("x" * 99, "", max_chars=5) == 1.0


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("missing_rewards_module", "not importable"),
        ("/nowhere/rewards.py", "does not exist"),
        ("reward_server.config", "defines no function"),
    ],
)
def test_unloadable_plugins_are_refused(plugin, message):
    with pytest.raises(PluginError, match=message):
        load_registry([plugin])


def test_broken_or_clashing_plugins_are_refused(tmp_path: Path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no config')\n")
    with pytest.raises(PluginError, match="RuntimeError: no config"):
        load_registry([str(broken)])
    clash = tmp_path / "clash.py"
    clash.write_text(
        textwrap.dedent(
            """
            from reward_server.plugins import reward_function

            @reward_function("math")
            def my_math(response, ground_truth):
                return 1.0
            """
        )
    )
    with pytest.raises(PluginError, match="two reward functions are called 'math'"):
        load_registry([str(clash)])


def test_a_plugin_fixed_after_failing_registers_its_functions_once(tmp_path: Path):
    path = tmp_path / "flaky.py"
    path.write_text(PLUGIN + "raise RuntimeError('not yet')\n")
    with pytest.raises(PluginError, match="not yet"):
        load_registry([str(path)])
    path.write_text(PLUGIN)  # the same module name again: its functions replace the first run's
    assert "shouty" in load_registry([str(path)])


# --- settings ------------------------------------------------------------------------------------


def test_reward_spec_syntax():
    assert parse_reward_spec(PAPER_REWARD) == {"math": 0.9, "format": 0.1}
    assert parse_reward_spec("iou") == {"iou": 1.0}
    assert parse_reward_spec(" math : 1 , length_penalty:-0.5 ") == {"math": 1.0, "length_penalty": -0.5}
    for bad in ("math:x", "math:nan", "ma th", "math,math", "", "math:0.9,"):
        with pytest.raises(ValueError):
            parse_reward_spec(bad)


def test_settings_defaults_and_environment(monkeypatch):
    settings = RewardSettings()
    assert (settings.host, settings.port, settings.item_timeout_s) == ("127.0.0.1", 5000, 10.0)
    assert settings.openrlhf_weights() == {"math": 0.9, "format": 0.1}
    assert settings.workers >= 1
    monkeypatch.setenv("CPPO_REWARD_ITEM_TIMEOUT_S", "2.5")
    monkeypatch.setenv("CPPO_REWARD_PLUGIN", '["a.py", "b"]')
    monkeypatch.setenv("CPPO_REWARD_OPENRLHF_REWARD", "math")
    settings = RewardSettings()
    assert (settings.item_timeout_s, settings.plugin) == (2.5, ["a.py", "b"])
    assert settings.openrlhf_weights() == {"math": 1.0}
    monkeypatch.setenv("CPPO_REWARD_OPENRLHF_REWARD", "math:lots")
    with pytest.raises(ValidationError, match="not a number"):
        RewardSettings()


@pytest.mark.parametrize(
    ("host", "key", "waived", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("localhost", None, False, False),
        ("::1", None, False, False),
        ("0.0.0.0", None, False, True),
        ("10.1.2.3", None, False, True),
        ("0.0.0.0", "secret", False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_auth_is_required_off_loopback(host, key, waived, refused):
    settings = RewardSettings(host=host, api_key=key, insecure_no_auth=waived)
    problem = exposure_problem(settings.host, settings.api_key, settings.insecure_no_auth)
    assert (problem is not None) == refused
