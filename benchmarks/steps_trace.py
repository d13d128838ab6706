"""Where in a token's solve the answer is decided: a trained adapter's greedy trajectories and its
reading of clean and wrong latents, on the demo's VALIDATION problems, teacher-forced.

    python benchmarks/steps_trace.py runs/demo/l2d --n 64 --steps 16

Every answer token of every problem is one row: the prompt plus the gold answer's earlier tokens is
the context, the gold token the target. Two measurements, both printed as tables (and saved as
JSON with ``--json``):

1. **Trajectory.** The greedy protocol's solve (expected-latent estimate, euler on a uniform grid
   of ``--steps`` steps, read-out at ``t = 1``) with the argmax of every evaluation recorded:
   the token accuracy after each evaluation, and how often the read-out's token differs from the
   first evaluation's (a change that fixes the token, or one that breaks it). If later evaluations
   never change the token, steps past the first cannot change accuracy under greedy decoding.
2. **Latent reading.** One evaluation at ``t`` on ``x_t = t z_a + (1 - t) sigma eps`` for
   ``z_a`` the latent of the gold token (does the path read a right latent?) and of a wrong one
   (a random other token among the answers' tokens): the rate at which the prediction is the
   latent's token (it copies) or the gold one (it corrects). A path that copies a wrong latent at
   high ``t`` cannot repair an early mistake in later steps: whatever the first evaluations commit
   to, the read-out repeats.
3. **Encoder share.** In the same evaluations, the rms of what the encoder writes into the stream
   (the latent's only way in) over the rms of the base's own residual stream where the diffusion
   stream starts (``stream_init="main"``): a share near zero means the latent has no channel.
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def answer_rows(tok, task, n: int):
    """(context ids, gold token) for every answer token of the first ``n`` problems."""
    from l2d.data import render_prompt

    rows = []
    for ex in task.examples[:n]:
        prompt = tok(render_prompt(tok, ex.messages), add_special_tokens=False)["input_ids"]
        answer = tok(str(ex.gold), add_special_tokens=False)["input_ids"]
        for i, gold in enumerate(answer):
            rows.append((prompt + answer[:i], gold))
    return rows


def token_field(model, ids: torch.Tensor, mask: torch.Tensor):
    """The greedy protocol's field for the next token of each row (what ``generate`` builds), and
    the latent table."""
    from l2d.generation import SolverSettings, _context_step, _per_call_parts, token_field

    cls = model.class_tensor(None, ids.shape[0])
    table, cond_cache = _per_call_parts(model, cls, None)
    main = model.run_main_path(ids, mask)
    context = _context_step(model, main, ids, mask, main.position_ids) if model.config.context == "adapted" else None
    return token_field(model, main, main.hidden[:, -1:], cls, table, SolverSettings(), None, cond_cache, context), table


@torch.no_grad()
def trace_batch(model, ids, mask, gold, wrong, steps: int, times, seed: int):
    from l2d.solvers import integrate_fixed

    fld, Z = token_field(model, ids, mask)
    g = torch.Generator().manual_seed(seed)
    argmaxes = []
    evaluate = fld.evaluate

    def recording(t, x, need_z_hat=True):
        logits = evaluate(t, x, need_z_hat)
        argmaxes.append(logits[:, 0].argmax(-1))
        return logits

    fld.evaluate = recording
    x0 = model.config.sigma * torch.randn(ids.shape[0], 1, Z.shape[-1], generator=g).double()
    x1 = integrate_fixed(fld, x0, steps, "euler", "uniform")
    fld.evaluate(1.0, x1, need_z_hat=False)
    trajectory = torch.stack(argmaxes, 1)  # [B, steps + 1]

    reading, share = {}, {}
    written = []
    hook = model.path.encoder.register_forward_hook(lambda mod, inp, out: written.append(out.detach().float()))
    h_start = fld._h_start
    try:
        for t in times:
            written.clear()
            eps = torch.randn(ids.shape[0], 1, Z.shape[-1], generator=g)
            for name, tokens in (("gold", gold), ("wrong", wrong)):
                fld.z_hat = None
                x = t * Z[tokens][:, None] + (1 - t) * model.config.sigma * eps
                pred = evaluate(t, x.double(), False)[:, 0].argmax(-1)
                reading[(t, name)] = pred
            if h_start is not None and written:
                enc_rms = torch.stack([w.pow(2).mean() for w in written]).mean().sqrt()
                share[t] = (enc_rms / h_start.float().pow(2).mean().sqrt()).item()
    finally:
        hook.remove()
    return trajectory, reading, share


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="an l2d train output folder")
    p.add_argument("--n", type=int, default=64, help="validation problems (every answer token is a row)")
    p.add_argument("--steps", type=int, default=16, help="greedy euler steps of the traced solve")
    p.add_argument("--times", default="0.5,0.9,0.97,0.99,1.0", help="t of the latent-reading evaluations")
    p.add_argument("--recipe", default="recipes/smollm2-135m/arithmetic.yaml", help="the recipe it was trained on")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--json", help="also write the measurements here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from l2d.demo import validation_task
    from l2d.eval.command import load_for_eval
    from l2d.eval.runner import _left_padded

    task = validation_task(args.recipe, args.n)
    model, tok, _ = load_for_eval(args.adapter)
    model.eval()
    rows = answer_rows(tok, task, args.n)
    vocab = sorted({g for _, g in rows})  # the wrong latents come from the answers' own tokens
    g = torch.Generator().manual_seed(args.seed + 1)
    times = [float(t) for t in args.times.split(",")]

    golds, trajs, readings, shares = [], [], {}, {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        ids, mask = _left_padded([r for r, _ in chunk], pad, "cpu")
        gold = torch.tensor([gt for _, gt in chunk])
        wrong = torch.tensor([vocab[int(torch.randint(len(vocab) - 1, (1,), generator=g))] for _ in chunk])
        wrong = torch.where(wrong == gold, torch.tensor(vocab[-1]), wrong)
        if len(vocab) > 1:
            assert bool((wrong != gold).all())
        traj, reading, share = trace_batch(model, ids, mask, gold, wrong, args.steps, times, args.seed + start)
        golds.append(gold), trajs.append(traj)
        for t, r in share.items():
            shares.setdefault(t, []).append(r)
        for key, pred in reading.items():
            readings.setdefault(key, []).append((pred, gold, wrong))
    gold, traj = torch.cat(golds), torch.cat(trajs)

    n_rows = len(gold)
    acc = (traj == gold[:, None]).float().mean(0)
    first, last = traj[:, 0], traj[:, -1]
    changed = first != last
    fixed = (changed & (last == gold)).sum().item()
    broke = (changed & (first == gold)).sum().item()
    grid = [round(k / args.steps, 4) for k in range(args.steps)] + [1.0]
    print(f"## Trajectory: {args.adapter}, {args.n} validation problems, {n_rows} answer tokens, "
          f"greedy euler {args.steps} steps\n")
    print("| evaluation | t | token accuracy % |\n|---|---|---|")
    for k, (t, a) in enumerate(zip(grid, acc.tolist())):
        label = "read-out" if k == len(grid) - 1 else str(k + 1)
        print(f"| {label} | {t:g} | {100 * a:.1f} |")
    print(f"\nread-out token differs from the first evaluation's in {int(changed.sum())} of {n_rows} rows "
          f"({fixed} fixed, {broke} broken, {int(changed.sum()) - fixed - broke} wrong either way)\n")
    print("## Latent reading: one evaluation on x_t = t z_a + (1 - t) sigma eps\n")
    print("| t | z_a gold: accuracy % | z_a wrong: copies % | z_a wrong: gold % | encoder share |\n"
          "|---|---|---|---|---|")
    table = {}
    for t in times:
        pred_g = torch.cat([p for p, _, _ in readings[(t, "gold")]])
        pred_w = torch.cat([p for p, _, _ in readings[(t, "wrong")]])
        wrong = torch.cat([w for _, _, w in readings[(t, "wrong")]])
        row = {"gold_accuracy": (pred_g == gold).float().mean().item(),
               "wrong_copied": (pred_w == wrong).float().mean().item(),
               "wrong_corrected": (pred_w == gold).float().mean().item(),
               "encoder_share": sum(shares[t]) / len(shares[t]) if shares.get(t) else None}
        table[t] = row
        enc = "" if row["encoder_share"] is None else f"{row['encoder_share']:.3g}"
        print(f"| {t:g} | {100 * row['gold_accuracy']:.1f} | {100 * row['wrong_copied']:.1f} | "
              f"{100 * row['wrong_corrected']:.1f} | {enc} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"adapter": args.adapter, "n": args.n, "rows": n_rows, "steps": args.steps,
                       "grid": grid, "accuracy": acc.tolist(), "changed": int(changed.sum()), "fixed": fixed,
                       "broken": broke, "reading": {str(t): r for t, r in table.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
