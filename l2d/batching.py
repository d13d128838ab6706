"""Batches of tokenized examples: padding collator and length-grouped, seeded batch order.

Padding is wasted compute (the diffusion path runs at every supervised position of every row),
so batches group examples of similar length, while the order of the batches stays random.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from .data import IGNORE_INDEX, null_class_label


class Collator:
    """Pads a list of examples into tensors.

    Returns `input_ids` (padded with `pad_token_id`), `labels` (padded with -100),
    `attention_mask` (1 on real tokens) and `class_labels` [B] (from each example's
    `class_label`, `null_label` when missing). Right padding for training; left padding
    (`padding_side="left"`) puts every prompt's last token in the last column, as generation wants.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None, null_label: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the eos token)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.null_label = null_class_label() if null_label is None else null_label

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:  # fixed shape multiples help kernels / compiled graphs
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[i, cols] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, cols] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            mask[i, cols] = 1
        class_labels = torch.tensor([int(f.get("class_label", self.null_label)) for f in features],
                                    dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "class_labels": class_labels}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           mega_batch_size: int | None = None, drop_last: bool = False) -> list[list[int]]:
    """Split example indices into batches of similar length, deterministically for a seed.

    Shuffle all indices, cut them into mega-batches (default 50 batches each), sort each
    mega-batch by length (longest first) and cut it into batches; then shuffle the batch order.
    Mega-batches keep the data order random across the epoch while rows within a batch have
    close lengths.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    mega = mega_batch_size or 50 * batch_size
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batch sampler over `length_grouped_batches`; call `set_epoch` for a new (seeded) order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 mega_batch_size: int | None = None, drop_last: bool = False):
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.mega_batch_size, self.drop_last = mega_batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        """Different order per epoch, same order for the same (seed, epoch)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.batch_size, self.seed + self.epoch,
                                      self.mega_batch_size, self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def make_dataloader(dataset, pad_token_id: int, batch_size: int, *, seed: int = 0,
                    group_by_length: bool = True, shuffle: bool = True, drop_last: bool = False,
                    num_workers: int = 0) -> DataLoader:
    """DataLoader over tokenized examples with the `Collator` (right padding).

    `group_by_length` uses the `length` column (or the input lengths) for a
    `LengthGroupedBatchSampler`; otherwise a plain (seeded) shuffle or the given order.
    """
    columns = [c for c in ("input_ids", "labels", "class_label") if c in dataset.column_names]
    data = dataset.select_columns(columns) if hasattr(dataset, "select_columns") else dataset
    collate = Collator(pad_token_id)
    if group_by_length:
        lengths = dataset["length"] if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
        sampler = LengthGroupedBatchSampler(list(lengths), batch_size, seed=seed, drop_last=drop_last)
        return DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last,
                      collate_fn=collate, num_workers=num_workers)
