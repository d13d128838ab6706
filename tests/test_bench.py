"""`l2d bench`: a recipe's training step for L2D and its baselines, side by side."""
import json
import math

import pytest
import torch

from l2d.bench import PeakHeap, format_table, heap_in_use, memory_meter, run_bench, synthetic_batch
from l2d.cli import build_parser, main
from l2d.recipe import RecipeError, recipe_from_dict
from tiny import tiny_base
from tiny_tokenizer import VOCAB, tiny_tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-base")
    tiny_base("llama", vocab_size=VOCAB).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def _recipe(base_dir, **l2d):
    return recipe_from_dict({
        "model": {"name_or_path": base_dir},
        "l2d": {"latent_dim": 16, "cond_dim": 32, "time_features": 32, "rank": 4, "alpha": 4.0, **l2d},
        "lora": {"r": 4, "alpha": 8.0},
        "data": {"sources": [{"name": "rg:basic_arithmetic", "n": 6, "seed": 0}], "max_length": 64},
        "train": {"output_dir": "unused", "batch_size": 4, "micro_batch_size": 4},
    })


def test_the_path_costs_follow_the_response_and_the_baselines_do_not(base_dir):
    recipe = _recipe(base_dir)
    run = {f: run_bench(recipe, methods=("l2d", "lora", "full"), batch=3, seq_len=24, response=f, repeats=1,
                        warmup=1, device="cpu", memory=False, progress=False)
           for f in (0.25, 1.0)}
    rows = {f: {r["name"]: r for r in result["rows"]} for f, result in run.items()}
    names = ["L2D, no self-cond pass", "L2D, with self-cond pass", "L2D, expected (p=0.5)", "LoRA", "full fine-tune"]
    assert list(rows[1.0]) == names
    assert run[1.0]["batch"] == {"batch": [3, 24], "tokens": 72, "supervised": 69}
    assert run[0.25]["batch"]["supervised"] == 3 * 6  # the last quarter of 24 tokens
    for f in rows:
        r = rows[f]
        assert all(x["time"] > 0 and math.isfinite(x["time"]) for x in r.values())
        # the self-conditioning pass is one more run of the path; the expected step mixes the two
        assert r["L2D, with self-cond pass"]["flops"] > r["L2D, no self-cond pass"]["flops"]
        mix = (r["L2D, no self-cond pass"]["flops"] + r["L2D, with self-cond pass"]["flops"]) / 2
        assert r["L2D, expected (p=0.5)"]["flops"] == pytest.approx(mix)
        assert r["full fine-tune"]["trainable"] > r["LoRA"]["trainable"]
    # the path runs at supervised rows only: 3.8x the rows cost L2D far more FLOPs than they cost LoRA
    l2d_growth = rows[1.0]["L2D, no self-cond pass"]["flops"] / rows[0.25]["L2D, no self-cond pass"]["flops"]
    lora_growth = rows[1.0]["LoRA"]["flops"] / rows[0.25]["LoRA"]["flops"]
    assert l2d_growth > 1.5 * lora_growth and lora_growth < 2
    table = format_table(run[1.0])
    assert "| LoRA |" in table and "1.00x" in table and "69 supervised" in table


def test_the_recipes_own_data_can_stand_in_for_random_tokens(base_dir):
    result = run_bench(_recipe(base_dir), methods=("l2d",), batch=4, use_data=True, repeats=1, warmup=0,
                       device="cpu", memory=False, progress=False)
    shape = result["batch"]
    # chat-rendered arithmetic problems: answer-only labels, a few tokens each
    assert shape["batch"][0] == 4 and 4 <= shape["supervised"] < shape["tokens"] / 4
    with pytest.raises(RecipeError, match="fewer than --batch 8"):
        run_bench(_recipe(base_dir), methods=("l2d",), batch=8, use_data=True, device="cpu", progress=False)


def test_without_self_conditioning_only_the_step_that_runs_is_timed(base_dir):
    result = run_bench(_recipe(base_dir, self_conditioning=0.0), batch=2, seq_len=12, repeats=1, warmup=0,
                       device="cpu", flops=False, memory=False, progress=False)
    assert [r["name"] for r in result["rows"]] == ["L2D, no self-cond pass", "LoRA"]


def test_trainable_counts_follow_the_recipe(base_dir):
    frozen = _recipe(base_dir)
    frozen.train.head_lr_scale = 0.0  # frozen heads, as the SmolLM2 recipe trains them
    counts = [run_bench(r, methods=("l2d",), batch=2, seq_len=12, repeats=1, warmup=0, device="cpu",
                        flops=False, memory=False, progress=False)["rows"][0]["trainable"]
              for r in (_recipe(base_dir), frozen)]
    assert counts[1] < counts[0]


def test_cpu_memory_is_measured(base_dir):
    result = run_bench(_recipe(base_dir), methods=("lora",), batch=2, seq_len=12, repeats=1, warmup=1,
                       device="cpu", flops=False, progress=False)
    assert result["rows"][0]["memory"] >= 0 and math.isfinite(result["rows"][0]["memory"])
    assert result["memory_measure"] == memory_meter(torch.device("cpu"))[0]
    assert f"peak memory: {result['memory_measure']}" in format_table(result)


