"""L2DConfig.latent_init (centred / PCA latent map) and loss_weighting (w(t) on each token's loss)."""
import pytest
import torch

from l2d import L2DConfig, L2DModel, get_l2d_model
from l2d.latent import LatentMap, loss_weights, sample_timesteps
from tiny import batch, randomize_path, tiny_base, tiny_config


def _offset_base(seed: int = 0):
    """A tiny base whose embeddings share a large mean, as trained LMs' do (SmolLM2: |mu| is 2/3 of a row's norm)."""
    base = tiny_base("llama", seed=seed)
    with torch.no_grad():
        E = base.get_input_embeddings().weight
        E.add_(torch.randn(E.shape[1], generator=torch.Generator().manual_seed(7)) * 2 * E.norm(dim=1).mean()
               / E.shape[1] ** 0.5)
    return base


def _mean_cosine(model):
    z = torch.nn.functional.normalize(model.latent_table().detach(), dim=1)
    s = z @ z.T
    return s[~torch.eye(len(s), dtype=torch.bool)].mean().item()


def test_centred_and_pca_latents_lose_the_shared_mean_direction():
    cosines, norms = {}, {}
    for how in ("random", "centered", "pca"):
        torch.manual_seed(0)
        model = get_l2d_model(_offset_base(), tiny_config(latent_init=how))
        cosines[how] = _mean_cosine(model)
        norms[how] = model.path.latent.phi.weight.norm(dim=1)
    assert cosines["random"] > 0.3  # the shared mean dominates the random map's latents
    assert abs(cosines["centered"]) < 0.05 and abs(cosines["pca"]) < 0.05
    for how in ("centered", "pca"):  # the rows keep the random init's (mean) norm, so phi's lr means the same
        torch.testing.assert_close(norms[how], torch.full_like(norms[how], norms["random"].mean().item()))


def test_pca_rows_capture_the_top_principal_subspace_of_the_embeddings():
    base = _offset_base()
    E = base.get_input_embeddings().weight.detach()
    d = 16
    phi = LatentMap(E.shape[1], d)
    random_rows = phi.phi.weight.detach().clone()
    phi.init_from_embeddings(E, "pca")
    C = (E - E.mean(0)).T @ (E - E.mean(0))
    eigenvalues = torch.linalg.eigvalsh(C)

    def captured(rows):  # variance of the centred table inside the row space
        q, _ = torch.linalg.qr(rows.T)
        return torch.trace(q.T @ C @ q).item()

    top = eigenvalues[-d:].sum().item()
    assert captured(phi.phi.weight.detach()) > 0.95 * top  # (minus the mean direction projected out)
    assert captured(phi.phi.weight.detach()) > 1.3 * captured(random_rows)
    # rows beyond the hidden size keep random values: a latent wider than the model still initialises
    wide = LatentMap(E.shape[1], E.shape[1] + 8)
    wide.init_from_embeddings(E, "pca")
    assert torch.isfinite(wide.phi.weight).all() and torch.linalg.matrix_rank(wide.phi.weight) == E.shape[1] - 1


@pytest.mark.parametrize("how", ["centered", "pca"])
def test_initialised_latents_keep_the_t0_invariant_and_load_without_reinit(how, tmp_path, monkeypatch):
    base = _offset_base()
    model = get_l2d_model(base, tiny_config(latent_init=how)).eval()
    ids, _ = batch(seed=3)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    for t in (0.0, 0.5, 0.99):  # at init the path is still the base at every t
        assert (model(ids, t=t).logits - ref).abs().max() < 1e-5
    randomize_path(model)
    assert (model(ids, t=0.0).logits - ref).abs().max() < 1e-5
    model.save_pretrained(tmp_path)
    saved = model.path.latent.phi.weight.detach().clone()

    def must_not_run(*args, **kwargs):
        raise AssertionError("from_pretrained re-initialised the latent map")

    monkeypatch.setattr(LatentMap, "init_from_embeddings", must_not_run)
    loaded = L2DModel.from_pretrained(base, str(tmp_path))
    assert torch.equal(loaded.path.latent.phi.weight, saved)


def test_loss_weighting_scales_each_token_by_its_t_in_training_only():
    torch.manual_seed(0)
    base = tiny_base("llama")
    ids, labels = batch(seed=1)
    t = torch.tensor([[0.2], [0.9]]).expand(2, ids.shape[1])
    noise = torch.randn(2, ids.shape[1], 16)
    model = get_l2d_model(base, tiny_config(class_dropout=0.0, self_conditioning=0.0))
    randomize_path(model)
    model.eval()
    ce = model(ids, labels=labels, t=t, noise=noise, reduction="none").loss
    n0 = int((labels[0, 1:] != -100).sum())  # packed order: row 0's tokens, then row 1's
    expected_w = {"late": (0.4, 1.8), "early": (1.6, 0.2)}
    for weighting, (w0, w1) in expected_w.items():
        model.config.loss_weighting = weighting
        model.train()
        per_token = model(ids, labels=labels, t=t, noise=noise, reduction="none").loss
        torch.testing.assert_close(per_token[:n0], w0 * ce[:n0])
        torch.testing.assert_close(per_token[n0:], w1 * ce[n0:])
        mean = model(ids, labels=labels, t=t, noise=noise).loss
        total = model(ids, labels=labels, t=t, noise=noise, reduction="sum").loss
        torch.testing.assert_close(mean, per_token.sum() / len(ce))  # normalised by the token count
        torch.testing.assert_close(total, per_token.sum())
        model.eval()  # validation losses are the plain mean whatever the weighting
        torch.testing.assert_close(model(ids, labels=labels, t=t, noise=noise).loss, ce.mean())


def test_early_weighting_takes_no_gradient_from_clean_tokens():
    model = get_l2d_model(tiny_base("llama"), tiny_config(class_dropout=0.0, self_conditioning=0.0,
                                                          loss_weighting="early"))
    randomize_path(model)
    model.train()
    ids, labels = batch(seed=2)
    t = torch.ones(ids.shape)
    t[0] = 0.5
    out = model(ids, labels=labels, t=t)
    out.loss.backward()
    assert out.loss.item() > 0 and any(p.grad is not None and p.grad.any() for p in model.path.parameters())
    model.zero_grad()
    out = model(ids, labels=labels, t=1.0)  # every token clean: weight 0
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.path.parameters())


@pytest.mark.parametrize("schedule", ["cosmap", "uniform", "logit_normal"])
def test_weights_average_to_one_under_the_symmetric_schedules(schedule):
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps((200_000,), schedule, generator=g)
    for weighting in ("none", "late", "early"):
        assert abs(loss_weights(t, weighting).mean().item() - 1.0) < 0.01


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="latent_init must be one of"):
        L2DConfig(latent_init="svd")
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        L2DConfig(loss_weighting="snr")
    with pytest.raises(ValueError, match="unknown latent init"):
        LatentMap(8, 4).init_from_embeddings(torch.randn(10, 8), "svd")


def test_per_token_losses_are_the_supervised_tokens_with_the_adapter_on_or_off():
    model = get_l2d_model(tiny_base("llama"), tiny_config())
    randomize_path(model)
    model.eval()
    ids, labels = batch(seed=4)
    at_t0 = model(ids, labels=labels, t=0.0, reduction="none").loss  # t = 0 is the base
    with model.disable_adapter():
        off = model(ids, labels=labels, reduction="none").loss
    assert at_t0.shape == off.shape == ((labels[:, 1:] != -100).sum(),)
    torch.testing.assert_close(at_t0, off)
