"""``L2DConfig.paper()``: the authors' released ``lad_lora`` configuration, checked against numbers
produced by the authors' own code (tests/fixtures/paper_reference/, README there)."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import l2d.generation as generation
from l2d import L2DConfig, get_l2d_model
from l2d.config import PAPER_SETTINGS

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "paper_reference", "lad_lora_tiny.safetensors")
TOL = 1e-5

# the reference's parameter names -> ours, and whether the tensor is stored transposed there
# (its LoRA computes x @ A @ B with A [in, r], B [r, out]; ours B A x with A [r, in], B [out, r])
NAME_MAP = [
    (r"model\.flow_token_embedder\.embedder\.layers_module\.0\.(weight|bias)", r"latent.phi.\1", False),
    (r"model\.flow_to_lm_encoder\.embedder\.layers_module\.(0|2)\.(weight|bias)", r"encoder.net.\1.\2", False),
    (r"model\.timestep_embedder\.mlp\.(0|2)\.(weight|bias)", r"conditioning.time_mlp.\1.\2", False),
    (r"model\.layers\.(\d+)\.modulation_head\.mlp\.(0|2)\.(weight|bias)", r"blocks.\1.adaln.\2.\3", False),
    (r"model\.modulation_head\.mlp\.(0|2)\.(weight|bias)", r"merge.\1.\2", False),
    (r"model\.layers\.(\d+)\.self_attn\.flow_(q|o)_proj\.(A|B)", r"blocks.\1.\2_delta.\3", True),
    (r"model\.layers\.(\d+)\.mlp\.flow_(gate|up|down)_proj\.(A|B)", r"blocks.\1.mlp_deltas.deltas.\2_proj.\3", True),
]


def to_ours(name: str) -> tuple[str, bool]:
    for pattern, repl, transposed in NAME_MAP:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name), transposed
    raise KeyError(f"no mapping for the reference's parameter {name!r}")


def load_fixture():
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["llama_config"]), tensors


def paper_model(**overrides):
    """Our ``L2DConfig.paper()`` path on the fixture's tiny Llama, the reference's weights mapped in."""
    cfg, fx = load_fixture()
    base = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    base.load_state_dict({k[len("base."):]: v for k, v in fx.items() if k.startswith("base.")}, strict=True)
    model = get_l2d_model(base, L2DConfig.paper(**overrides)).eval()
    ours = dict(model.path.named_parameters())
    mapped = set()
    with torch.no_grad():
        for key, value in fx.items():
            if not key.startswith("path."):
                continue
            name, transposed = to_ours(key[len("path."):])
            value = value.float()
            ours[name].copy_(value.T if transposed else value)
            mapped.add(name)
    assert mapped == set(ours), f"not covered by the fixture: {sorted(set(ours) - mapped)}"
    return model, fx


@pytest.fixture(scope="module")
def reference():
    return paper_model()


@pytest.mark.parametrize("case", ["full", "masked"])
def test_training_forward_matches_the_reference(reference, case):
    model, fx = reference
    ids, labels, t = fx[f"{case}.input_ids"], fx[f"{case}.labels"], fx[f"{case}.t"]
    noise = torch.nn.functional.pad(fx[f"{case}.noise"], (0, 0, 0, 1))  # ours is [B, T, d]; none at T-1
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, t=t, noise=noise, output_logits=True)
        base_logits = model.base_model(input_ids=ids).logits
    # the reference feeds positions without a target (prompt, last) token 0's latent, ours pure
    # noise; only the supervised positions count, as in the loss
    sup = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
    ref_logits = fx[f"{case}.logits"]
    assert torch.allclose(base_logits, fx["main.logits"], atol=1e-6), "the base itself differs"
    # the path changes the logits a lot: the comparison below is not the base's against itself
    assert (ref_logits[sup] - fx["main.logits"][sup]).abs().max() > 0.1
    err = (out.logits[sup] - ref_logits[sup]).abs().max().item()
    assert err < TOL, err
    assert abs(out.loss.item() - fx[f"{case}.loss"].item()) < TOL


def test_token_solve_matches_the_reference(reference, monkeypatch):
    """A 4-step midpoint solve with the argmax estimate, the read-out at t=1 (the reference's decoding,
    greedy token choice here), from the same initial latent."""
    model, fx = reference
    prompt, x0 = fx["solve.prompt_ids"], fx["solve.x0"]
    seen = {}
    monkeypatch.setattr(generation, "randn", lambda rngs, shape, device: (x0 / model.config.sigma).to(device))
    solve, integrate = generation._solve_token, generation.integrate_fixed

    def keep_logits(*args, **kwargs):
        seen["logits"], nfe, row_nfe = solve(*args, **kwargs)
        return seen["logits"], nfe, row_nfe

    def keep_x1(*args, **kwargs):
        seen["x1"] = integrate(*args, **kwargs)
        return seen["x1"]

    monkeypatch.setattr(generation, "_solve_token", keep_logits)
    monkeypatch.setattr(generation, "integrate_fixed", keep_x1)
    out = model.generate(prompt, max_new_tokens=1, steps=4, solver="midpoint", estimate="argmax",
                         return_dict_in_generate=True)
    assert out.nfe == [9]
    ref_x1 = fx["solve.x1"]
    assert (seen["x1"] - ref_x1).abs().max().item() < TOL * ref_x1.abs().max().item()
    err = (seen["logits"].float() - fx["solve.logits"]).abs().max().item()
    assert err < TOL, err
    assert torch.equal(out.sequences[:, -1], fx["solve.logits"].argmax(-1)[:, 0])


def test_paper_sets_every_field_explicitly():
    """A new field needs its paper value here (the preset must not follow the defaults as they move)."""
    names = {f.name for f in fields(L2DConfig)} - {"base_model_name_or_path", "base_model_revision"}
    assert set(PAPER_SETTINGS) == names, ("L2DConfig.paper() must set every field; missing "
                                          f"{sorted(names - set(PAPER_SETTINGS))}")
    config = L2DConfig.paper()
    for name, value in PAPER_SETTINGS.items():
        assert getattr(config, name) == (tuple(value) if name == "class_names" else value), name
    # the released cfg's values
    assert (config.latent_dim, config.cond_dim, config.time_features, config.encoder_hidden) == (256,) * 4
    assert (config.rank, config.alpha, config.sigma, config.schedule) == (32, 32.0, 64.0, "uniform")
    assert (config.time_scale, config.head_layers, config.adaln_scale) == (1.0, 2, 1.0)
    assert (config.stream_init, config.merge_init, config.self_conditioning) == ("encoder", "zero", 0.0)
    assert config.num_classes == 0 and not config.encoder_z_hat and config.latent_bias
    assert config.weight_init == "paper"


def test_paper_overrides_and_round_trip(tmp_path):
    config = L2DConfig.paper(rank=8)
    assert config.rank == 8 and config.head_layers == 2
    with pytest.raises(ValueError, match="unknown keys"):
        L2DConfig.paper(rnak=8)
    config.save(str(tmp_path))
    assert L2DConfig.load(str(tmp_path))[0] == config


@pytest.mark.parametrize("bad,match", [
    (dict(head_layers=3), "head_layers"),
    (dict(time_scale=0.0), "time_scale"),
    (dict(weight_init="xavier"), "weight_init"),
    (dict(self_conditioning=0.5), "encoder_z_hat"),
    (dict(latent_bias="yes"), "latent_bias"),
])
def test_new_fields_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        L2DConfig.paper(**bad)


def test_paper_init_is_the_references():
    """At init: heads' last layers zero, their first layers and the encoder and latent map
    xavier-uniform with zero biases, the time MLP N(0, 0.02^2), low-rank A ~ N(0, 1/r^2), B = 0,
    no class embedding; the output is the base's at every t."""
    torch.manual_seed(0)
    cfg, fx = load_fixture()
    base = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    model = get_l2d_model(base, L2DConfig.paper()).eval()
    path = model.path
    assert path.conditioning.class_embedding is None
    assert path.encoder.net[0].in_features == 256  # x_t only

    def xavier_bound(w):
        return math.sqrt(6.0 / (w.shape[0] + w.shape[1]))

    xavier = [path.latent.phi, path.encoder.net[0], path.encoder.net[2], path.merge[0]] + \
        [b.adaln[0] for b in path.blocks]
    for layer in xavier:
        w = layer.weight
        assert w.abs().max() <= xavier_bound(w) and w.abs().max() > 0.9 * xavier_bound(w)
        assert not layer.bias.any()
    for layer in [path.merge[2]] + [b.adaln[2] for b in path.blocks]:
        assert not layer.weight.any() and not layer.bias.any()
    for layer in (path.conditioning.time_mlp[0], path.conditioning.time_mlp[2]):
        assert abs(layer.weight.std().item() - 0.02) < 0.002 and not layer.bias.any()
    A = torch.cat([b.q_delta.A.flatten() for b in path.blocks] + [b.mlp_deltas.deltas["down_proj"].A.flatten()
                                                                  for b in path.blocks])
    assert abs(A.std().item() - 1 / 32) < 0.003
    assert all(not p.any() for n, p in path.named_parameters() if n.endswith(".B"))
    ids = fx["full.input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, t=0.7)
        assert torch.allclose(out.logits, base(input_ids=ids).logits, atol=1e-6)


def test_defaults_unchanged_by_the_new_fields():
    """The fields the preset added keep today's path by default: one-layer heads on SiLU(c), t x 1000,
    an encoder reading [x_t, z_hat], a latent map without bias, a class embedding."""
    config = L2DConfig()
    assert (config.time_scale, config.head_layers, config.weight_init) == (1000.0, 1, "torch")
    assert config.encoder_z_hat and not config.latent_bias
    base = LlamaForCausalLM(LlamaConfig(**load_fixture()[0])).float().eval()
    path = get_l2d_model(base, config).path
    assert isinstance(path.merge[0], torch.nn.SiLU) and len(path.merge) == 2
    assert path.latent.phi.bias is None and path.encoder.net[0].in_features == 2 * config.latent_dim
    assert path.conditioning.class_embedding.num_embeddings == config.num_classes + 1
