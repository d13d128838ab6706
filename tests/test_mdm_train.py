"""`l2d train` with `method: mdm` on a tiny recipe, resume, and `l2d eval` of the result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from l2d.mdm import MaskedDiffusionModel
from l2d.recipe import RecipeError, recipe_from_dict
from l2d.train import train
from test_train import _same_weights, base_dir, data_file, losses, make_recipe  # noqa: F401  (fixtures)


def mdm_recipe(base_dir, data_file, out, **mdm):
    raw = make_recipe(base_dir, data_file, out, method="mdm", max_steps=4)
    raw["mdm"] = {"anneal_steps": 2, **mdm}
    return raw


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_train_method_mdm_saves_a_model_that_loads_and_generates(tmp_path, base_dir, data_file, finetuning):
    out = tmp_path / finetuning
    summary = train(recipe_from_dict(mdm_recipe(base_dir, data_file, out, finetuning=finetuning, lora_r=4)))
    assert summary["steps"] == 4 and all(map(torch.isfinite, map(torch.tensor, losses(out))))
    saved = json.loads((out / "mdm_config.json").read_text())
    assert saved["finetuning"] == finetuning and saved["config"]["base_model_name_or_path"] == base_dir
    assert (out / ("adapter_config.json" if finetuning == "lora" else "model.safetensors")).is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)                 # the [MASK] token was added and saved with it
    assert tok.mask_token_id == saved["config"]["mask_token_id"]
    model = MaskedDiffusionModel.from_pretrained(str(out), base_model=None) if finetuning == "full" else \
        MaskedDiffusionModel.from_pretrained(str(out), base_model=_base(base_dir))
    ids = torch.tensor([tok("what is two plus three")["input_ids"]])
    seq = model.generate(ids, max_new_tokens=3, steps=3)
    assert seq.shape == (1, ids.shape[1] + 3)


def _base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir)


def test_anneal_step_reaches_the_model_and_resume_repeats_the_curve(tmp_path, base_dir, data_file, monkeypatch):
    import l2d.mdm.model as mdm_model

    ratios = []
    real = mdm_model.opening_ratio

    def spy(step, config):
        ratios.append(real(step, config))
        return ratios[-1]

    monkeypatch.setattr(mdm_model, "opening_ratio", spy)
    full = tmp_path / "full"
    train(recipe_from_dict(mdm_recipe(base_dir, data_file, full)))
    assert sorted(set(ratios)) == [0.5, 1.0]                # steps 0 and 1 of anneal_steps 2, then open
    part = tmp_path / "part"
    recipe = recipe_from_dict(mdm_recipe(base_dir, data_file, part))
    train(recipe, stop_after=2)
    train(recipe, resume=str(part))
    assert losses(part) == pytest.approx(losses(full), rel=1e-5)


def test_bad_mdm_recipe_names_the_key(tmp_path, base_dir, data_file):
    with pytest.raises(RecipeError, match="anneal_steps"):
        recipe_from_dict(mdm_recipe(base_dir, data_file, tmp_path, anneal_steps=-3))
    with pytest.raises(RecipeError, match="unknown key mdm.steps"):
        recipe_from_dict(mdm_recipe(base_dir, data_file, tmp_path, steps=3))


def test_eval_scores_an_mdm_model_by_steps(tmp_path, base_dir, data_file):
    from l2d.eval.command import adapter_kind, load_for_eval
    from l2d.eval.runner import evaluate
    from l2d.eval.tasks import Example, Task

    out = tmp_path / "run"
    train(recipe_from_dict(mdm_recipe(base_dir, data_file, out)))
    assert adapter_kind(str(out)) == "mdm"
    model, tok, kind = load_for_eval(str(out))
    examples = [Example(id=str(i), prompt=f"what is {a} plus one", gold="x",
                        messages=[{"role": "user", "content": f"what is {a} plus one"}])
                for i, a in enumerate(["two", "three", "four"])]
    task = Task(name="toy", kind="math", examples=examples, scorer=lambda ex, completion: completion.strip() == ex.gold)
    rows = evaluate(model, tok, task, [1, 3], max_new_tokens=3, batch_size=2, progress=False)
    assert [r["steps"] for r in rows] == [1, 3] and [r["method"] for r in rows] == ["mdm", "mdm"]
    assert all(r["nfe_per_token"] > 0 for r in rows)
    with pytest.raises(ValueError, match="steps >= 1"):
        evaluate(model, tok, task, [0], max_new_tokens=3, progress=False)


def test_cli_generates_with_an_mdm_model(tmp_path, base_dir, data_file, capsys):
    from l2d.cli import main

    out = tmp_path / "run"
    train(recipe_from_dict(mdm_recipe(base_dir, data_file, out)))
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "what is two plus three", "--steps", "2",
                 "--max-new-tokens", "4"]) == 0
    assert "4 positions, 2 forward passes" in capsys.readouterr().err


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_two_process_ddp_matches_one_process(tmp_path, base_dir, data_file, finetuning):
    """As for L2D (tests/test_train.py): the same global batch (4) as 1 process x 2 accumulation steps
    and as 2 gloo processes (DDP) x 1. Each micro-batch draws its t, its masks and its annealed
    attention openings from a seed of (step, index in the global batch), not of the process layout,
    so the loss curve and the saved model are those of one process up to float summation order; the
    saved model loads and predicts as the one-process one. The two-process run stops after step 2 and
    resumes from its checkpoint (the [MASK] row added again, the annealing step restored)."""
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(finetuning=finetuning, lora_r=4)
    raw = mdm_recipe(base_dir, data_file, one, **kw)
    raw["train"].update(max_steps=3, save_every=0)  # the attention half open at step 1 (anneal_steps 2)
    train(recipe_from_dict(raw))
    raw = mdm_recipe(base_dir, data_file, two, **kw)
    raw["train"].update(max_steps=3, save_every=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "l2d", "train", str(recipe)]
    for extra in (["--stop-after", "2"], ["--resume", str(two)]):  # stopped after step 2, then resumed
        proc = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 process(es) x 1 accumulation" in proc.stderr
    assert (two / "checkpoints" / "step-000002").is_dir() and len(losses(two)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert _same_weights(one, two, "model.safetensors" if finetuning == "full" else "adapter_model.safetensors")
    assert json.loads((two / "mdm_config.json").read_text()) == json.loads((one / "mdm_config.json").read_text())

    def load(out):
        base = None if finetuning == "full" else _base(base_dir)
        return MaskedDiffusionModel.from_pretrained(str(out), base_model=base).eval()

    ids = torch.tensor([[1, 9, 10, 13, 11]])
    with torch.no_grad():
        a, b = load(one)(ids).logits, load(two)(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
