"""The demo's held-out problems: none occurs in the training data, prompted as in training."""
from l2d.data import DataSource, reasoning_gym_dataset
from l2d.demo import SYSTEM_PROMPT, heldout_task

KW = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=["+", "-"], allow_negation=False)


def test_heldout_problems_never_occur_in_training():
    source = DataSource(name="rg:basic_arithmetic", n=300, seed=0, generator_kwargs=KW)
    train_q = set(reasoning_gym_dataset("basic_arithmetic", 300, seed=0, **KW)["prompt"])
    task, removed = heldout_task(source, 40, seed=1_000_003, train_questions=train_q)
    assert len(task) == 40
    questions = [ex.messages[-1]["content"] for ex in task.examples]
    assert not set(questions) & train_q
    assert all(ex.messages[0] == {"role": "system", "content": SYSTEM_PROMPT} for ex in task.examples)
    # Scoring still uses the generator's own answers: the gold answer is judged correct.
    assert all(task.score(ex, ex.gold) for ex in task.examples)
    # Against itself, every problem is "seen": all removed.
    same, removed_all = heldout_task(source, 10, seed=0, train_questions=set(
        reasoning_gym_dataset("basic_arithmetic", 20, seed=0, **KW)["prompt"]))
    assert removed_all >= 20 and len(same) <= 10


def test_validation_problems_are_neither_training_nor_heldout_problems():
    from l2d.demo import RECIPE, heldout_task, validation_task
    from l2d.eval.tasks import HELD_OUT_SEED
    from l2d.recipe import load_recipe

    source = load_recipe(RECIPE).data.sources[0]
    train_q = set(reasoning_gym_dataset("basic_arithmetic", source.n, seed=source.seed,
                                        **source.generator_kwargs)["prompt"])
    val = [ex.messages[-1]["content"] for ex in validation_task(RECIPE, 64).examples]
    held = [ex.messages[-1]["content"] for ex in heldout_task(source, 64, HELD_OUT_SEED, train_q)[0].examples]
    assert len(val) == 64 and not set(val) & train_q
    # the seeds differ; the small problem space lets a few questions coincide, never the whole split
    assert val != held and len(set(val) & set(held)) < len(val) // 2


def _row(method, steps, acc, n=80):
    from l2d.eval.metrics import wilson_interval

    lo, hi = wilson_interval(round(acc * n), n)
    return {"method": method, "steps": steps, "n": n, "samples": 1, "accuracy": acc, "low": lo, "high": hi,
            "nfe_per_token": steps + 1 if steps else 0, "ms_per_token": 10.0, "tokens_per_s": 100.0}


def test_doc_states_what_the_numbers_show(tmp_path):
    import json

    from l2d.demo_doc import _verdict, write_doc
    from l2d.eval.runner import plot_rows

    rising = [_row("l2d", 0, 0.1), _row("l2d", 4, 0.3), _row("l2d", 16, 0.5)]
    flat = [_row("lora+l2d", 0, 0.6), _row("lora+l2d", 16, 0.55)]
    assert "rises with steps" in _verdict(rising, "l2d")
    assert "does NOT rise" in _verdict(flat, "lora+l2d")
    # overlapping 95% intervals, yet a clear difference (the demo's own numbers: 2/80 against 11/80)
    overlapping = [_row("l2d", 0, 2 / 80, n=80), _row("l2d", 16, 11 / 80, n=80)]
    assert overlapping[1]["low"] < overlapping[0]["high"]
    assert "rises with steps (two-sided two-proportion z-test p = 0.00" in _verdict(overlapping, "l2d")
    noise = [_row("l2d", 0, 10 / 80, n=80), _row("l2d", 16, 12 / 80, n=80)]
    assert "not clearly" in _verdict(noise, "l2d")
    rows = [_row("base", 0, 0.05), _row("lora", 0, 0.9)] + rising + flat
    (tmp_path / "results.json").write_text(json.dumps({
        "rows": rows, "machine": "test", "wall_time_s": 60, "generator_kwargs": {}, "system_prompt": "s",
        "budget": {"train_steps": 3, "n_val": 2}, "n": 80, "heldout_seed": 1, "heldout_removed_as_in_training": 0,
        "solver": "euler", "validation_seed": 2, "validation": {"euler": {"accuracy": 0.5}}}))
    (tmp_path / "table.txt").write_text("the table")
    plot_rows(rows, tmp_path / "steps.png")
    doc = write_doc(tmp_path, tmp_path / "docs" / "DEMO.md", tmp_path / "docs" / "demo_steps.png").read_text()
    assert "the table" in doc and "demo_steps.png" in doc and "below LoRA" in doc
    assert "(L2D, LoRA r=32 on all linear layers and L2D on top of the merged LoRA model)" in doc
    assert (tmp_path / "docs" / "demo_steps.png").is_file()


def test_doc_names_only_the_runs_that_were_trained():
    from l2d.demo_doc import _trained_runs

    assert _trained_runs([_row("base", 0, 0.1), _row("lora", 0, 0.4), _row("l2d", 1, 0.4)]) == \
        "L2D and LoRA r=32 on all linear layers"
    assert _trained_runs([_row("l2d", 1, 0.4)]) == "L2D"


def test_bad_step_list_is_refused_before_any_work(capsys):
    import pytest

    from l2d.demo import main

    for bad in ("x", "1,-2", ""):
        with pytest.raises(SystemExit):
            main(["--steps", bad, "--out", "/nonexistent/never-created"])
        assert "--steps" in capsys.readouterr().err
