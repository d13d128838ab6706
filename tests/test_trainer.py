"""L2DModel under transformers' Trainer (and TRL's SFTTrainer when installed): a few steps on a tiny
model train the path only, checkpoints hold the adapter files only and load back, eval reports a loss."""
import os

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from l2d import L2DModel, get_l2d_model
from l2d.trainer import L2DTrainer
from tiny import batch, tiny_base, tiny_config
from tiny_tokenizer import VOCAB, tiny_tokenizer


def _dataset(n=8, T=12):
    ids, labels = batch(B=n, T=T, vocab=VOCAB)
    return [{"input_ids": i[: T - k % 3].tolist(), "labels": l[: T - k % 3].tolist()}  # ragged: the collator pads
            for k, (i, l) in enumerate(zip(ids, labels))]


def _args(out, **kw):
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, save_steps=2,
                             logging_steps=1, **kw)


@pytest.fixture()
def model():
    return get_l2d_model(tiny_base(vocab_size=VOCAB, tie_word_embeddings=True), tiny_config())


def test_trainer_trains_the_path_and_checkpoints_the_adapter_only(model, tmp_path):
    base_before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    path_before = {k: v.clone() for k, v in model.path.state_dict().items()}
    collate = DataCollatorForSeq2Seq(tiny_tokenizer(), label_pad_token_id=-100)
    trainer = L2DTrainer(model=model, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=2,
                                                 gradient_checkpointing=True),
                         train_dataset=_dataset(), eval_dataset=_dataset(4), data_collator=collate,
                         processing_class=tiny_tokenizer())
    trainer.train()
    assert model.config.sigma == 64.0 and type(model.config).__name__ == "L2DConfig"  # the trainer's view is gone
    assert model.gradient_checkpointing
    assert all(torch.equal(v, base_before[k]) for k, v in model.base_model.state_dict().items())
    assert any(not torch.equal(v, path_before[k]) for k, v in model.path.state_dict().items())
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    ckpt = tmp_path / "checkpoint-4"
    assert {"l2d_config.json", "l2d_model.safetensors"} <= set(os.listdir(ckpt))
    assert not (ckpt / "model.safetensors").exists()  # the frozen base is not copied into checkpoints
    trainer.save_model(str(tmp_path / "final"))
    loaded = L2DModel.from_pretrained(tiny_base(vocab_size=VOCAB, tie_word_embeddings=True), str(tmp_path / "final"))
    for k, v in model.path.state_dict().items():
        assert torch.equal(v, loaded.path.state_dict()[k]), k


def test_trainer_resumes_from_an_adapter_checkpoint(model, tmp_path):
    collate = DataCollatorForSeq2Seq(tiny_tokenizer(), label_pad_token_id=-100)
    L2DTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(),
               data_collator=collate).train()
    fresh = get_l2d_model(tiny_base(vocab_size=VOCAB, tie_word_embeddings=True), tiny_config())
    trainer = L2DTrainer(model=fresh, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(),
                         data_collator=collate)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 3


def test_loss_is_normalised_by_the_accumulated_batch_count(model):
    ids, labels = batch(B=2, T=10, vocab=VOCAB)
    kw = dict(t=0.5, noise=torch.randn(2, 10, 16), self_conditioning=False)
    model.eval()
    summed = model(ids, labels=labels, reduction="sum", **kw).loss
    assert torch.allclose(model(ids, labels=labels, num_items_in_batch=40, **kw).loss, summed / 40)


def test_trl_sft_trainer_runs_a_few_steps(model, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from l2d.trainer import L2DSFTTrainer

    tok = tiny_tokenizer()
    data = Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(2)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, disable_tqdm=True, learning_rate=1e-2, save_steps=2, max_length=32)
    trainer = L2DSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "l2d_model.safetensors").is_file()
    assert "sft" in model.model_tags  # TRL's tags, for the card push_to_hub writes
