"""The masked-diffusion demo's comparison with the L2D adapter: its flags are checked before any work,
and the adapter is trained as `make demo` trains it (the recipe's optimizer settings, the same data,
steps and batch as the MDM)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("flags, named", [
    (["--l2d-steps", "x"], "--l2d-steps"),
    (["--l2d-steps", "1,0"], "--l2d-steps"),
    (["--l2d-from", "/nonexistent/adapter"], "--l2d-from"),
])
def test_bad_l2d_flags_are_refused_before_any_work(tmp_path, capsys, flags, named):
    from l2d.mdm.demo import main

    out = tmp_path / "never-created"
    with pytest.raises(SystemExit):
        main(flags + ["--out", str(out)])
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_l2d_run_uses_the_recipes_optimizer_and_the_mdms_budget(tmp_path, monkeypatch):
    from l2d.mdm import demo

    seen = {}

    def fake_demo_train_run(recipe_path, method, out, steps, overrides=()):
        seen.update(method=method, steps=steps, overrides=list(overrides))
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps({"loss": 1.5}) + "\n" + json.dumps({"loss": 0.5}) + "\n")
        return {"seconds": 1.0}

    monkeypatch.setattr(demo, "demo_train_run", fake_demo_train_run)
    args = SimpleNamespace(recipe="recipes/smollm2-135m/arithmetic.yaml", train_steps=7, batch=16, lr=1e-4)
    summary = demo.train_run("l2d", tmp_path / "l2d", args)
    assert seen["method"] == "l2d" and seen["steps"] == 7
    assert "train.batch_size=16" in seen["overrides"] and "train.micro_batch_size=16" in seen["overrides"]
    assert not any(o.startswith("train.lr=") for o in seen["overrides"])  # the recipe's own lr, not --lr
    assert summary["losses"] == [1.5, 0.5]
