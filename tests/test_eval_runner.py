"""The evaluation runner: one row per step count, NFE by the solver's formula, JSON and plot
written, and the same answers from the base model and from L2D at steps=0."""
import json

import pytest

from l2d import get_l2d_model
from l2d.eval.runner import evaluate, generate_completions, plot_rows, render_prompts, summary_rows, write_json
from l2d.eval.metrics import format_table
from l2d.eval.tasks import Example, Task
from tiny import randomize_path, tiny_base, tiny_config
from tiny_tokenizer import VOCAB, tiny_tokenizer


def _task(n=6):
    examples = []
    for i in range(n):
        q = f"{i}+{i + 1}"
        examples.append(Example(f"add/{i}", [{"role": "user", "content": q}], f"Question: {q}\nAnswer:", str(2 * i + 1)))
    # A scorer with outcomes that vary across completions (a random model never adds correctly).
    return Task("parity", "math", examples, lambda ex, c: len(c) % 2 == 0)


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    base = tiny_base(vocab_size=VOCAB, max_position_embeddings=256)
    model = get_l2d_model(base, tiny_config()).eval()
    randomize_path(model, scale=2.0)
    return model, base, tok


def test_rows_per_steps_nfe_formula_json_and_plot(setup, tmp_path):
    model, _, tok = setup
    rows = evaluate(model, tok, _task(), [0, 1, 3], batch_size=4, max_new_tokens=6, solver="euler",
                    progress=False)
    assert [r["steps"] for r in rows] == [0, 1, 3]
    for r in rows:
        # euler with the final read-out at t=1: steps + 1 evaluations per token, none at steps=0
        assert r["nfe_per_token"] == pytest.approx(0 if r["steps"] == 0 else r["steps"] + 1)
        assert 0 <= r["low"] <= r["accuracy"] <= r["high"] <= 1
        assert r["correct"] == round(r["accuracy"] * r["n"]) and r["n"] == 6
        assert r["generated_tokens"] > 0 and r["ms_per_token"] > 0 and r["tokens_per_s"] > 0
    mid = evaluate(model, tok, _task(), [2], batch_size=4, max_new_tokens=4, solver="midpoint", progress=False)
    assert mid[0]["nfe_per_token"] == pytest.approx(2 * 2 + 1)
    path = write_json(tmp_path / "out" / "results.json", {"l2d": rows})
    assert json.loads(open(path).read())["l2d"][2]["steps"] == 3
    png = plot_rows(rows, tmp_path / "steps.png", title="tiny")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = format_table(summary_rows(rows))
    assert "NFE/token" in table and len(table.splitlines()) == 2 + len(rows)


def test_base_and_l2d_at_steps0_give_identical_answers(setup):
    model, base, tok = setup
    task = _task()
    l2d = evaluate(model, tok, task, [0], batch_size=3, max_new_tokens=8, keep_completions=True, progress=False)[0]
    plain = evaluate(base, tok, task, [0], batch_size=3, max_new_tokens=8, keep_completions=True,
                     method="base", progress=False)[0]
    assert [c["completions"] for c in l2d["completions"]] == [c["completions"] for c in plain["completions"]]
    assert l2d["accuracy"] == plain["accuracy"] and plain["nfe_per_token"] == 0
    with pytest.raises(ValueError, match="L2D model"):
        evaluate(base, tok, task, [2], progress=False)


def test_completions_do_not_depend_on_batching(setup):
    """Each row has its own seed, so the diffusion noise of an example is the same in any batch."""
    model, _, tok = setup
    prompts = render_prompts(tok, _task().examples)
    a = generate_completions(model, tok, prompts, steps=2, batch_size=1, max_new_tokens=5, seed=7, progress=False)
    b = generate_completions(model, tok, prompts, steps=2, batch_size=4, max_new_tokens=5, seed=7, progress=False)
    assert a["completions"] == b["completions"] and a["nfe"] == b["nfe"]


def test_samples_give_pass_at_k_and_plain_prompts(setup):
    model, _, tok = setup
    row = evaluate(model, tok, _task(4), [1], samples=3, batch_size=4, max_new_tokens=4, prompt_format="plain",
                   progress=False)[0]
    assert {"pass@1", "pass@3"} <= set(row) and row["accuracy"] == row["pass@1"]
    assert row["pass@1"] <= row["pass@3"] <= 1
