"""The [MASK] token: reuse an existing id or add a row to the embedding table (and the head).

    config.mask_token_id set          -> that id (must be a row of the table)
    tokenizer has a mask token        -> its id
    tokenizer given, no mask token    -> add config.mask_token to it; grow the table if it has no spare row
    no tokenizer                      -> a new row at the end of the table

``resize_token_embeddings`` grows the output head with the input table and keeps tied embeddings
tied; transformers initialises the new rows at the mean of the old ones, so the new token starts
as an "average" input and the head gives it an average score (generation never commits it anyway).
"""
from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def embedding_rows(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def resolve_mask_token(model: nn.Module, config, tokenizer=None) -> int:
    """The [MASK] id for ``model`` (growing its embeddings when a token is added)."""
    rows = embedding_rows(model)
    if config.mask_token_id is not None:
        if config.mask_token_id >= rows:
            raise ValueError(f"mask_token_id {config.mask_token_id} is not a row of the embedding table "
                             f"({rows} rows); pick an existing id or leave it null to add a token.")
        return int(config.mask_token_id)
    if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        mask_id = int(tokenizer.mask_token_id)
        if mask_id >= rows:
            _grow(model, mask_id + 1)
        return mask_id
    if tokenizer is not None:
        tokenizer.add_special_tokens({"mask_token": config.mask_token})
        mask_id = int(tokenizer.mask_token_id)
        if mask_id >= rows:
            _grow(model, mask_id + 1)
        logger.info("added the [MASK] token %r as id %d", config.mask_token, mask_id)
        return mask_id
    _grow(model, rows + 1)
    logger.info("no tokenizer given: [MASK] is a new embedding row, id %d", rows)
    return rows


def _grow(model: nn.Module, rows: int) -> None:
    model.resize_token_embeddings(rows)
    # keep the config's vocabulary in step, so a saved folder loads with the new size
    model.config.vocab_size = rows
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().vocab_size = rows
