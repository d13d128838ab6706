"""l2d_kernels: every Triton kernel (interpreted on the CPU) and the torch path against float64.

conftest.py sets TRITON_INTERPRET=1 before Triton is imported, so ``use_backend("triton")`` runs
the real kernels through the interpreter. References are the plain torch functions of
``l2d_kernels.reference`` evaluated in float64 with autograd, on the same (rounded) inputs.

Tolerances per input dtype (``TOL``): outputs are float32 whatever the input dtype, so they are
held to float32 accuracy; gradients come back in the input dtype, so they are held to its
rounding (bf16 keeps 8 bits, fp16 11).
"""
import os
import subprocess
import sys

import pytest
import torch

import l2d_kernels
from l2d_kernels import reference as ref
from l2d_kernels.cross_entropy import linear_cross_entropy_chunked

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (5, 123), (3, 7, 577)]
# (atol, rtol) of float32 outputs, and of gradients returned in the input dtype.
TOL = {
    torch.float32: dict(out=(2e-5, 2e-5), grad=(2e-5, 2e-5)),
    torch.bfloat16: dict(out=(2e-5, 2e-5), grad=(2e-2, 1.6e-2)),
    torch.float16: dict(out=(2e-5, 2e-5), grad=(2e-3, 2e-3)),
}
BACKENDS = ["torch", "triton"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _f64(tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _grads(out, inputs, grad_out):
    want = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, want, grad_out.to(device=out.device, dtype=out.dtype)))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def _close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- modulated norm

def _norm_inputs(shape, dtype, kind, weight_grad=False, seed=0):
    h = shape[-1]
    x = _randn(shape, dtype, seed, 2.0).requires_grad_()
    weight = _randn(h, dtype, seed + 1).requires_grad_(weight_grad) if kind != "none" else None
    bias = _randn(h, dtype, seed + 2).requires_grad_(weight_grad) if kind == "layer" else None
    dw = _randn(shape, dtype, seed + 3, 0.5).requires_grad_()
    shift = _randn(shape, dtype, seed + 4).requires_grad_()
    return [x, weight, bias, dw, shift]


def _check_modulated_norm(backend, shape, dtype, kind, weight_grad=False, inputs=None):
    inputs = inputs or _norm_inputs(shape, dtype, kind, weight_grad)
    grad_out = _randn(inputs[0].shape, torch.float64, 9)
    with l2d_kernels.use_backend(backend):
        y = l2d_kernels.modulated_norm(*inputs, 1e-6, kind)
    inputs64 = _f64(inputs)
    y64 = ref.modulated_norm_ref(*inputs64, 1e-6, kind)
    assert y.dtype == torch.float32 and y.shape == inputs[0].shape
    _close(y, y64, TOL[dtype]["out"], f"{backend} {kind} forward")
    got = _grads(y, inputs, grad_out)
    want = _grads(y64, inputs64, grad_out)
    for name, g, w, t in zip(["dx", "dweight", "dbias", "ddw", "dshift"], got, want, inputs):
        if t is None or not t.requires_grad:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        # Frozen-gain grads sum over every token: their error grows with the token count.
        scale = max(1.0, inputs[0].numel() / inputs[0].shape[-1]) if name in ("dweight", "dbias") else 1.0
        atol, rtol = TOL[dtype]["grad"]
        _close(g, w, (atol * scale, rtol), f"{backend} {kind} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", l2d_kernels.NORM_KINDS)
