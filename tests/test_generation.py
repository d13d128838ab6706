"""generate(steps=N): the token loop, solvers, NFE accounting, guidance, early stop, bad input."""
import math

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from l2d import get_l2d_model
from l2d.generation import EarlyStop, TokenField
from l2d.solvers import FIXED_SOLVERS, integrate_fixed, nfe_per_token
from tiny import batch, randomize_path, tiny_base, tiny_config


def _model(family="llama", **cfg):
    model = get_l2d_model(tiny_base(family), tiny_config(**cfg)).eval()
    randomize_path(model)
    return model


def _left_padded(seed=0):
    ids, _ = batch(seed=seed, B=3, T=7)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2", "phi3"])
def test_steps_0_is_base_generate_token_for_token(family):
    model = _model(family)
    ids, mask = _left_padded()
    ref = model.base_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                    pad_token_id=0, eos_token_id=2)
    got = model.generate(ids, mask, max_new_tokens=10, steps=0, eos_token_id=2, pad_token_id=0)
    assert torch.equal(got, ref)


def _one_token_field(model):
    """(a factory of fresh token fields for the last position of a 6-token prompt, a noise start
    x0 at t = 0, the main path's state)."""
    ids, _ = batch(B=1, T=6)
    main = model.run_main_path(ids)
    ctx = model.stream_context(main, torch.tensor([[5]]))
    Z = model.latent_table().float()
    x0 = model.config.sigma * torch.randn(1, 1, Z.shape[-1], generator=torch.Generator().manual_seed(0)).double()

    def new_field():
        return TokenField(model, ctx, main.hidden[:, -1:], model.class_tensor(None, 1), Z, "expected",
                          None, 1.0, None, None, None,
                          h_start=None if main.stream_input is None else main.stream_input[:, -1:])
    return new_field, x0, main


@pytest.mark.parametrize("stream_init,merge_init", [("encoder", "zero"), ("main", "ramp")])
def test_the_token_ode_converges_as_steps_grow(stream_init, merge_init):
    model = _model(stream_init=stream_init, merge_init=merge_init)
    new_field, x0, _ = _one_token_field(model)

    def solve(n):
        return integrate_fixed(new_field(), x0, n, "euler")

    with torch.no_grad():
        sols = {n: solve(n) for n in (4, 16, 64, 256)}
    diffs = [float((sols[n] - sols[4 * n]).norm()) for n in (4, 16, 64)]
    scale = math.sqrt(model.config.latent_dim)  # the norm of every token's latent
    if max(diffs) < 0.01 * scale:  # already converged at 4 steps (the default path, randomised, is tame):
        return                     # what is left is rounding near the stiff end
    # The 1 / (1 - t) factor makes the field stiff near t = 1, so the rate is below the solver's order,
    # but successive refinements must keep getting closer.
    assert all(a > b for a, b in zip(diffs, diffs[1:])), diffs
    assert diffs[-1] < 0.6 * diffs[0], diffs


@pytest.mark.parametrize("solver", sorted(FIXED_SOLVERS))
@pytest.mark.parametrize("steps", [1, 3])
def test_nfe_per_token_matches_the_formula(solver, steps):
    model = _model()
    ids, mask = _left_padded()
    out = model.generate(ids, mask, max_new_tokens=3, steps=steps, solver=solver, seed=0, eos_token_id=[],
                         return_dict_in_generate=True)
    assert out.nfe == [nfe_per_token(solver, steps)] * 3 == [FIXED_SOLVERS[solver] * steps + 1] * 3
    last = model.generate(ids, mask, max_new_tokens=2, steps=steps, solver=solver, seed=0, eos_token_id=[],
                          readout="last", return_dict_in_generate=True)
    assert last.nfe == [FIXED_SOLVERS[solver] * steps] * 2


