"""Answer extraction and equivalence for math tasks."""

from fractions import Fraction

import pytest

from l2d.eval.answers import (extract_answer, extract_boxed, extract_gsm8k_answer,
                              extract_last_number, extract_math_answer, is_equivalent,
                              normalize_answer, parse_number)


@pytest.mark.parametrize("text, expected", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("So the total is 1,234 apples.\n#### 1,234", "1234"),
    ("#### -7", "-7"),
    ("#### $18.50", "18.5"),
    ("#### 5.0", "5"),
    ("first #### 3 then corrected\n#### 4", "4"),
    ("no marker 42", None),
])
def test_gsm8k_marker(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("It costs $1,234.50 in total.", "1234.5"),
    ("The change was -3 degrees, then 15%.", "15"),
    ("Values 2, 3 and .5", "0.5"),
    ("The temperature fell to -12.", "-12"),
    ("He is 40.0 years old", "40"),
    ("answer: +8", "8"),
    ("step1 gives x2 but 7 remains", "7"),  # digits glued to words are not numbers
    ("no digits here", None),
])
def test_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{42}$.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
    (r"\fbox{7}", "7"),
    (r"the answer is \boxed 5", "5"),
    (r"\boxed{\text{(A)}}", r"\text{(A)}"),
    ("nothing boxed", None),
    (r"\boxed{unbalanced", None),
])
def test_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_math_and_generic_extraction_fall_back_in_order():
    assert extract_math_answer("Thus the answer is $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert extract_math_answer("we get 3 then 9") == "9"
    assert extract_answer("\\boxed{2} and #### 5") == "5"
    assert extract_answer("\\boxed{2} and 5") == "2"
    assert extract_answer("only 5 here") == "5"


@pytest.mark.parametrize("raw, expected", [
    (r"\left( \dfrac12, 3 \right)", r"(\frac{1}{2},3)"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"\$1,000.00", "1000"),
    (r"x = 5", "5"),
    (r"10\text{ cm}", "10"),
    (r"5 \text{ inches}", "5"),
    (r"\text{Monday}", "Monday"),
    (r"3\!\cdot\!4", r"3\cdot4"),
    ("50\\%", "50"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}"),
    (r"\sqrt2", r"\sqrt{2}"),
])
def test_normalize(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("pred, gold", [
    ("0.5", r"\frac{1}{2}"), ("1/2", r"\frac12"), (".5", "1/2"), (r"\dfrac{1}{2}", "0.50"),
    ("5.0", "5"), ("1,000", "1000"), ("-3", "-3.0"), (r"\$12", "12"), ("12 dollars", "12"),
    (r"2\sqrt{2}", r"\sqrt{8}"), (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    (r"\pi", "3.14159265358979"), (r"2\pi", r"\pi \cdot 2"), ("x = 7", "7"),
    (r"(1, 2)", r"\left(1,2\right)"), ("2, 1", "1, 2"), (r"x^2+2x+1", r"(x+1)^2"),
    (r"90^\circ", "90"), (r"\text{Monday}", "Monday"), ("1.333333333", r"\frac{4}{3}"),
    (r"\frac{6}{8}", r"\frac{3}{4}"), ("2^{10}", "1024"),
])
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)
    assert is_equivalent(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("0.51", r"\frac{1}{2}"), ("5", "50"), ("-3", "3"), (r"2\sqrt{3}", r"\sqrt{8}"),
    ("(2, 1)", "(1, 2)"), ("[1, 2)", "(1, 2]"), ("1, 2", "1, 2, 3"), ("Tuesday", "Monday"),
    (None, "5"), ("", "5"), ("x+1", "x+2"), ("1.3333", r"\frac{4}{3}"),
])
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


def test_parse_number_is_exact_for_rationals():
    assert parse_number(r"\frac{1}{3}") == Fraction(1, 3)
    assert parse_number("0.1") == Fraction(1, 10)
    assert parse_number("1/0") is None
    assert parse_number("Monday") is None


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('echo pwned')", "(lambda: 1)()", "open('/etc/passwd').read()",
    "9**9**9**9", "2^{10^{10}}", "[x for x in range(10**9)]", "a.__class__", "1" * 500,
])
def test_hostile_text_is_never_executed(hostile):
    # Must return quickly without running anything; the only acceptable outcomes are booleans.
    assert is_equivalent(hostile, "5") is False
    assert parse_number(hostile) is None


# ----------------------------------------------------------------------------- math tasks

import json

from l2d.eval.tasks import GSM8K_FEWSHOT, get_task


def test_gsm8k_fewshot_exemplars_are_self_consistent():
    assert len(GSM8K_FEWSHOT) == 8
    for question, solution in GSM8K_FEWSHOT:
        # each worked answer ends with the marker, and its last equation yields that number
        answer = extract_gsm8k_answer(solution)
        assert answer is not None
        assert extract_last_number(solution.rsplit("####", 1)[0]) == answer


def test_gsm8k_task_from_a_local_file(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 1,000 + 234?", "answer": "#### 1,234"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task("gsm8k", path=str(path))
    assert [ex.gold for ex in task.examples] == ["5", "1234"]
    ex = task.examples[0]
    assert ex.messages[0]["role"] == "system" and ex.messages[-1] == {"role": "user", "content": "What is 2 + 3?"}
    assert len(ex.messages) == 1 + 2 * 8 + 1
    assert ex.prompt.endswith("Question: What is 2 + 3?\nAnswer:")
    assert task.score_all(task.examples, ["so 5\n#### 5", "The total is $1,234."]) == [True, True]
    assert task.score(ex, "#### 6") is False


def test_math_task_takes_the_boxed_gold(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
                                "level": "Level 1", "type": "Algebra"}))
    task = get_task("math", path=str(path))
    ex = task.examples[0]
    assert ex.gold == "\\frac{1}{2}"
    assert task.score(ex, "So the answer is $\\boxed{0.5}$") and not task.score(ex, "\\boxed{2}")


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum", "gsm_symbolic"])
def test_reasoning_gym_tasks_score_their_own_gold(name):
    task = get_task(name, size=4)
    assert len(task) == 4
    again = get_task(name, size=4)
    assert [e.gold for e in again.examples] == [e.gold for e in task.examples]  # fixed seed
    for ex in task.examples:
        assert task.score(ex, f"Working...\n#### {ex.gold}")
        assert not task.score(ex, "#### 123456789")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="gsm8k.*humaneval"):
        get_task("gsm9k")