@pytest.mark.skipif(heap_in_use() is None, reason="needs glibc's mallinfo2")
def test_heap_in_use_sees_a_tensor_come_and_go():
    """The heap measure counts a tensor while it lives and not after it is freed (what the RSS
    may keep), so a step's peak is what it allocated at once."""
    n = 64 * 2**20
    assert memory_meter(torch.device("cpu"))[0] == "heap in use"
    with PeakHeap() as peak:
        x = torch.ones(n // 4)
        held = heap_in_use() - peak.base
        del x
    assert held >= n * 0.99 and peak.delta >= n * 0.99
    assert heap_in_use() - peak.base < n / 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(response=0.0), "--response"),
    (dict(response=1.5), "--response"),
    (dict(batch=0), "--batch"),
    (dict(seq_len=1), "--seq-len"),
    (dict(methods=("l2d", "qlora")), "qlora"),
    (dict(repeats=0), "--repeats"),
])
def test_bad_arguments_fail_before_loading_anything(kwargs, match):
    def load(*_):
        raise AssertionError("loaded a model before checking the arguments")

    recipe = _recipe("unused")
    with pytest.raises(RecipeError, match=match):
        run_bench(recipe, load=load, progress=False, **kwargs)


def test_synthetic_batches_supervise_the_last_fraction():
    b = synthetic_batch(50, 2, 10, 0.3)
    assert b["input_ids"].shape == (2, 10) and int(b["input_ids"].max()) < 50
    assert (b["labels"][:, :7] == -100).all() and torch.equal(b["labels"][:, 7:], b["input_ids"][:, 7:])


def test_the_command_prints_a_table_and_writes_json(base_dir, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe(base_dir).to_yaml())
    out = tmp_path / "bench.json"
    assert main(["bench", str(path), "--batch", "2", "--seq-len", "12", "--repeats", "1", "--warmup", "0",
                 "--device", "cpu", "--no-memory", "--json", str(out), "--set", "l2d.rank=2"]) == 0
    printed = capsys.readouterr().out
    assert "| L2D, expected (p=0.5) |" in printed and "| LoRA |" in printed
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["l2d", "l2d", "l2d", "lora"]
    assert main(["bench", str(path), "--response", "2"]) == 1
    assert "--response" in capsys.readouterr().err


def test_help_explains_every_flag():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["bench"]
    for action in parser._actions:
        assert action.help, f"l2d bench {action.option_strings or action.dest} has no help"


def test_generation_is_timed_per_token_for_each_step_count(base_dir, tmp_path):
    from l2d import get_l2d_model
    from l2d.bench_generate import format_generate_table, run_generate_bench
    from l2d.pretrained import load_base

    recipe = _recipe(base_dir)
    result = run_generate_bench(recipe, steps=(2, 1), batch=2, new_tokens=3, repeats=2, device="cpu", progress=False)
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["base.generate", "l2d steps=0", "euler steps=1", "euler steps=2"]
    assert rows["base.generate"]["nfe_per_token"] == 0 and rows["l2d steps=0"]["nfe_per_token"] == 0
    assert 0 < rows["euler steps=1"]["nfe_per_token"] < rows["euler steps=2"]["nfe_per_token"]
    assert all(len(r["ms_per_token_rounds"]) == 2 and r["ms_per_token"] > 0 for r in rows.values())
    assert rows["base.generate"]["vs_base"] == 1.0
    assert "| euler steps=2 |" in format_generate_table(result)
    # a trained adapter folder is loaded onto the recipe's base
    adapter = tmp_path / "adapter"
    get_l2d_model(load_base(base_dir)[0], recipe.l2d).save_pretrained(str(adapter))
    result = run_generate_bench(recipe, steps=(1,), new_tokens=2, repeats=1, adapter=str(adapter), device="cpu",
                                progress=False)
    assert result["adapter"] == str(adapter) and len(result["rows"]) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="dopri5"), "fixed-grid"),
    (dict(solver="eulr"), "fixed-grid"),
    (dict(steps=(-1,)), "--steps"),
    (dict(new_tokens=0), "--new-tokens"),
])
def test_bad_generation_arguments_fail_before_loading_anything(kwargs, match):
    from l2d.bench_generate import run_generate_bench

    def load(*_):
        raise AssertionError("loaded a model before checking the arguments")

    with pytest.raises(RecipeError, match=match):
        run_generate_bench(_recipe("unused"), load=load, progress=False, **kwargs)


def test_the_command_times_generation(base_dir, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe(base_dir).to_yaml())
    assert main(["bench", str(path), "--generate", "--steps", "1", "--new-tokens", "2", "--repeats", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| base.generate |" in out and "| euler steps=1 |" in out
    assert main(["bench", str(path), "--generate", "--steps", "1,x"]) == 1
    assert "--steps" in capsys.readouterr().err


def test_the_recipes_gradient_checkpointing_recomputes_in_every_method(base_dir):
    flops = {}
    for checkpointing in (False, True):
        recipe = _recipe(base_dir)
        recipe.train.gradient_checkpointing = checkpointing
        rows = run_bench(recipe, methods=("l2d", "lora", "full"), batch=2, seq_len=16, repeats=1, warmup=0,
                         device="cpu", memory=False, progress=False)["rows"]
        flops[checkpointing] = {r["name"]: r["flops"] for r in rows}
    for name in ("L2D, no self-cond pass", "LoRA", "full fine-tune"):
        assert flops[True][name] > flops[False][name], name  # the forward runs again in backward
