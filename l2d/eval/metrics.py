"""Metrics and reports: accuracy with a Wilson interval, pass@k, the steps plot, a terminal table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterable, Mapping, Sequence

__all__ = ["Accuracy", "wilson_interval", "accuracy", "pass_at_k", "mean_pass_at_k",
           "plot_steps", "format_table"]


@dataclass(frozen=True)
class Accuracy:
    """``correct`` of ``total`` with a Wilson score interval ``[low, high]`` at ``confidence``."""

    correct: int
    total: int
    low: float
    high: float
    confidence: float = 0.95

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] "
                f"({self.correct}/{self.total})")


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    With ``p = correct / total`` and ``z`` the two-sided normal quantile,

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    Unlike the normal approximation it stays inside [0, 1] and is not empty at p = 0 or 1.
    ``total == 0`` gives the uninformative (0, 1).
    """
    if total < 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got {correct}/{total}")
    if total == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    n, p = total, correct / total
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends: no rounding residue
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def accuracy(outcomes: Iterable[bool], confidence: float = 0.95) -> Accuracy:
    """Accuracy of a list of per-example outcomes, with its Wilson interval."""
    outcomes = [bool(o) for o in outcomes]
    correct, total = sum(outcomes), len(outcomes)
    low, high = wilson_interval(correct, total, confidence)
    return Accuracy(correct, total, low, high, confidence)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass (Chen et al., 2021).

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    The product form avoids huge binomials. Needs ``k <= n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Average pass@k over problems given as ``(n, c)`` pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    return sum(values) / len(values) if values else 0.0


def plot_steps(results: Mapping[str, Sequence[Mapping]], path: str, title: str | None = None) -> str:
    """Plot accuracy (with CI error bars) and NFE per token against the number of steps.

    ``results`` maps a method name to a list of points, each a mapping with ``steps``,
    ``accuracy`` (a fraction), optional ``low``/``high`` (the interval) and optional
    ``nfe_per_token``. Accuracy goes on the left axis (solid lines), NFE per token on the right
    axis (dashed, same colour). Writes a PNG to ``path`` and returns it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax_acc = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax_nfe = ax_acc.twinx()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_steps = [p["steps"] for points in results.values() for p in points]
    span = (min(all_steps), max(all_steps)) if all_steps else (0, 1)
    nfe_drawn = set()
    for i, (method, points) in enumerate(results.items()):
        points = sorted(points, key=lambda p: p["steps"])
        colour = colours[i % len(colours)]
        if len(points) == 1 and span[1] > span[0]:  # a model without steps (base, LoRA): a level line
            p = points[0]
            ax_acc.axhline(100 * p["accuracy"], color=colour, linestyle=":", label=f"{method} accuracy")
            if "low" in p and "high" in p:
                ax_acc.axhspan(100 * p["low"], 100 * p["high"], color=colour, alpha=0.08)
            continue
        steps = [p["steps"] for p in points]
        acc = [100 * p["accuracy"] for p in points]
        lower = [100 * (p["accuracy"] - p.get("low", p["accuracy"])) for p in points]
        upper = [100 * (p.get("high", p["accuracy"]) - p["accuracy"]) for p in points]
        ax_acc.errorbar(steps, acc, yerr=[lower, upper], color=colour, marker="o", capsize=3,
                        label=f"{method} accuracy")
        nfe = tuple((p["steps"], p["nfe_per_token"]) for p in points if p.get("nfe_per_token") is not None)
        if nfe and nfe not in nfe_drawn:  # methods with the same solver share one NFE curve
            nfe_drawn.add(nfe)
            ax_nfe.plot(*zip(*nfe), color=colour, linestyle="--", marker="x", alpha=0.7,
                        label=f"{method} NFE/token")
    ax_acc.set_xlabel("steps")
    ax_acc.set_ylabel("accuracy (%)")
    ax_nfe.set_ylabel("NFE per token")
    ax_acc.grid(alpha=0.3)
    handles = ax_acc.get_legend_handles_labels()
    extra = ax_nfe.get_legend_handles_labels()
    if handles[0] or extra[0]:
        ax_acc.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="best")
    if title:
        ax_acc.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[Mapping] | Sequence[Sequence], headers: Sequence[str] | None = None) -> str:
    """A plain-text table: columns aligned, numbers right-aligned, a rule under the header.

    ``rows`` are mappings (the header is the union of their keys in first-seen order) or
    sequences (then pass ``headers``).
    """
    if not rows:
        return ""
    if isinstance(rows[0], Mapping):
        headers = list(headers or dict.fromkeys(k for row in rows for k in row))
        table = [[row.get(h) for h in headers] for row in rows]
    else:
        table = [list(row) for row in rows]
        headers = list(headers or [f"col{i}" for i in range(len(table[0]))])
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in table)
               for i in range(len(headers))]
    cells = [[_cell(v) for v in row] for row in table]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values, is_header=False):
        out = []
        for v, w, num in zip(values, widths, numeric):
            out.append(v.rjust(w) if num and not is_header else v.ljust(w))
        return "  ".join(out).rstrip()

    return "\n".join([line([str(h) for h in headers], True),
                      "  ".join("-" * w for w in widths)] + [line(r) for r in cells])
