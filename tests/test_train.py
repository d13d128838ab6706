"""Training: recipe errors, adapters that load, exact resume, NaN handling, baselines; DDP, DeepSpeed and FSDP = 1 process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import l2d.train as train_mod
from l2d import L2DModel
from l2d.recipe import RecipeError, load_recipe, recipe_from_dict
from l2d.train import TrainingError, lr_at, train
from tiny import tiny_base

WORDS = "what is one two three four five six seven eight nine plus minus".split()
SPECIALS = ["[PAD]", "<s>", "</s>", "<|user|>", "<|assistant|>", "[UNK]"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
NUMS = WORDS[2:11]


def tiny_tokenizer(chat_template=TEMPLATE):
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny llama and a word-level chat tokenizer saved as a local model folder."""
    d = tmp_path_factory.mktemp("tiny-base")
    tiny_base("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = []
    for i, a in enumerate(NUMS):
        for j, b in enumerate(NUMS):
            if i + j + 1 < len(NUMS):  # a + b in words stays inside the vocabulary
                rows.append({"prompt": f"what is {a} plus {b}", "completion": NUMS[i + j + 1]})
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_recipe(base_dir, data_file, out, method="l2d", **train_kw):
    raw = {
        "model": {"name_or_path": base_dir},
        "method": method,
        "l2d": {"latent_dim": 16, "cond_dim": 32, "time_features": 32, "rank": 4, "alpha": 4.0},
        "lora": {"r": 4, "alpha": 8.0},
        "data": {"max_length": 32, "sources": [{"name": data_file, "category": "math"}]},
        "train": {"output_dir": str(out), "batch_size": 4, "micro_batch_size": 2, "max_steps": 6,
                  "lr": 3e-3, "warmup_steps": 2, "save_every": 2, "keep_last": 2, "progress_bar": False,
                  **train_kw},
    }
    return raw


def losses(out):
    return [json.loads(ln)["loss"] for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ recipes
def test_recipe_errors_name_the_key(tmp_path, base_dir, data_file):
    raw = make_recipe(base_dir, data_file, tmp_path / "run")
    bad = {**raw, "train": {**raw["train"], "learning_rate": 1e-4}}
    with pytest.raises(RecipeError, match=r"unknown key train\.learning_rate"):
        recipe_from_dict(bad)
    with pytest.raises(RecipeError, match=r"train\.lr: expected float, got str"):
        recipe_from_dict(raw, ["train.lr=fast"])
    with pytest.raises(RecipeError, match=r"data\.sources\[0\]\.n: expected int"):
        recipe_from_dict({**raw, "data": {"sources": [{"name": data_file, "n": "ten"}]}})
    with pytest.raises(RecipeError, match=r"unknown key l2d\.sigmaa"):
        recipe_from_dict(raw, ["l2d.sigmaa=3"])
    with pytest.raises(RecipeError, match=r"l2d: L2DConfig: sigma must be positive"):
        recipe_from_dict(raw, ["l2d.sigma=-1"])
    # A YAML file: `1e-4` is a float (YAML 1.1 would read a string) and overrides apply.
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw).replace("0.003", "3e-3"))
    r = load_recipe(path, ["train.lr=5e-5", "l2d.rank=8"])
    assert r.train.lr == 5e-5 and r.l2d.rank == 8 and r.train.warmup_steps == 2
    path.write_text(yaml.safe_dump({**raw, "trian": {}}))
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key trian"):
        load_recipe(path)


def test_schedule_warms_up_then_decays_to_min_lr():
    t = recipe_from_dict({"data": {"sources": ["x.jsonl"]}}).train  # the paper's defaults
    assert (t.lr, t.min_lr, t.warmup_steps, t.betas, t.weight_decay, t.grad_clip) == (1e-4, 1e-6, 100, [0.9, 0.95], 0.01, 1.0)
    lrs = [lr_at(s, 1000, t) for s in range(1000)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[99] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:])) and lrs[-1] == pytest.approx(1e-6, rel=1e-2)