def test_batched_and_unbatched_generation_agree():
    model = _model()
    ids, mask = _left_padded(seed=4)
    kw = dict(max_new_tokens=6, steps=3, solver="midpoint", eos_token_id=2, pad_token_id=0)
    together = model.generate(ids, mask, seed=[10, 11, 12], **kw)
    for row in range(3):
        keep = mask[row].bool()
        alone = model.generate(ids[row:row + 1, keep], seed=[10 + row], **kw)
        n = alone.shape[1] - int(keep.sum())
        assert torch.equal(together[row, ids.shape[1]:ids.shape[1] + n], alone[0, int(keep.sum()):])


def test_guidance_scale_one_equals_unguided_and_other_scales_differ():
    model = _model()
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=5, steps=4, seed=0, class_label="math", eos_token_id=[])
    plain = model.generate(ids, mask, **kw)
    assert torch.equal(model.generate(ids, mask, guidance_scale=1.0, **kw), plain)


def test_guidance_mixes_velocities_as_the_paper_does():
    """v = w v_cond + (1 - w) v_uncond (DESIGN.md, "Guidance"), each from its own pass, the null
    class for the unconditional one; the read-out logits are the conditional pass's."""
    model = _model()
    ids, _ = batch(B=1, T=6)
    main = model.run_main_path(ids)
    ctx = model.stream_context(main, torch.tensor([[5]]))
    Z = model.latent_table().float()
    x = model.config.sigma * 0.3 * torch.randn(1, 1, Z.shape[-1], generator=torch.Generator().manual_seed(0))
    math_cls, null_cls = model.class_tensor("math", 1), model.class_tensor(None, 1)

    def field(cls, w=None):
        return TokenField(model, ctx, main.hidden[:, -1:], cls, Z, "expected", w, 1.0, None, None, None)

    with torch.no_grad():
        v_cond, v_uncond = field(math_cls)(0.6, x.double()), field(null_cls)(0.6, x.double())
        guided = field(math_cls, 4.0)
        v = guided(0.6, x.double())
        cond_logits = field(math_cls)
        cond_logits(0.6, x.double())
    torch.testing.assert_close(v, 4.0 * v_cond - 3.0 * v_uncond, atol=1e-4, rtol=1e-5)
    assert (v - v_cond).abs().max() > 1e-3
    torch.testing.assert_close(guided.logits, cond_logits.logits, atol=1e-5, rtol=1e-5)


def test_early_stop_never_spends_more_than_the_fixed_budget():
    model = _model()
    ids, mask = _left_padded()
    budget = nfe_per_token("euler", 12)
    out = model.generate(ids, mask, max_new_tokens=6, steps=12, seed=0, eos_token_id=[],
                         early_stop=EarlyStop(threshold=0.0, patience=2), return_dict_in_generate=True)
    # patience 2 needs two evaluations; threshold 0 settles as soon as the argmax repeats, which
    # happens on some token well before the fixed budget
    assert all(2 <= n <= budget for n in out.nfe) and min(out.nfe) < budget - 2


@pytest.mark.parametrize("decoding", [
    dict(),                                                                  # greedy: expected latent
    dict(estimate="sample", do_sample=True, temperature=1.3),                # draws from each row's stream
    dict(estimate="argmax", solver="midpoint", class_label="math", guidance_scale=2.0),  # both halves
    dict(context="adapted", self_conditioning=0.5),                          # adapted K/V, z_hat fed
    dict(context="adapted", stream_layers=1, stream_init="main"),            # the stream in the top layer only
])
def test_early_stop_settles_each_row_as_if_it_were_alone(decoding):
    """A settled row leaves the solve: batched, every row gets the tokens and spends the
    evaluations it would alone, and the batch runs only as many evaluations as its slowest row."""
    cfg = {k: decoding.pop(k) for k in ("context", "self_conditioning", "stream_layers", "stream_init")
           if k in decoding}
    model = _model(**cfg)
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=5, steps=12, eos_token_id=[], early_stop=EarlyStop(threshold=0.0, patience=2),
              return_dict_in_generate=True, **decoding)
    together = model.generate(ids, mask, seed=[10, 11, 12], **kw)
    T = ids.shape[1]
    for row in range(3):
        keep = mask[row].bool()
        alone = model.generate(ids[row:row + 1, keep], seed=[10 + row], **kw)
        assert torch.equal(together.sequences[row, T:], alone.sequences[0, int(keep.sum()):])
        assert torch.equal(together.row_nfe[row], alone.row_nfe[0])
    assert together.nfe == together.row_nfe.max(0).values.tolist()
    # the rows do settle at different evaluations, and every one before the fixed budget somewhere
    assert (together.row_nfe.min(0).values < together.row_nfe.max(0).values).any()
    assert int(together.row_nfe.sum()) < 3 * 5 * nfe_per_token(kw.get("solver", "euler"), 12)


