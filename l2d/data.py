"""Training examples: load sources, render them with the chat template, tokenize with a loss mask.

Data flow: `load_source` (hub dataset, local jsonl/json/parquet, or a seeded reasoning-gym
generator) -> `tokenize_dataset` (every assistant turn one example; prompt tokens masked with
-100; truncation that keeps the response) -> `l2d.batching` (padding, length-grouped batches).
`build_dataset` does all of it for a list of sources, as the recipes describe them.

Every example carries `input_ids`, `labels` (same length, -100 on prompt tokens), `class_label`
(index into `CATEGORIES`; `len(categories)`, the null class, when the category is unknown),
`length` and `source`.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import datasets

from .config import DEFAULT_CLASSES, IGNORE_INDEX  # noqa: F401  (IGNORE_INDEX: part of this module's API)
from .prompts import render_prompt, require_chat_template  # noqa: F401  (render_prompt: as before)

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = DEFAULT_CLASSES

# Source name (lower-case substring) -> category; first match wins, so specific names come first.
SOURCE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("self-oss-instruct", "code"), ("humaneval", "code"), ("human-eval", "code"), ("mbpp", "code"),
    ("codeio", "code"), ("code", "code"),
    ("metamath", "math"), ("numina", "math"), ("gsm", "math"), ("math", "math"),
    ("arithmetic", "math"), ("chain_sum", "math"),
    ("openhermes", "general"), ("magpie", "general"), ("smoltalk", "general"), ("alpaca", "general"),
)
# reasoning-gym groups its generators by package; these groups are math problems.
_RG_MATH_GROUPS = ("arithmetic", "algebra", "geometry", "probability")
_RG_PREFIXES = ("rg:", "reasoning_gym:", "reasoning-gym:")
# Column pairs that common hub datasets use for prompt/completion, tried in order.
_PAIR_COLUMNS = (("prompt", "completion"), ("question", "answer"), ("query", "response"),
                 ("problem", "solution"), ("instruction", "output"), ("input", "output"))
_KEPT = ("ok", "truncated_prompt", "truncated_response")


def null_class_label(categories: Sequence[str] = CATEGORIES) -> int:
    """Label of the null class (unknown category): the row after the real categories."""
    return len(categories)


def category_of(source: str, mapping: Sequence[tuple[str, str]] = SOURCE_CATEGORIES) -> str | None:
    """Category of a data source from its name (e.g. 'metamathqa-50k' -> 'math'); None if unknown."""
    name = source.lower()
    if name.startswith(_RG_PREFIXES):
        return _rg_category(name.split(":", 1)[1])
    return next((cat for pattern, cat in mapping if pattern in name), None)


def class_label_of(category: str | None, categories: Sequence[str] = CATEGORIES) -> int:
    """Index of `category` in `categories`, or the null class label when it is None/unknown."""
    return list(categories).index(category) if category in categories else null_class_label(categories)


# ----------------------------------------------------------------------------------- sources
@dataclass
class DataSource:
    """One entry of a recipe's data list.

    Args:
        name: hub dataset id, a local .jsonl/.json/.parquet file, or a reasoning-gym generator
            (`rg:chain_sum`, or the bare name when it is not a file).
        subset: hub configuration name (e.g. smoltalk's `metamathqa-50k`).
        split: split to load.
        n: number of examples (generators) or cap on the rows taken (files, hub).
        seed: generator seed.
        category: overrides the category guessed from the name.
        prompt_column / completion_column: column names of prompt/completion data (guessed
            from common names when None).
        messages_column: column holding conversations.
        exclude: rows to drop, `{column: [values]}` (smol-magpie-ultra's categories).
        generator_kwargs: reasoning-gym config fields (e.g. `min_terms`).
        cot: reasoning-gym: use the worked solution as completion when the generator has one.
    """

    name: str
    subset: str | None = None
    split: str = "train"
    n: int | None = None
    seed: int = 0
    category: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    messages_column: str = "messages"
    exclude: dict[str, list] | None = None
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    cot: bool = False


def _as_source(source: DataSource | str | dict) -> DataSource:
    if isinstance(source, DataSource):
        return source
    return DataSource(name=source) if isinstance(source, str) else DataSource(**source)


def _rg_name(name: str) -> str | None:
    """Generator name when `name` designates reasoning-gym, else None."""
    if name.lower().startswith(_RG_PREFIXES):
        return name.split(":", 1)[1]
    if "/" in name or Path(name).exists():
        return None
    try:
        from reasoning_gym.factory import DATASETS  # slow import (~3 s): only for bare names
    except ImportError:
        return None
    return name if name in DATASETS else None


def _rg_category(name: str) -> str:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return "math"
    if name not in DATASETS:
        return "other"
    group = DATASETS[name][0].__module__.split(".")[1]
    return "math" if group in _RG_MATH_GROUPS else "code" if group == "code" else "other"


def reasoning_gym_dataset(name: str, n: int, seed: int = 0, cot: bool = False, **config) -> datasets.Dataset:
    """`n` seeded problems of the reasoning-gym generator `name` as prompt/completion rows.

    Columns: `prompt` (the question), `completion` (the answer, or the worked solution with
    `cot=True` when the generator has one), `answer`, and `entry`: the full reasoning-gym entry
    as JSON, so that evaluation can call the generator's `score_answer(answer, entry)` later.
    """
    import reasoning_gym

    gen = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    rows = []
    for entry in gen:
        completion = entry["answer"]
        if cot and entry.get("metadata", {}).get("answer_cot"):
            completion = entry["metadata"]["answer_cot"]
        # JSON keeps the heterogeneous metadata out of the Arrow schema (tuples become lists).
        rows.append({"prompt": entry["question"], "completion": str(completion),
                     "answer": str(entry["answer"]), "entry": json.dumps(entry, default=str)})
    return datasets.Dataset.from_list(rows)


def load_source(source: DataSource | str | dict) -> datasets.Dataset:
    """Load the raw rows of one source (see `DataSource`); filters `exclude` and caps at `n`."""
    src = _as_source(source)
    rg = _rg_name(src.name)
    if rg is not None:
        if not src.n:
            raise ValueError(f"reasoning-gym source {src.name!r} needs n (how many problems to generate)")
        return reasoning_gym_dataset(rg, src.n, seed=src.seed, cot=src.cot, **src.generator_kwargs)
    path = Path(src.name)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found")
        builder = "parquet" if path.suffix == ".parquet" else "json"
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:  # a hub dataset (or a local dataset folder)
        ds = datasets.load_dataset(src.name, src.subset, split=src.split)
    for column, values in (src.exclude or {}).items():
        drop = set(values)
        ds = ds.filter(lambda col: [v not in drop for v in col], input_columns=column, batched=True)
    if src.n is not None and src.n < len(ds):
        ds = ds.select(range(src.n))
    return ds


# ------------------------------------------------------------------------ rendering + tokens
def _conversation_turns(messages: list[dict], tokenizer) -> list[tuple[str, str] | None]:
    """(prompt text, response text) for every assistant turn; None where the template disagrees.

    The prompt is the conversation up to the turn plus the generation prompt, exactly what the
    model sees at inference; the response is what the template adds for the turn (content and
    end-of-turn tokens), so the model learns to stop.
    """
    turns = []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        if not str(msg.get("content") or "").strip():
            turns.append(("", ""))  # empty turn: dropped as "empty_response"
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property.
        turns.append((prompt, full[len(prompt):]) if full.startswith(prompt) else None)
    return turns


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int):
    """Fit an example in `max_length` tokens, keeping the response; returns (prompt, response, status).

    The prompt loses tokens from the left first. If the response alone does not fit, the last
    prompt token is kept (so the first response token is still predicted) and the response is
    cut at the end.
    """
    p, r = len(prompt_ids), len(response_ids)
    if p + r <= max_length:
        return prompt_ids, response_ids, "ok"
    if r < max_length:
        return prompt_ids[p + r - max_length:], response_ids, "truncated_prompt"
    keep = min(p, 1)
    return prompt_ids[p - keep:], response_ids[: max_length - keep], "truncated_response"


def _pair_columns(columns: Sequence[str], prompt_column, completion_column) -> tuple[str, str]:
    if prompt_column or completion_column:
        pair = (prompt_column or "prompt", completion_column or "completion")
        missing = [c for c in pair if c not in columns]
        if missing:
            raise ValueError(f"columns {missing} not found; the data has {list(columns)}")
        return pair
    for pair in _PAIR_COLUMNS:
        if all(c in columns for c in pair):
            return pair
    raise ValueError(
        f"cannot tell the format of data with columns {list(columns)}: expected a 'messages' column "
        "(conversations) or prompt/completion columns (set prompt_column/completion_column)"
    )


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int = 2048,
    source_name: str = "data",
    category: str | None = None,
    categories: Sequence[str] = CATEGORIES,
    chat_template: bool = True,
    prompt_column: str | None = None,
    completion_column: str | None = None,
    messages_column: str = "messages",
    system_prompt: str | None = None,
    keep_columns: Sequence[str] = ("answer", "entry"),
    vocab_size: int | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Render and tokenize rows into training examples; returns `(examples, report)`.

    Conversations (`messages_column`) give one example per assistant turn, earlier turns as
    prompt. Prompt/completion rows become a user turn + an assistant turn (`system_prompt`
    prepended as a system turn when given), or with `chat_template=False` the raw prompt followed
    by the completion and EOS. Token ids must lie below `vocab_size` (default `len(tokenizer)`).
    `keep_columns` present in the data (reasoning-gym's `answer`/`entry`) are carried along.
    `report` counts examples, truncations and drops by reason; examples with no supervised token
    are dropped, with a warning saying how many.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one prompt token and one response token)")
    if len(dataset) == 0:
        raise ValueError(f"data source {source_name!r} is empty")
    columns = dataset.column_names
    conversations = messages_column in columns
    if conversations or chat_template:
        require_chat_template(tokenizer)
    if not conversations:
        pcol, ccol = _pair_columns(columns, prompt_column, completion_column)
    kept_cols = [c for c in keep_columns if c in columns]
    label = class_label_of(category, categories)
    vocab = vocab_size or len(tokenizer)

    def pairs_of(row: dict) -> list[tuple[str, str] | None]:
        if conversations:
            return _conversation_turns(row[messages_column], tokenizer)
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": str(row[pcol])},
            {"role": "assistant", "content": str(row[ccol] if row[ccol] is not None else "")},
        ]
        if chat_template:
            return _conversation_turns(msgs, tokenizer)
        response = msgs[-1]["content"]
        return [(msgs[-2]["content"], response if response.strip() else "")]

    def encode(batch: dict) -> dict:
        out = {k: [] for k in ("input_ids", "labels", "class_label", "length", "source", "status", *kept_cols)}
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        for row in rows:
            for pair in pairs_of(row):
                ids, labels, status = _encode_pair(tokenizer, pair, chat_template, max_length, vocab, source_name)
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["class_label"].append(label)
                out["length"].append(len(ids))
                out["source"].append(source_name)
                out["status"].append(status)
                for c in kept_cols:
                    out[c].append(row[c])
        return out

    mapped = dataset.map(encode, batched=True, batch_size=256, remove_columns=columns,
                         num_proc=num_proc, desc=f"tokenizing {source_name}")
    report = _report(mapped["status"], source_name, len(dataset))
    kept = mapped.filter(lambda s: [x in _KEPT for x in s], input_columns="status", batched=True)
    return kept.remove_columns("status"), report


def _encode_pair(tokenizer, pair, chat_template: bool, max_length: int, vocab: int, source_name: str):
    """``(input_ids, labels, status)`` of one (prompt text, response text) pair; ``None`` is a turn the
    template did not render as expected."""
    if pair is None:
        return [], [], "template_mismatch"
    if not pair[1]:
        return [], [], "empty_response"
    if chat_template:  # the template already holds BOS/specials
        p = tokenizer(pair[0], add_special_tokens=False)["input_ids"]
        r = tokenizer(pair[1], add_special_tokens=False)["input_ids"]
    else:
        p = tokenizer(pair[0])["input_ids"] if pair[0] else []
        r = tokenizer(pair[1], add_special_tokens=False)["input_ids"]
        r = r + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    p, r, status = truncate(p, r, max_length)
    ids, labels = p + r, [IGNORE_INDEX] * len(p) + r
    # Position 0 predicts nothing (the loss shifts by one), so it does not count.
    if not any(x != IGNORE_INDEX for x in labels[1:]):
        status = "no_supervised_tokens"
    bad = [x for x in ids if not 0 <= x < vocab]
    if bad:
        raise ValueError(f"{source_name!r}: token ids {bad[:5]} outside the vocabulary (size {vocab})")
    return ids, labels, status


def _report(statuses, source_name: str, rows: int) -> dict:
    """Examples, truncations and drops by reason of one source; warns about drops, raises when none is left."""
    counts = Counter(statuses)
    report = {"source": source_name, "rows": rows, "examples": sum(counts[s] for s in _KEPT),
              "truncated": counts["truncated_prompt"] + counts["truncated_response"],
              "dropped": {s: n for s, n in counts.items() if s not in _KEPT}}
    n_dropped = sum(report["dropped"].values())
    if n_dropped:
        warnings.warn(f"{source_name!r}: dropped {n_dropped} of {n_dropped + report['examples']} examples "
                      f"with no supervised tokens ({report['dropped']})", stacklevel=3)
    if report["examples"] == 0:
        raise ValueError(f"data source {source_name!r} has no usable examples "
                         f"({rows} rows; dropped: {report['dropped']})")
    return report


def build_dataset(
    sources: Sequence[DataSource | str | dict],
    tokenizer,
    *,
    max_length: int = 2048,
    categories: Sequence[str] = CATEGORIES,
    chat_template: bool = True,
    system_prompt: str | None = None,
    shuffle_seed: int | None = None,
) -> tuple[datasets.Dataset, list[dict]]:
    """Load, tokenize and concatenate several sources; returns `(examples, reports)`.

    Columns that not every source has (e.g. reasoning-gym's `entry`) are dropped so the parts
    concatenate. `shuffle_seed` shuffles the result deterministically.
    """
    parts, reports = [], []
    for source in sources:
        src = _as_source(source)
        name = src.name if src.subset is None else f"{src.name}/{src.subset}"
        rg = _rg_name(src.name)
        category = src.category or (_rg_category(rg) if rg else category_of(name))
        part, report = tokenize_dataset(
            load_source(src), tokenizer, max_length=max_length, source_name=name, category=category,
            categories=categories, chat_template=chat_template, prompt_column=src.prompt_column,
            completion_column=src.completion_column, messages_column=src.messages_column,
            system_prompt=system_prompt)
        parts.append(part)
        reports.append(report)
        logger.info("%s: %d examples (%d truncated, dropped %s)", name, report["examples"],
                    report["truncated"], report["dropped"])
    if not parts:
        raise ValueError("no data sources given")
    common = set.intersection(*(set(p.column_names) for p in parts))
    parts = [p.remove_columns([c for c in p.column_names if c not in common]) for p in parts]
    out = datasets.concatenate_datasets(parts)
    return (out.shuffle(seed=shuffle_seed) if shuffle_seed is not None else out), reports