# ------------------------------------------------------------------------------------ training
def test_short_run_saves_an_adapter_that_loads(tmp_path, base_dir, data_file):
    out = tmp_path / "run"
    summary = train(recipe_from_dict(make_recipe(base_dir, data_file, out, max_steps=4)))
    assert summary["steps"] == 4 and not summary["stopped"]
    curve = losses(out)
    assert len(curve) == 4 and all(torch.isfinite(torch.tensor(curve)))
    assert load_recipe(out / "recipe.yaml").train.max_steps == 4  # the recipe used, loadable as is
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = L2DModel.from_pretrained(base, str(out))
    trained = sum(float(p.abs().sum()) for n, p in model.path.named_parameters() if "merge" in n)
    assert trained > 0  # the zero-initialised merge head moved: the saved path is the trained one
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"] or \
        sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_head_lr_scale_sets_the_conditioning_heads_rate(tmp_path, base_dir, data_file):
    """head_lr_scale=0 leaves every conditioning head (adaLN, merge, time MLP, class embedding) where
    it started while the deltas and the encoder train; the groups carry the scale."""
    recipe = recipe_from_dict(make_recipe(base_dir, data_file, tmp_path / "run", max_steps=3, head_lr_scale=0.0))
    # open gates everywhere (the blocks' and the merge's), so the deltas learn with the heads frozen
    recipe.l2d.merge_init, recipe.l2d.stream_init = "ramp", "main"
    model = train_mod.build_model(recipe, AutoModelForCausalLM.from_pretrained(base_dir))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and n.startswith("path.")}
    assert frozen and all(train_mod.part_of(n) == "heads" for n in frozen)  # scale 0: not trained at all
    recipe.train.head_lr_scale = 0.1
    groups = train_mod.optimizer_groups(train_mod.build_model(recipe, AutoModelForCausalLM.from_pretrained(base_dir)),
                                        recipe)
    assert sorted({g["lr_scale"] for g in groups}) == [0.1, 1.0]
    recipe.train.head_lr_scale = 0.0
    train(recipe)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    trained = L2DModel.from_pretrained(base, str(tmp_path / "run")).path.state_dict()
    fresh = L2DModel(AutoModelForCausalLM.from_pretrained(base_dir), recipe.l2d).path.state_dict()
    heads = [n for n in trained if train_mod.part_of("path." + n) == "heads"]
    assert heads and all(torch.equal(trained[n], fresh[n]) for n in heads if "adaln" in n or "merge" in n)
    assert not torch.equal(trained["blocks.0.q_delta.B"], fresh["blocks.0.q_delta.B"])
    assert not torch.equal(trained["encoder.net.2.weight"], fresh["encoder.net.2.weight"])


def test_encoder_lr_scale_sets_the_encoder_and_latent_map_rate(tmp_path, base_dir, data_file):
    """encoder_lr_scale scales (or, at 0, freezes) exactly the input encoder and the latent map."""
    recipe = recipe_from_dict(make_recipe(base_dir, data_file, tmp_path / "run", max_steps=2, head_lr_scale=0.0))
    recipe.l2d.merge_init, recipe.l2d.stream_init = "open", "main"
    recipe.train.encoder_lr_scale = 3.0
    model = train_mod.build_model(recipe, AutoModelForCausalLM.from_pretrained(base_dir))
    by_scale = {}
    for group in train_mod.optimizer_groups(model, recipe):
        by_scale.setdefault(group["lr_scale"], set()).update(id(p) for p in group["params"])
    encoder = {id(p) for n, p in model.named_parameters() if n.startswith(("path.encoder.", "path.latent."))}
    assert encoder and by_scale[3.0] == encoder
    recipe.train.encoder_lr_scale = 0.0
    model = train_mod.build_model(recipe, AutoModelForCausalLM.from_pretrained(base_dir))
    assert not any(p.requires_grad for n, p in model.named_parameters() if train_mod.part_of(n) == "encoder")
    train(recipe)
    after = L2DModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "run")).path
    # the encoder's output layer starts at zero (merge_init open) and stays there: the path never read x_t
    assert not after.encoder.net[2].weight.any() and not after.encoder.net[2].bias.any()
    assert after.blocks[0].q_delta.B.any()  # while the deltas trained
    with pytest.raises(RecipeError, match="encoder_lr_scale"):
        recipe_from_dict(make_recipe(base_dir, data_file, tmp_path / "bad", encoder_lr_scale=-1.0))