def test_without_early_stop_every_row_spends_the_batch_evaluations():
    model = _model()
    ids, mask = _left_padded()
    out = model.generate(ids, mask, max_new_tokens=3, steps=4, seed=0, eos_token_id=[], return_dict_in_generate=True)
    assert out.row_nfe.tolist() == [[5, 5, 5]] * 3 and out.nfe == [5] * 3
    base = model.generate(ids, mask, max_new_tokens=3, steps=0, eos_token_id=[], return_dict_in_generate=True)
    assert base.row_nfe.tolist() == [[0, 0, 0]] * 3


def test_max_nfe_ends_an_adaptive_solve_with_a_warning():
    model = _model()
    ids, mask = _left_padded()
    with pytest.warns(RuntimeWarning, match="max_nfe=5"):
        out = model.generate(ids, mask, max_new_tokens=2, steps=None, solver="dopri5", max_nfe=5, seed=0,
                             eos_token_id=[], return_dict_in_generate=True)
    assert out.nfe == [5, 5]


def test_sampling_is_reproducible_with_a_seed():
    model = _model()
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=6, steps=2, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, eos_token_id=[])
    a = model.generate(ids, mask, seed=3, **kw)
    assert torch.equal(a, model.generate(ids, mask, seed=3, **kw))
    assert not torch.equal(a, model.generate(ids, mask, seed=4, **kw))
    for estimate in ("argmax", "sample", "expected"):
        model.generate(ids, mask, max_new_tokens=2, steps=2, estimate=estimate, seed=0)


class _Recorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


class _DigitTokenizer:
    """Decodes id k to the text of k followed by a space (enough for stop strings)."""

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["".join(f"{i} " for i in row) for row in rows]


def test_streamer_and_stop_strings_and_eos():
    model = _model()
    ids, _ = batch(B=1, T=5)
    rec = _Recorder()
    out = model.generate(ids, max_new_tokens=5, steps=2, seed=0, streamer=rec, eos_token_id=[])
    assert rec.ended and torch.equal(rec.chunks[0], ids)
    assert torch.equal(torch.cat([c.view(-1) for c in rec.chunks[1:]]), out[0, 5:])
    first = int(out[0, 5])
    stopped = model.generate(ids, max_new_tokens=5, steps=2, seed=0, eos_token_id=[],
                             stop_strings=[f"{first} "], tokenizer=_DigitTokenizer())
    assert stopped.shape[1] == 6
    at_eos = model.generate(ids, max_new_tokens=5, steps=2, seed=0, eos_token_id=first)
    assert at_eos.shape[1] == 6


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=-1), "non-negative integer"),
    (dict(steps=2.5), "non-negative integer"),
    (dict(steps=True), "non-negative integer"),
    (dict(steps=4, solver="leapfrog"), "unknown solver"),
    (dict(steps=None, solver="euler"), "fixed number of steps"),
    (dict(steps=None, solver="dopri5", rtol=0.0), "rtol"),
    (dict(steps=None, solver="dopri5", atol=2.0), "atol"),
    (dict(steps=2, class_label="poetry"), "not one this adapter knows"),
    (dict(steps=2, guidance_scale=2.0), "guidance_scale needs class_label"),
    (dict(steps=2, max_new_tokens=200), "context"),
    (dict(steps=2, estimate="mode"), "unknown estimate"),
    (dict(steps=2, max_nfe=0), "max_nfe"),
])
def test_bad_generate_arguments_fail_before_generating(kwargs, match):
    model = _model()
    ids, _ = batch(B=1, T=5)
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, **kwargs)


