"""FSDP2 as recipes/accelerate/fsdp2.yaml sets it up for method l2d (one root-level shard group,
frozen base included), on 2 CPU processes with gloo, driving torch's ``fully_shard`` directly
(both contexts): the training step must match one process on the whole batch, and the gathered
weights must save as the whole path. tests/test_train.py runs the same through `l2d train` and
accelerate (tests/cpu_launch.py)."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

STEPS = 2


def _setup(context: str, seed: int = 0):
    from l2d import get_l2d_model
    from tiny import batch, randomize_path, tiny_base, tiny_config

    model = get_l2d_model(tiny_base("llama"), tiny_config(class_dropout=0.0, context=context)).train()
    randomize_path(model, seed=seed)
    ids, labels = batch(seed=3, B=4, T=10, prompt=6)  # every row supervises 4 tokens
    noise = torch.randn(*ids.shape, model.config.latent_dim, generator=torch.Generator().manual_seed(1))
    return model, ids, labels, noise


def _train(model, ids, labels, noise):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(ids, labels=labels, t=0.6, noise=noise, self_conditioning=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def _worker(rank: int, world: int, init_file: str, out_dir: str, context: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, ids, labels, noise = _setup(context)
        fully_shard(model, reshard_after_forward=False)  # NO_WRAP: the root is the only group
        half = slice(rank * 2, rank * 2 + 2)  # equal supervised counts per rank: mean of means = mean
        losses = _train(model, ids[half], labels[half], noise[half])
        for loss in losses:
            dist.all_reduce(loss)
            loss /= world
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state)
            torch.save(torch.stack(losses), os.path.join(out_dir, "losses.pt"))  # test scratch only
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("context", ["frozen", "adapted"])
def test_fsdp2_root_sharding_matches_one_process_and_saves_the_whole_path(tmp_path, context):
    from safetensors.torch import load_file

    out = tmp_path / "fsdp2"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), context), nprocs=2, join=True)

    model, ids, labels, noise = _setup(context)
    want = torch.stack(_train(model, ids, labels, noise))
    got = torch.load(out / "losses.pt")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    saved = load_file(out / "l2d_model.safetensors")
    live = model.path.state_dict()
    assert saved.keys() == live.keys()
    for k, v in live.items():
        torch.testing.assert_close(saved[k], v, rtol=1e-3, atol=1e-5)  # two ranks reduce in another order