@pytest.mark.parametrize("method", ["l2d", "lora"])
def test_loraplus_lr_ratio_speeds_up_the_b_matrices_only(tmp_path, base_dir, data_file, method):
    """train.loraplus_lr_ratio=4: every B of a low-rank delta (the path's, or peft's lora_B) sits in a
    group at 4x its part's rate, every A at 1x; one AdamW step from B = 0 (a sign step of size lr)
    then moves B four times as far as with ratio 1."""
    def run(ratio, out):
        recipe = recipe_from_dict(make_recipe(base_dir, data_file, out, method=method, max_steps=1, warmup_steps=0,
                                              head_lr_scale=0.0, loraplus_lr_ratio=ratio))
        recipe.l2d.merge_init, recipe.l2d.stream_init = "open", "main"
        return recipe

    recipe = run(4.0, tmp_path / "groups")
    model = train_mod.build_model(recipe, AutoModelForCausalLM.from_pretrained(base_dir))
    scale_of = {id(p): g["lr_scale"] for g in train_mod.optimizer_groups(model, recipe) for p in g["params"]}
    up = [n for n, p in model.named_parameters() if p.requires_grad and train_mod.is_up_projection(n)]
    down = [n for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".A") or ".lora_A." in n)]
    assert up and len(up) == len(down)
    params = dict(model.named_parameters())
    assert all(scale_of[id(params[n])] == 4.0 for n in up) and all(scale_of[id(params[n])] == 1.0 for n in down)

    def largest_b(out):
        if method == "l2d":
            path = L2DModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).path
            return max(float(p.abs().max()) for n, p in path.named_parameters() if n.endswith(".B"))
        from safetensors.torch import load_file
        weights = load_file(str(out / "adapter_model.safetensors"))
        return max(float(w.abs().max()) for n, w in weights.items() if "lora_B" in n)

    train(run(1.0, tmp_path / "one"))
    train(run(4.0, tmp_path / "four"))
    one, four = largest_b(tmp_path / "one"), largest_b(tmp_path / "four")
    assert one > 0 and four == pytest.approx(4 * one, rel=1e-3)
    with pytest.raises(RecipeError, match="loraplus_lr_ratio"):
        recipe_from_dict(make_recipe(base_dir, data_file, tmp_path / "bad", loraplus_lr_ratio=0.0))