def test_a_main_initialised_stream_generates_and_keeps_steps_0_exact():
    model = get_l2d_model(tiny_base("llama"), tiny_config(stream_init="main")).eval()
    randomize_path(model)
    ids, mask = _left_padded()
    ref = model.base_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    pad_token_id=0, eos_token_id=2)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=6, steps=0, eos_token_id=2, pad_token_id=0), ref)
    out = model.generate(ids, mask, max_new_tokens=4, steps=3, seed=0, eos_token_id=[], class_label="math",
                         guidance_scale=1.5, return_dict_in_generate=True)
    assert out.sequences.shape == (3, 11) and out.nfe == [4] * 4
    # The path changes the result once it is trained (here: randomised) and steps > 0.
    assert not torch.equal(model.generate(ids, mask, max_new_tokens=6, steps=3, seed=0, eos_token_id=2,
                                          pad_token_id=0), ref)


@pytest.mark.parametrize("merge_init", ["open", "ramp"])
def test_the_field_at_t0_is_the_paths_right_limit_for_an_open_gate(merge_init):
    """An open gate jumps from 0 (the base) to about 1 just after t = 0: the field starts from the
    path's prediction there, not the base's. Gates that start at 0 are read at t = 0 itself."""
    from l2d.generation import OPEN_GATE_T0

    model = _model(merge_init=merge_init)
    new_field, x, main = _one_token_field(model)

    def logits_at(t):
        return new_field().evaluate(t, x)

    with torch.no_grad():
        base = model.head_logits(main.hidden[:, -1:])
        at0 = logits_at(0.0)
        if merge_init == "open":
            assert torch.equal(at0, logits_at(OPEN_GATE_T0))
            assert (at0 - base).abs().max() > 1e-3
        else:
            assert torch.equal(at0, base)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_z_hat_is_fed_only_to_adapters_trained_with_self_conditioning(p):
    """Training with self_conditioning=0 only ever shows the encoder z_hat = 0, so generation must
    feed zeros too; with p > 0 the previous evaluation's expected latent goes in."""
    model = _model(self_conditioning=p)
    new_field, x0, _ = _one_token_field(model)
    with torch.no_grad():
        fresh = new_field().evaluate(0.5, x0)
        field = new_field()
        field.evaluate(0.3, x0)
        assert field.z_hat is not None and field.z_hat.abs().sum() > 0
        again = field.evaluate(0.5, x0)
    if p == 0:
        assert torch.equal(again, fresh)
    else:
        assert (again - fresh).abs().max() > 1e-4


def test_the_paper_protocol_is_reproducible_and_its_estimate_temperature_an_option():
    """DECODING_PROTOCOLS["paper"]: the argmax token's latent drives the ODE, midpoint, the token
    sampled at temperature 1; a seed makes it reproducible; "1-t" is the reference's estimate
    temperature for code."""
    from l2d.generation import decoding_protocol

    paper = decoding_protocol("paper")
    assert paper == {"estimate": "argmax", "solver": "midpoint", "do_sample": True, "temperature": 1.0}
    model = _model()
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=4, steps=7, seed=3, eos_token_id=[], return_dict_in_generate=True)
    a = model.generate(ids, mask, **paper, **kw)
    b = model.generate(ids, mask, **paper, **kw)
    assert torch.equal(a.sequences, b.sequences) and a.nfe == [15] * 4  # 7 midpoint steps + read-out
    code = model.generate(ids, mask, **{**paper, "estimate": "sample"}, estimate_temperature="1-t", **kw)
    assert code.sequences.shape == a.sequences.shape
    with pytest.raises(ValueError, match="estimate_temperature"):
        model.generate(ids, mask, estimate="sample", estimate_temperature=-1.0, steps=2)
    with pytest.raises(ValueError, match="decoding protocol"):
        decoding_protocol("beam")