def test_modulated_norm_matches_float64_reference(backend, dtype, shape, kind):
    """Forward and dx, d(dw), d(shift) equal the float64 autograd reference, frozen gain untouched."""
    _check_modulated_norm(backend, shape, dtype, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms", "rms_offset", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modulated_norm_gain_grads_only_when_asked(kind, dtype, backend):
    """With a trainable gain/bias their grads match float64; with a frozen one none is made."""
    _check_modulated_norm(backend, (5, 123), dtype, kind, weight_grad=True)
    inputs = _norm_inputs((5, 123), dtype, kind, weight_grad=False)
    with l2d_kernels.use_backend(backend):
        y = l2d_kernels.modulated_norm(*inputs, 1e-6, kind)
    y.sum().backward()
    assert inputs[1].grad is None and (inputs[2] is None or inputs[2].grad is None)
    assert all(t.grad is not None for t in (inputs[0], inputs[3], inputs[4]))


def test_modulated_norm_weight_none_means_unit_gain():
    """``weight=None`` is a gain of 1 for every kind, on both backends."""
    for kind in l2d_kernels.NORM_KINDS:
        x, _, _, dw, shift = _norm_inputs((5, 123), torch.float32, kind)
        for backend in BACKENDS:
            with l2d_kernels.use_backend(backend):
                y = l2d_kernels.modulated_norm(x, None, None, dw, shift, 1e-6, kind)
            ones = torch.ones(123)
            expected = ref.modulated_norm_ref(x, ones, None, dw, shift, 1e-6, "rms" if kind == "rms_offset" else kind)
            _close(y, expected.detach(), (2e-5, 2e-5), f"{backend} {kind}")


def test_modulated_norm_out_dtype_is_the_float32_result_rounded():
    """``out_dtype=bf16`` stores the float32 result rounded once, on both backends."""
    inputs = _norm_inputs((5, 123), torch.bfloat16, "rms")
    y32 = ref.modulated_norm_ref(*inputs, 1e-6, "rms").detach()
    for backend in BACKENDS:
        with l2d_kernels.use_backend(backend):
            y = l2d_kernels.modulated_norm(*inputs, 1e-6, "rms", out_dtype=torch.bfloat16)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, y32.to(torch.bfloat16), atol=0, rtol=1 / 128)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_modulated_norm_non_contiguous_and_broadcast_inputs(kind, backend):
    """Strided rows, a transposed x and per-sequence (broadcast) dw/shift give the reference's values and grads."""
    base = _randn((3, 9, 200), torch.float32, 1)
    x = base[:, ::2, 7:130].detach().requires_grad_()  # row stride 400, not contiguous
    x_t = _randn((123, 5), torch.float32, 2).t().detach().requires_grad_()  # column stride 5
    dw = _randn((3, 1, 123), torch.float32, 3, 0.5).requires_grad_()
    shift = _randn((3, 1, 123), torch.float32, 4).requires_grad_()
    weight = _randn(123, torch.float32, 5)
    bias = _randn(123, torch.float32, 6) if kind == "layer" else None
    for xx, d, s in ((x, dw, shift), (x_t, dw[0, 0], shift[0, 0])):
        assert not xx.is_contiguous()
        _check_modulated_norm(backend, None, torch.float32, kind,
                              inputs=[xx, weight, bias, d, s])


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_modulated_norm_large_hidden(kind):
    """Hidden size 16384 (one row per program, the whole row in one block) stays exact."""
    _check_modulated_norm("triton", (2, 16384), torch.float32, kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modulated_norm_no_tokens(backend):
    """Zero tokens is an empty result and empty grads, not a launch error."""
    inputs = _norm_inputs((0, 64), torch.float32, "rms")
    with l2d_kernels.use_backend(backend):
        y = l2d_kernels.modulated_norm(*inputs, 1e-6, "rms")
    assert y.shape == (0, 64)
    y.sum().backward()
    assert inputs[0].grad.shape == (0, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modulated_norm_keeps_x_and_gain_not_the_adaln_output(backend):
    """Backward keeps x, one [rows, H] gain and row statistics; dw being a slice of a [rows, 6H]
    adaLN output does not keep that whole tensor alive."""
    rows, H = 8, 64
    x = _randn((rows, H), torch.float32, 0).requires_grad_()
    adaln = _randn((rows, 6 * H), torch.float32, 1).requires_grad_()
    dw, shift = adaln[:, :H], adaln[:, H:2 * H]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with l2d_kernels.use_backend(backend):
            l2d_kernels.modulated_norm(x, _randn(H, torch.float32, 2), None, dw, shift, 1e-6, "rms")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    assert adaln.untyped_storage().data_ptr() not in storages
    full_rows = sum(1 for nbytes in storages.values() if nbytes >= rows * H * 4)
    assert full_rows == 2, storages  # x and the gain (not Norm(x) as well)


# ----------------------------------------------------------------------------- latent norm, noising

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_latent_normalize_matches_float64_reference(backend, dtype, shape):
    """z = sqrt(d) u / ||u|| per row (every row has norm sqrt(d)) and du match float64."""
    u = _randn(shape, dtype, 0).requires_grad_()
    grad_out = _randn(shape, torch.float64, 1)
    with l2d_kernels.use_backend(backend):
        z = l2d_kernels.latent_normalize(u)
    (u64,) = _f64([u])
    z64 = ref.latent_normalize_ref(u64)
    assert z.dtype == torch.float32
    _close(z, z64, TOL[dtype]["out"], "z")
    torch.testing.assert_close(z.norm(dim=-1), torch.full(shape[:-1], shape[-1] ** 0.5), atol=1e-4, rtol=1e-5)
    (du,) = _grads(z, [u], grad_out)
    (du64,) = _grads(z64, [u64], grad_out)
    assert du.dtype == dtype
    atol, rtol = TOL[dtype]["grad"]
    _close(du, du64, (atol, rtol), "du")


def test_latent_normalize_zero_row_uses_the_clamp():
    """A zero row maps to zero and gets du = sqrt(d) dz / eps, exactly like the clamped reference."""
    u = torch.zeros(2, 16)
    u[1] = torch.randn(16, generator=_gen(3))
    dz = torch.randn(2, 16, generator=_gen(4))
    eps = 1e-3
    results = []
    for backend in BACKENDS:
        uu = u.clone().requires_grad_()
        with l2d_kernels.use_backend(backend):
            z = l2d_kernels.latent_normalize(uu, eps)
        z.backward(dz)
        results.append((z.detach(), uu.grad))
    for z, du in results:
        assert torch.all(z[0] == 0)
        torch.testing.assert_close(du[0], 4.0 * dz[0] / eps)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- head + cross-entropy

def _head_problem(n, h, v, dtype, seed=0, n_ignored=2):
    hidden = _randn((n, h), dtype, seed).requires_grad_()
    weight = _randn((v, h), dtype, seed + 1, h ** -0.5 * 3)
    bias = _randn(v, dtype, seed + 2)
    targets = torch.randint(0, v, (n,), generator=_gen(seed + 3))
    targets[:n_ignored] = -100
    return hidden, weight, bias, targets


HEAD_OPTIONS = {
    "plain": dict(),
    "bias": dict(use_bias=True),
    "softcap+scale": dict(softcap=5.0, logit_scale=0.7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", list(HEAD_OPTIONS))
def test_linear_cross_entropy_matches_float64_reference(backend, reduction, dtype, option):
    """Loss and d(hidden) of the chunked head equal the unchunked float64 reference."""
    opts = dict(HEAD_OPTIONS[option])
    use_bias = opts.pop("use_bias", False)
    hidden, weight, bias, targets = _head_problem(37, 48, 300, dtype)
    bias = bias if use_bias else None
    grad_out = _randn(targets.shape, torch.float64, 7) if reduction == "none" else torch.tensor(1.3)
    with l2d_kernels.use_backend(backend):
        loss = l2d_kernels.linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction,
                                                chunk_size=8, **opts)
    h64, w64, b64 = _f64([hidden, weight, bias])
    loss64 = ref.linear_cross_entropy_ref(h64, w64, targets, b64, reduction=reduction, **opts)
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    # bf16 logits come out of a bf16 matmul: the loss carries that rounding (the reference does not).
    out_tol = (1e-5, 1e-5) if dtype == torch.float32 else (5e-2, 2e-2)
    _close(loss, loss64, out_tol, "loss")
    (dh,) = _grads(loss, [hidden], grad_out)
    (dh64,) = _grads(loss64, [h64], grad_out)
    assert dh.dtype == dtype
    # bf16: the logits and the logit gradient are rounded to 8 bits before the matmuls.
    grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2 * dh64.abs().max().item(), 5e-2)
    _close(dh, dh64, grad_tol, "dhidden")
    if backend == "triton":  # same bf16 logits on both paths: they agree much closer than to float64
        loss_t = l2d_kernels.linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction,
                                                  chunk_size=8, **opts)
        (dh_t,) = _grads(loss_t, [hidden], grad_out)
        _close(loss, loss_t, (1e-5, 1e-5), "loss triton vs torch")
        _close(dh, dh_t, TOL[dtype]["grad"], "dhidden triton vs torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_head_grads_only_when_asked(backend):
    """A trainable head gets float64-exact dW, d(bias); a frozen head gets none (and no work)."""
    hidden, weight, bias, targets = _head_problem(21, 16, 50, torch.float32)
    weight.requires_grad_()
    bias.requires_grad_()
    with l2d_kernels.use_backend(backend):
        loss = l2d_kernels.linear_cross_entropy(hidden, weight, targets, bias, softcap=4.0, chunk_size=4)
    h64, w64, b64 = _f64([hidden, weight, bias])
    loss64 = ref.linear_cross_entropy_ref(h64, w64, targets, b64, softcap=4.0)
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    want = torch.autograd.grad(loss64, [h64, w64, b64])
    for g, w in zip(got, want):
        _close(g, w, (1e-5, 1e-4), "grad")
    frozen_w, frozen_b = weight.detach(), bias.detach()
    with l2d_kernels.use_backend(backend):
        loss = l2d_kernels.linear_cross_entropy(hidden, frozen_w, targets, frozen_b, chunk_size=4)
    loss.backward()
    assert hidden.grad is not None and frozen_w.grad is None and frozen_b.grad is None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_gradcheck_float64(reduction):
    """torch.autograd.gradcheck of the chunked Function (grads computed in forward / in backward)."""
    hidden, weight, bias, targets = _head_problem(7, 5, 11, torch.float64, n_ignored=1)
    weight.requires_grad_()
    bias.requires_grad_()

    def f(h, w, b):
        return linear_cross_entropy_chunked(h, w, targets, b, softcap=3.0, logit_scale=0.9,
                                            reduction=reduction, chunk_size=3)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_never_builds_full_logits(backend, monkeypatch):
    """No chunk of logits has more than chunk_size rows, with or without gradients."""
    import l2d_kernels.cross_entropy as ce

    seen = []
    real_linear = ce.F.linear

    def spy(x, w, b=None):
        seen.append(x.shape[0])
        return real_linear(x, w, b)

    monkeypatch.setattr(ce.F, "linear", spy)
    hidden, weight, _, targets = _head_problem(50, 8, 40, torch.float32)
    with l2d_kernels.use_backend(backend):
        for reduction in ("mean", "none"):
            loss = l2d_kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=16)
            loss.sum().backward()
            with torch.no_grad():
                l2d_kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=16)
    # One pass over the tokens per call, plus the backward's recomputation for reduction="none".
    assert seen and max(seen) <= 16 and sum(seen) == 50 * 5


