"""Batching: the collator pads and masks, length grouping is seeded and groups lengths, the
dataloader yields padded batches."""
import pytest
import torch

from l2d.batching import Collator, LengthGroupedBatchSampler, length_grouped_batches, make_dataloader
from l2d.data import IGNORE_INDEX, load_source, null_class_label, tokenize_dataset
from test_data import make_tiny_tokenizer, write_jsonl


@pytest.fixture
def tok():
    return make_tiny_tokenizer()


def test_collator_pads_and_masks():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "class_label": 0},
             {"input_ids": [8], "labels": [8], "class_label": 2}]
    b = Collator(pad_token_id=0)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["class_labels"].tolist() == [0, 2]
    left = Collator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(feats)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert Collator(0)([{"input_ids": [1]}])["class_labels"].tolist() == [null_class_label()]
    with pytest.raises(ValueError, match="pad_token"):
        Collator(None)


def test_length_grouping_is_deterministic_and_groups_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (400,), generator=g).tolist()
    a = length_grouped_batches(lengths, 8, seed=3, mega_batch_size=64)
    assert a == length_grouped_batches(lengths, 8, seed=3, mega_batch_size=64)
    assert a != length_grouped_batches(lengths, 8, seed=4, mega_batch_size=64)
    assert sorted(i for b in a for i in b) == list(range(400))  # every example exactly once

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    random_batches = torch.randperm(400, generator=g).view(50, 8).tolist()
    assert spread(a) < 0.25 * spread(random_batches)

    sampler = LengthGroupedBatchSampler(lengths, 8, seed=3, mega_batch_size=64)
    first = list(sampler)
    assert first == list(sampler) == a and len(sampler) == 50
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert len(LengthGroupedBatchSampler(lengths[:21], 8, drop_last=True)) == len(
        length_grouped_batches(lengths[:21], 8, drop_last=True)) == 2


def test_dataloader_yields_padded_batches(tok, tmp_path):
    rows = [{"prompt": " ".join(["a"] * n), "completion": "b"} for n in range(1, 13)]
    ex, _ = tokenize_dataset(load_source(write_jsonl(tmp_path / "l.jsonl", rows)), tok)
    batches = list(make_dataloader(ex, tok.pad_token_id, batch_size=4, seed=0))
    assert sum(len(b["input_ids"]) for b in batches) == 12
    for b in batches:
        assert (b["attention_mask"].sum(1).max() == b["input_ids"].shape[1])
        assert ((b["labels"] != IGNORE_INDEX) <= b["attention_mask"].bool()).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
