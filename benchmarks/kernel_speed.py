"""Benchmark the l2d_kernels Triton kernels against torch eager and torch.compile (needs CUDA).

    python benchmarks/kernel_speed.py                       # modulated norm, the issue's three shapes
    python benchmarks/kernel_speed.py --kinds rms layer --head --latent
    python benchmarks/kernel_speed.py --shapes 4096x2048 --no-compile

For every shape (tokens x hidden) and pass (forward, forward+backward) it prints the time of the
Triton kernel, of the torch reference run eagerly and of ``torch.compile`` of the same reference,
the speed-ups, and the Triton kernel's achieved bandwidth: the minimum bytes the op must move
divided by its time, also as a fraction of the measured device-to-device copy bandwidth (a
``copy_`` of 1 GiB, counted as read + write). Times are medians of ``triton.testing.do_bench``.
The GPU name and the torch / Triton / CUDA versions are printed above the tables.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

DEFAULT_SHAPES = ["4096x2048", "16384x4096", "8192x8192"]
DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def environment() -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    return (f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs) | "
            f"torch {torch.__version__} | triton {triton.__version__} | CUDA {torch.version.cuda} | "
            f"python {platform.python_version()}")


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (warm-up, L2 flushed between runs by do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s: bytes read + bytes written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _fwd_bwd(fn, inputs, grad):
    def run():
        y = fn()
        torch.autograd.grad(y, inputs, grad)
    return run


def _table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    line = " | ".join(str(h).rjust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print(" | ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def bench_modulated_norm(shapes, kinds, dtype, compile_ref, copy_bw):
    import l2d_kernels
    from l2d_kernels.reference import modulated_norm_ref

    compiled = None
    if compile_ref:
        # One compiled graph per shape, kind and grad mode: lift the recompile limit so none falls back to eager.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        compiled = torch.compile(modulated_norm_ref, dynamic=False)
    es = torch.finfo(dtype).bits // 8
    # Minimum traffic per element: fwd reads x, dw, shift, writes y (float32); bwd reads dy
    # (float32), x, dw and writes dx, d(dw), d(shift).
    bytes_fwd = 3 * es + 4
    bytes_bwd = 4 + 2 * es + 3 * es
    rows = []
    for shape in shapes:
        n, h = (int(v) for v in shape.split("x"))
        for kind in kinds:
            x = torch.randn(n, h, device=DEVICE, dtype=dtype, requires_grad=True)
            weight = torch.randn(h, device=DEVICE, dtype=dtype) if kind != "none" else None
            bias = torch.randn(h, device=DEVICE, dtype=dtype) if kind == "layer" else None
            dw = (0.1 * torch.randn(n, h, device=DEVICE, dtype=dtype)).requires_grad_()
            shift = torch.randn(n, h, device=DEVICE, dtype=dtype, requires_grad=True)
            grad = torch.randn(n, h, device=DEVICE, dtype=torch.float32)
            args = (x, weight, bias, dw, shift, 1e-6, kind)
            impls = {
                "triton": lambda: l2d_kernels.modulated_norm(*args),
                "eager": lambda: modulated_norm_ref(*args),
            }
            if compiled is not None:
                impls["compile"] = lambda: compiled(*args)
            with l2d_kernels.use_backend("triton"):
                err = (impls["triton"]() - modulated_norm_ref(*args)).abs().max().item()
                for name, per_elem, wrap in (("fwd", bytes_fwd, _no_grad),
                                             ("fwd+bwd", bytes_fwd + bytes_bwd,
                                              lambda f: _fwd_bwd(f, [x, dw, shift], grad))):
                    ms = {k: bench(wrap(f)) for k, f in impls.items()}
                    gbs = n * h * per_elem / ms["triton"] / 1e6
                    rows.append([
                        shape, kind, name, f"{ms['triton']:.3f}", f"{ms['eager']:.3f}",
                        f"{ms['compile']:.3f}" if "compile" in ms else "-",
                        f"{ms['eager'] / ms['triton']:.2f}x",
                        f"{ms['compile'] / ms['triton']:.2f}x" if "compile" in ms else "-",
                        f"{gbs:.0f}", f"{100 * gbs / copy_bw:.0f}%", f"{err:.1e}",
                    ])
            del x, weight, bias, dw, shift, grad
            torch.cuda.empty_cache()
    _table(f"modulated_norm, {dtype}, y in float32 (times in ms)",
           ["tokens x hidden", "kind", "pass", "triton", "eager", "compile", "vs eager", "vs compile",
            "GB/s", "of copy", "max|err|"], rows)


def bench_latent(copy_bw, shapes=((128256, 256), (32768, 256))):
    import l2d_kernels
    from l2d_kernels.reference import latent_normalize_ref

    rows = []
    for n, d in shapes:
        u = torch.randn(n, d, device=DEVICE, requires_grad=True)
        grad = torch.randn(n, d, device=DEVICE)
        cases = {
            # fwd reads u, writes z; bwd reads u, dz, writes du (float32)
            "latent_normalize": (lambda: l2d_kernels.latent_normalize(u), lambda: latent_normalize_ref(u), 20),
        }
        for name, (fast, eager, per_elem) in cases.items():
            with l2d_kernels.use_backend("triton"):
                ms_t, ms_e = bench(_fwd_bwd(fast, [u], grad)), bench(_fwd_bwd(eager, [u], grad))
            gbs = n * d * per_elem / ms_t / 1e6
            rows.append([f"{n}x{d}", name, f"{ms_t:.3f}", f"{ms_e:.3f}", f"{ms_e / ms_t:.2f}x",
                         f"{gbs:.0f}", f"{100 * gbs / copy_bw:.0f}%"])
    _table("latent normalisation and noising, float32, forward+backward (ms)",
           ["rows x d", "op", "triton", "eager", "vs eager", "GB/s", "of copy"], rows)


def bench_head(dtype, shapes=((8192, 2048, 32768), (8192, 2048, 128256), (16384, 576, 49152))):
    import l2d_kernels
    from l2d_kernels.reference import linear_cross_entropy_ref

    rows = []
    for n, h, v in shapes:
        hidden = torch.randn(n, h, device=DEVICE, dtype=dtype, requires_grad=True)
        weight = torch.randn(v, h, device=DEVICE, dtype=dtype) * h**-0.5
        targets = torch.randint(0, v, (n,), device=DEVICE)
        impls = {
            "chunked+triton": ("triton", lambda: l2d_kernels.linear_cross_entropy(hidden, weight, targets)),
            "chunked torch": ("torch", lambda: l2d_kernels.linear_cross_entropy(hidden, weight, targets)),
            "eager (full logits)": ("torch", lambda: linear_cross_entropy_ref(hidden, weight, targets)),
        }
        for name, (backend, fn) in impls.items():
            with l2d_kernels.use_backend(backend):
                step = lambda: torch.autograd.grad(fn(), [hidden])  # noqa: E731
                try:
                    step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    step()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    ms = f"{bench(step):.2f}"
                except torch.OutOfMemoryError:
                    ms, peak = "OOM", float("nan")
            rows.append([f"{n}x{h}, V={v}", name, ms, f"{peak:.0f}"])
        del hidden, weight, targets
        torch.cuda.empty_cache()
    _table(f"vocabulary head + cross-entropy, {dtype}, forward+backward to hidden (frozen head)",
           ["tokens x hidden, vocab", "implementation", "ms", "extra peak MiB"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="tokens x hidden, e.g. 4096x2048")
    parser.add_argument("--kinds", nargs="+", default=["rms"], choices=["rms", "rms_offset", "layer", "none"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--latent", action="store_true", help="also time latent normalisation and noising")
    parser.add_argument("--head", action="store_true", help="also time the chunked head + cross-entropy")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py needs a CUDA GPU: none is visible here. The kernels' CPU "
                 "correctness is tested by `pytest tests/test_kernels.py` (Triton interpreter).")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/kernel_speed.py needs Triton: pip install triton")

    print(environment())
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {copy_bw:.0f} GB/s (read + write)")
    dtype = DTYPES[args.dtype]
    bench_modulated_norm(args.shapes, args.kinds, dtype, not args.no_compile, copy_bw)
    if args.latent:
        bench_latent(copy_bw)
    if args.head:
        bench_head(dtype)


if __name__ == "__main__":
    main()