def test_linear_cross_entropy_all_ignored_is_nan_like_torch():
    """Every target ignored: mean is nan (as F.cross_entropy), sum is 0, and grads are zero."""
    hidden, weight, _, targets = _head_problem(6, 8, 20, torch.float32, n_ignored=6)
    for backend in BACKENDS:
        with l2d_kernels.use_backend(backend):
            assert torch.isnan(l2d_kernels.linear_cross_entropy(hidden, weight, targets))
            loss = l2d_kernels.linear_cross_entropy(hidden, weight, targets, reduction="sum")
        assert loss.item() == 0.0
        (dh,) = torch.autograd.grad(loss, hidden)
        assert torch.all(dh == 0)


# ----------------------------------------------------------------------------- dispatch

def test_backend_switch():
    """set_backend/use_backend flip the path; auto keeps CPU tensors on torch; bad names raise."""
    cpu = torch.zeros(2, 4)
    assert l2d_kernels.get_backend() == (os.environ.get("L2D_KERNELS") or "auto")
    with l2d_kernels.use_backend("torch"):
        assert not l2d_kernels.use_triton(cpu)
        with l2d_kernels.use_backend("triton"):
            assert l2d_kernels.get_backend() == "triton" and l2d_kernels.use_triton(cpu)
        assert l2d_kernels.get_backend() == "torch"
    with l2d_kernels.use_backend("auto"):
        assert not l2d_kernels.use_triton(cpu)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        l2d_kernels.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown norm kind"):
        l2d_kernels.modulated_norm(cpu, None, None, cpu, cpu, 1e-6, "batch")


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with l2d_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        l2d_kernels.latent_normalize(torch.ones(2, 4))