def test_interrupted_then_resumed_run_repeats_the_loss_curve(tmp_path, base_dir, data_file):
    full, part = tmp_path / "full", tmp_path / "part"
    train(recipe_from_dict(make_recipe(base_dir, data_file, full)))
    summary = train(recipe_from_dict(make_recipe(base_dir, data_file, part)), stop_after=3)
    assert summary["stopped"] == "step budget" and len(losses(part)) == 3
    # The second half may change the micro-batch size (memory), not the data or the model.
    train(recipe_from_dict(make_recipe(base_dir, data_file, part, micro_batch_size=2)), resume=str(part))
    assert losses(part) == losses(full)  # exact: same weights, optimizer, schedule, data and noise
    from safetensors.torch import load_file

    a, b = load_file(full / "l2d_model.safetensors"), load_file(part / "l2d_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((part / "checkpoints").iterdir())) <= 2  # keep_last


def test_resume_from_another_recipe_is_refused(tmp_path, base_dir, data_file):
    out = tmp_path / "run"
    train(recipe_from_dict(make_recipe(base_dir, data_file, out)), stop_after=2)
    with pytest.raises(TrainingError, match=r"another recipe.*l2d"):
        train(recipe_from_dict(make_recipe(base_dir, data_file, out), ["l2d.rank=8"]), resume=str(out))
    # the per-group rates live in the optimizer state a resume restores: a new ratio cannot take effect
    with pytest.raises(TrainingError, match=r"another recipe.*train\.loraplus_lr_ratio"):
        train(recipe_from_dict(make_recipe(base_dir, data_file, out), ["train.loraplus_lr_ratio=4"]), resume=str(out))
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(recipe_from_dict(make_recipe(base_dir, data_file, out)))
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(recipe_from_dict(make_recipe(base_dir, data_file, out)), resume=str(tmp_path / "nowhere"))


def test_a_checkpoint_older_than_a_recipe_field_resumes_at_its_default(tmp_path, base_dir, data_file):
    """A field added to a section since a checkpoint was written (l2d.class_init_std, train.loraplus_lr_ratio)
    is missing from its saved recipe: it ran at the default, so a recipe at the default resumes."""
    recipe = recipe_from_dict(make_recipe(base_dir, data_file, tmp_path / "run"))
    old = recipe.to_dict()
    del old["l2d"]["class_init_std"], old["train"]["loraplus_lr_ratio"]
    fingerprint = {"model_type": "llama"}
    train_mod.check_resume({"recipe": old, "base": fingerprint}, recipe, fingerprint, tmp_path)
    with pytest.raises(TrainingError, match=r"another recipe.*l2d"):
        train_mod.check_resume({"recipe": old, "base": fingerprint},
                               recipe_from_dict(make_recipe(base_dir, data_file, tmp_path / "run"),
                                                ["l2d.class_init_std=0.5"]), fingerprint, tmp_path)
    # likewise a field added to a data source since (its list is compared entry by entry)
    del old["data"]["sources"][0]["cot"]
    train_mod.check_resume({"recipe": old, "base": fingerprint}, recipe, fingerprint, tmp_path)
    old["data"]["sources"][0]["n"] = 7
    with pytest.raises(TrainingError, match=r"another recipe.*data"):
        train_mod.check_resume({"recipe": old, "base": fingerprint}, recipe, fingerprint, tmp_path)


def test_non_finite_loss_stops_naming_the_step_and_saves(tmp_path, base_dir, data_file, monkeypatch):
    real, calls = train_mod.batch_loss, []

    def poisoned(model, method, batch):
        loss, n = real(model, method, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), n  # micro-batch 5 = step 3

    monkeypatch.setattr(train_mod, "batch_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*after step 2"):
        train(recipe_from_dict(make_recipe(base_dir, data_file, out, save_every=0)))
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()
    assert len(losses(out)) == 2


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_run_through_the_same_script(tmp_path, base_dir, data_file, method):
    out = tmp_path / method
    summary = train(recipe_from_dict(make_recipe(base_dir, data_file, out, method=method, max_steps=3)))
    curve = losses(out)
    assert summary["steps"] == 3 and all(torch.isfinite(torch.tensor(curve)))
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (out / weights).is_file()
    if method == "lora":  # LoRA trains far fewer weights than the whole model
        assert summary["trainable_parameters"] < sum(p.numel() for p in tiny_base("llama").parameters()) / 5


@pytest.mark.parametrize("method", ["l2d", "lora"])
def test_mixed_precision_reaches_every_method(tmp_path, base_dir, data_file, monkeypatch, method):
    """train.mixed_precision is accelerate's autocast around the prepared model's forward; the
    baselines' loss must run inside that forward (it once called the backbone directly, in fp32)."""
    seen = set()
    build = train_mod.build_model

    def spy(recipe, base, tokenizer=None):
        model = build(recipe, base, tokenizer)
        base.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        return model

    from accelerate.state import AcceleratorState

    monkeypatch.setattr(train_mod, "build_model", spy)
    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton: earlier tests ran fp32
    try:
        train(recipe_from_dict(make_recipe(base_dir, data_file, tmp_path / "run", method=method, max_steps=1,
                                           save_every=0, mixed_precision="bf16")))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == {torch.bfloat16}


@pytest.mark.parametrize("problem, match", [
    ("no_examples", "no usable examples"),
    ("no_template", "no chat template"),
    ("tiny_data", "fewer than one global batch"),
])
def test_bad_data_gives_clear_errors(tmp_path, base_dir, data_file, problem, match):
    raw = make_recipe(base_dir, data_file, tmp_path / "run")
    if problem == "no_examples":
        path = tmp_path / "empty.jsonl"
        path.write_text(json.dumps({"prompt": "what is one", "completion": ""}) + "\n")
        raw["data"]["sources"] = [{"name": str(path)}]
    elif problem == "no_template":
        d = tmp_path / "base"
        tiny_base("llama").save_pretrained(d)
        tiny_tokenizer(chat_template=None).save_pretrained(d)
        raw["model"]["name_or_path"] = str(d)
    else:
        raw["train"]["batch_size"] = 64
    with pytest.raises((ValueError, TrainingError), match=match):
        train(recipe_from_dict(raw))


@pytest.mark.parametrize("method", ["l2d", "lora"])
def test_two_process_ddp_matches_one_process(tmp_path, base_dir, data_file, method):
    """Same global batch (4): 1 process x 2 accumulation steps vs 2 gloo processes (DDP) x 1. The
    baseline's loss must run inside DDP's forward (DDP arms its gradient all-reduce there)."""
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(method=method, max_steps=3, save_every=0)
    train(recipe_from_dict(make_recipe(base_dir, data_file, one, **kw)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(base_dir, data_file, two, **kw)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # accelerate's CPU launcher runs one process unless under mpirun; torchrun starts 2 gloo ranks
    # and the Accelerator inside picks them up (MULTI_CPU).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "l2d", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 1 accumulation" in proc.stderr
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert _same_weights(one, two, "l2d_model.safetensors" if method == "l2d" else "adapter_model.safetensors")


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def _launch(config: str, recipe: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`l2d train` on 2 CPU ranks under recipes/accelerate/`config` (DeepSpeed or FSDP), with the
    environment that `accelerate launch --config_file` exports from it (but fp32: the CPU ranks run
    no bf16); tests/cpu_launch.py lets accelerate run DeepSpeed and FSDP on CPU ranks."""
    launch = yaml.safe_load((ACCELERATE_CONFIGS / config).read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "ACCELERATE_MIXED_PRECISION": "no"}
    if launch["distributed_type"] == "FSDP":
        env["ACCELERATE_USE_FSDP"] = "true"
        env.update({k.upper(): str(v).lower() if isinstance(v, bool) else str(v)
                    for k, v in launch["fsdp_config"].items()})
    else:
        ds = launch["deepspeed_config"]
        env.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds["zero_stage"]),
                    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": str(ds["gradient_accumulation_steps"]),
                    "ACCELERATE_GRADIENT_CLIPPING": str(ds["gradient_clipping"]),
                    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ds["offload_optimizer_device"],
                    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ds["offload_param_device"],
                    "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(ds["zero3_init_flag"]).lower(),
                    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": str(ds.get("zero3_save_16bit_model", False)).lower()})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("cpu_launch.py")), "train", str(recipe), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln]  # the ranks' own, before torchrun's
    assert (proc.returncode == 0) == ok, "\n".join(errors[:20]) + proc.stderr[-2000:]
    return proc


def _same_weights(one: Path, two: Path, name: str) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(one / name), load_file(two / name)
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("config, method", [("zero2.yaml", "l2d"), ("fsdp2.yaml", "l2d"), ("fsdp2-layers.yaml", "lora")])
def test_sharded_training_matches_one_process_and_resumes(tmp_path, base_dir, data_file, config, method):
    """DeepSpeed ZeRO-2 / FSDP2 as the recipes' accelerate configs set them, with accumulation (global
    batch 8 = 2 ranks x 2 micro-batches x 2), stopped after 2 of 3 steps and resumed from the
    sharded checkpoint: the same loss curve (hence the same token-count normalisation, learning rate
    per step and clipping) and weights as one process."""
    if config.startswith("zero"):
        pytest.importorskip("deepspeed")
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(method=method, max_steps=3, save_every=0, batch_size=8, grad_clip=0.05)  # a clip that acts
    train(recipe_from_dict(make_recipe(base_dir, data_file, one, **kw)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(base_dir, data_file, two, **kw)))
    first = _launch(config, recipe, "--stop-after", "2")
    assert "2 process(es) x 2 accumulation x 2" in first.stderr
    state = two / "checkpoints" / "step-000002" / "accelerate_state"
    assert state.is_dir() and (config.startswith("zero") or (state / "pytorch_model_fsdp_0").is_dir())
    _launch(config, recipe, "--resume", str(two))
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert _same_weights(one, two, "l2d_model.safetensors" if method == "l2d" else "adapter_model.safetensors")


@pytest.mark.slow
def test_deepspeed_zero3_trains_the_lora_baseline_as_one_process(tmp_path, base_dir, data_file):
    """ZeRO-3 partitions the weights (the base loads partitioned, the head is gathered only inside
    its own forward): the LoRA baseline's curve and adapter are still those of one process."""
    pytest.importorskip("deepspeed")
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(method="lora", max_steps=3, save_every=0, batch_size=8)
    train(recipe_from_dict(make_recipe(base_dir, data_file, one, **kw)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(base_dir, data_file, two, **kw)))
    _launch("zero3.yaml", recipe)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert _same_weights(one, two, "adapter_model.safetensors")


@pytest.mark.slow
def test_deepspeed_zero3_refuses_method_l2d_before_loading_the_base(tmp_path, base_dir, data_file):
    pytest.importorskip("deepspeed")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(base_dir, data_file, tmp_path / "run", max_steps=3)))
    proc = _launch("zero3.yaml", recipe, ok=False)
    assert "method l2d cannot run under DeepSpeed ZeRO-3" in proc.stderr and "zero2.yaml" in proc.stderr
    assert "Loading weights" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_deepspeed_config_follows_the_recipe(caplog):
    """l2d train owns accumulation and clipping: a DeepSpeed config that says otherwise is overridden,
    with a warning that names the key."""
    from types import SimpleNamespace

    from l2d import ds_engine

    config = {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": "auto"}
    accelerator = SimpleNamespace(num_processes=8, state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    with caplog.at_level("WARNING", logger="l2d.ds_engine"):
        ds_engine.configure(accelerator, SimpleNamespace(micro_batch_size=2, grad_clip=0.5))
    assert config == {"gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
                      "train_micro_batch_size_per_gpu": 2, "train_batch_size": 16}
    assert "gradient_accumulation_steps=4" in caplog.text and "gradient_clipping=1.0" in caplog.text
    config.update(gradient_clipping="auto")
    caplog.clear()
    ds_engine.configure(accelerator, SimpleNamespace(micro_batch_size=2, grad_clip=0.0))  # 0: no clipping
    assert config["gradient_clipping"] == 0.0 and not caplog.text


def test_response_loss_module_is_its_baseline_to_accelerate():
    """What DDP/FSDP/DeepSpeed wrap for a baseline: its forward is the baseline's loss, and what
    accelerate reads off a model (per-layer wrapping classes, config) is the baseline's."""
    from peft import LoraConfig, get_peft_model

    from l2d.baseline_loss import ResponseLoss, inner, inner_state_dict, response_loss
    from tiny import batch

    lm = get_peft_model(tiny_base("llama"), LoraConfig(r=4, target_modules="all-linear"))
    wrapped = ResponseLoss(lm)
    assert wrapped._no_split_modules == lm._no_split_modules and "LlamaDecoderLayer" in wrapped._no_split_modules
    assert wrapped.config is lm.config and inner(wrapped) is lm
    assert inner_state_dict(wrapped.state_dict()).keys() == lm.state_dict().keys()
    ids, labels = batch(T=10)
    mask = torch.ones_like(ids)
    torch.testing.assert_close(wrapped(ids, mask, labels), response_loss(lm, ids, mask, labels))
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute


@pytest.mark.parametrize("family", ["llama", "granite", "gemma2"])
def test_baseline_loss_at_supervised_positions_equals_the_full_logits_loss(family):
    """batch_loss for lora/full only runs the head where labels supervise; the sum must not change."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from l2d.train import batch_loss
    from tiny import batch, tiny_base

    model = get_peft_model(tiny_base(family), LoraConfig(r=4, target_modules="all-linear"))
    ids, labels = batch(T=10)
    labels[1, :7] = -100
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss, n = batch_loss(model, "lora", b)
    logits = model(input_ids=ids).logits[:, :-1].float()
    ref = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
