"""The lm-evaluation-harness model `l2d`: registered under that name, likelihoods from the frozen
base, generation through the diffusion path at `steps`, and a tiny local task end to end."""
import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from l2d import get_l2d_model  # noqa: E402
from l2d.eval.lm_eval_harness import L2DLM  # noqa: E402
from tiny import randomize_path, tiny_base, tiny_config  # noqa: E402
from tiny_tokenizer import VOCAB, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    base = tiny_base(vocab_size=VOCAB, max_position_embeddings=64)
    model = get_l2d_model(base, tiny_config()).eval()
    randomize_path(model, scale=2.0)
    return L2DLM(model=model, tokenizer=tiny_tokenizer(), steps=2, batch_size=3, progress=False)


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_registered_as_l2d():
    assert get_model("l2d") is L2DLM


def test_loglikelihood_is_the_base_teacher_forced(lm):
    tok, base = lm.tokenizer, lm.base
    reqs = [_req("loglikelihood", ("12+3=", "15")), _req("loglikelihood", ("a long context, 7*", " 8")),
            _req("loglikelihood", ("", "xyz"))]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (value, greedy) in zip([r.args for r in reqs], got):
        ids = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"]) if ctx else 0
        if not ctx:
            ids, n_ctx = [tok.bos_token_id] + ids, 1
        with torch.no_grad():
            logp = torch.log_softmax(base(torch.tensor([ids])).logits[0].float(), -1)
        want = sum(float(logp[j - 1, ids[j]]) for j in range(n_ctx, len(ids)))
        assert value == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[j - 1].argmax()) == ids[j] for j in range(n_ctx, len(ids)))


def test_rolling_loglikelihood_covers_every_token_across_windows(lm):
    text = "the quick brown fox jumps over the lazy dog " * 3  # 132 chars > max_length 64: several windows
    (rolling,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > lm.max_length
    # Every token scored once, each with a context of at most max_length tokens: between the sum
    # over disjoint windows and nothing.
    assert math.isfinite(rolling) and rolling < 0
    head = lm.loglikelihood([_req("loglikelihood", ("", text[:40]))])[0][0]
    (short,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text[:40],))])
    assert short == pytest.approx(head, abs=1e-4)  # one window: the plain likelihood after the prefix token


def test_generate_until_uses_steps_and_stops(lm):
    reqs = [_req("generate_until", ("1+1=", {"until": ["\n"], "max_gen_toks": 6}), i) for i in range(2)]
    outs = lm.generate_until(reqs)
    assert len(outs) == 2 and all("\n" not in o for o in outs)
    base_lm = L2DLM(model=lm.model, tokenizer=lm.tokenizer, steps=0, progress=False)
    with lm.model.disable_adapter():
        plain = L2DLM(model=lm.model.base_model, tokenizer=lm.tokenizer, progress=False)
        assert base_lm.generate_until(reqs) == plain.generate_until(reqs)  # steps=0 is the base


def test_tiny_local_task_end_to_end(lm, tmp_path):
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]
    data = tmp_path / "tiny_add.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_add.yaml").write_text(f"""
task: tiny_add
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=lm, tasks=["tiny_add"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                          log_samples=True)
    res = out["results"]["tiny_add"]
    assert 0.0 <= res["exact_match,none"] <= 1.0
    samples = out["samples"]["tiny_add"]
    assert len(samples) == 4
    # The harness scored exactly what the model generated.
    for s in samples:
        assert s["exact_match"] == float(s["filtered_resps"][0].strip() == s["target"])