def test_import_without_triton_and_env_switch():
    """``import l2d_kernels`` works with Triton missing; L2D_KERNELS picks the backend at import."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, l2d_kernels as k\n"
        "assert k.get_backend() == 'torch' and not k.triton_available()\n"
        "x = torch.randn(3, 8)\n"
        "y = k.modulated_norm(x, None, None, torch.zeros_like(x), torch.zeros_like(x), 1e-6, 'rms')\n"
        "assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, L2D_KERNELS="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- real GPU

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", l2d_kernels.NORM_KINDS)
def test_gpu_modulated_norm_matches_torch(kind):
    """Compiled kernels on CUDA, bf16 at a training shape, against the float64 reference."""
    inputs = [None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)
              for t in _norm_inputs((64, 2048), torch.bfloat16, kind, weight_grad=True)]
    _check_modulated_norm("auto", None, torch.bfloat16, kind, weight_grad=True, inputs=inputs)


@pytest.mark.gpu
@cuda
def test_gpu_latent_and_head_match_torch():
    u = torch.randn(4096, 256, device="cuda", requires_grad=True)
    z = l2d_kernels.latent_normalize(u)
    with l2d_kernels.use_backend("torch"):
        z_ref = l2d_kernels.latent_normalize(u)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    hidden, weight, bias, targets = (t.cuda() for t in _head_problem(1024, 256, 32000, torch.bfloat16))
    hidden = hidden.detach().requires_grad_()
    loss = l2d_kernels.linear_cross_entropy(hidden, weight, targets, softcap=30.0)
    (dh,) = torch.autograd.grad(loss, hidden)
    with l2d_kernels.use_backend("torch"):
        loss_ref = l2d_kernels.linear_cross_entropy(hidden, weight, targets, softcap=30.0)
        (dh_ref,) = torch.autograd.grad(loss_ref, hidden)
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dh.float(), dh_ref.float(), atol=1e-3, rtol=2e-2)
