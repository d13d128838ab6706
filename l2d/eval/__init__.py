"""Evaluation: math answers, a code sandbox, HumanEval/MBPP scoring, metrics and tasks.

    answers.py  extract answers (####, \\boxed, last number) and decide equivalence
    sandbox.py  run untrusted generated code in a contained process
    code.py     HumanEval / MBPP programs, completion cleaning, pass@k
    metrics.py  accuracy with a Wilson interval, pass@k, the steps plot, terminal tables
    tasks.py    gsm8k, math, reasoning-gym tasks, humaneval, mbpp: get_task(name, **kw)
"""

from .answers import extract_answer, is_equivalent
from .metrics import accuracy, format_table, pass_at_k, plot_steps, wilson_interval
from .sandbox import SandboxConfig, SandboxResult, run_program, run_programs
from .tasks import Example, Task, get_task

__all__ = ["extract_answer", "is_equivalent", "accuracy", "format_table", "pass_at_k",
           "plot_steps", "wilson_interval", "SandboxConfig", "SandboxResult", "run_program",
           "run_programs", "Example", "Task", "get_task"]
