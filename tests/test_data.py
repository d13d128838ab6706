"""Data: rendering, loss masks, truncation, drops, sources and classes, reasoning-gym."""
import json
import warnings

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from l2d.batching import Collator
from l2d.data import (
    CATEGORIES,
    IGNORE_INDEX,
    DataSource,
    build_dataset,
    category_of,
    class_label_of,
    load_source,
    null_class_label,
    reasoning_gym_dataset,
    render_prompt,
    tokenize_dataset,
    truncate,
)

WORDS = "hi hello what is two plus three four five six seven a b c d e f g h yes no ok the answer".split()
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tiny_tokenizer(chat_template=TEMPLATE, extra=None):
    """Word-level tokenizer with a Jinja chat template: one token per word, so masks are easy to read."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    vocab.update(extra or {})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture
def tok():
    return make_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised(example):
    return [x for x in example["labels"] if x != IGNORE_INDEX]


# ------------------------------------------------------------------------ masks and turns
def test_prompt_tokens_masked_response_tokens_supervised(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "what is two plus three", "completion": "five"},
                                                  {"prompt": "hi", "completion": "hello the answer is yes"}])
    ex, report = tokenize_dataset(load_source(path), tok, source_name="pairs")
    assert report["examples"] == 2 and report["dropped"] == {}
    for e, (p, c) in zip(ex, [("what is two plus three", "five"), ("hi", "hello the answer is yes")]):
        prompt = ids(tok, tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True))
        assert e["input_ids"][: len(prompt)] == prompt
        assert e["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        # Every response token, end-of-turn included, is supervised with its own id.
        assert e["labels"][len(prompt):] == e["input_ids"][len(prompt):] == ids(tok, c + " </s>")
        assert len(e["labels"]) == len(e["input_ids"]) == e["length"]
        # Inference renders the prompt exactly as training did.
        assert ids(tok, render_prompt(tok, p)) == prompt


def test_raw_concatenation_without_chat_template(tmp_path):
    tok = make_tiny_tokenizer(chat_template=None)
    path = write_jsonl(tmp_path / "raw.jsonl", [{"q": "two plus two", "a": "four"}])
    ex, _ = tokenize_dataset(load_source(path), tok, chat_template=False, prompt_column="q", completion_column="a")
    assert ex[0]["input_ids"] == ids(tok, "two plus two four") + [tok.eos_token_id]
    assert supervised(ex[0]) == ids(tok, "four") + [tok.eos_token_id]


def test_every_assistant_turn_is_one_example(tok, tmp_path):
    conv = [{"role": "system", "content": "ok"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "two plus two"},
            {"role": "assistant", "content": "four"}, {"role": "user", "content": "yes"},
            {"role": "assistant", "content": "the answer is four"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    ex, report = tokenize_dataset(load_source(path), tok, source_name="chat")
    assert len(ex) == report["examples"] == 3
    replies = ["hello", "four", "the answer is four"]
    for k, e in enumerate(ex):
        assert supervised(e) == ids(tok, replies[k] + " </s>")
        # The prompt is the whole conversation before the turn (earlier replies unsupervised).
        n_prompt = e["labels"].index(next(x for x in e["labels"] if x != IGNORE_INDEX))
        assert tok.decode(e["input_ids"][:n_prompt]).split()[-1] == "<|assistant|>"
        if k:
            assert e["input_ids"][: ex[k - 1]["length"]] == ex[k - 1]["input_ids"]


# ------------------------------------------------------------------------------ truncation
def test_truncate_cuts_prompt_from_left_then_response_end():
    p, r = list(range(10)), [100, 101, 102]
    assert truncate(p, r, 20) == (p, r, "ok")
    assert truncate(p, r, 8) == ([5, 6, 7, 8, 9], r, "truncated_prompt")
    # Response alone too long: keep the last prompt token (it predicts the first reply token).
    assert truncate(p, [100, 101, 102, 103, 104], 4) == ([9], [100, 101, 102], "truncated_response")


def test_truncation_keeps_the_response(tok, tmp_path):
    long_prompt = " ".join(["a b c d e f g h"] * 10)
    rows = [{"prompt": long_prompt, "completion": "the answer is five"},
            {"prompt": "hi", "completion": " ".join(["yes no"] * 20)}]
    ex, report = tokenize_dataset(load_source(write_jsonl(tmp_path / "long.jsonl", rows)), tok, max_length=16)
    assert report["truncated"] == 2 and report["examples"] == 2
    assert all(e["length"] <= 16 for e in ex)
    # Long prompt: the whole response survives, the prompt keeps its end (the generation prompt).
    assert supervised(ex[0]) == ids(tok, "the answer is five </s>")
    assert tok.decode(ex[0]["input_ids"][: 16 - 5]).split()[-1] == "<|assistant|>"
    # Long response: its start survives; every position after the first is supervised.
    assert ex[1]["labels"][0] == IGNORE_INDEX and all(x != IGNORE_INDEX for x in ex[1]["labels"][1:])
    assert supervised(ex[1]) == ids(tok, " ".join(["yes no"] * 20))[:15]


# ------------------------------------------------------------------------- drops and errors
def test_examples_without_supervised_tokens_are_dropped_and_counted(tok, tmp_path):
    rows = [{"prompt": "hi", "completion": "hello"}, {"prompt": "hi", "completion": ""},
            {"prompt": "hi", "completion": "   "}, {"prompt": "two", "completion": "four"}]
    with pytest.warns(UserWarning, match="dropped 2 of 4"):
        ex, report = tokenize_dataset(load_source(write_jsonl(tmp_path / "d.jsonl", rows)), tok, source_name="d")
    assert len(ex) == report["examples"] == 2
    assert report["dropped"] == {"empty_response": 2}
    assert all(supervised(e) for e in ex)


def test_no_usable_examples_raises_naming_the_source(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="my-empty-source.*no usable examples"):
            tokenize_dataset(load_source(write_jsonl(tmp_path / "e.jsonl", rows)), tok, source_name="my-empty-source")
    with pytest.raises(ValueError, match="'nothing' is empty"):
        tokenize_dataset(datasets.Dataset.from_dict({"prompt": [], "completion": []}), tok, source_name="nothing")


def test_missing_chat_template_raises_with_a_fix(tmp_path):
    tok = make_tiny_tokenizer(chat_template=None)
    pairs = load_source(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "completion": "hello"}]))
    with pytest.raises(ValueError, match="no chat template.*chat_template=False"):
        tokenize_dataset(pairs, tok)
    conv = load_source(write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                         {"role": "assistant", "content": "ok"}]}]))
    with pytest.raises(ValueError, match="no chat template"):  # conversations always need one
        tokenize_dataset(conv, tok, chat_template=False)


def test_unknown_columns_raise(tok):
    data = datasets.Dataset.from_dict({"foo": ["x"], "bar": ["y"]})
    with pytest.raises(ValueError, match="cannot tell the format.*foo"):
        tokenize_dataset(data, tok)


def test_token_ids_outside_the_vocabulary_raise(tmp_path):
    # A sparse vocabulary: id 500 exists in the model but the tokenizer's size is far smaller.
    tok = make_tiny_tokenizer(extra={"seven": 500})
    data = datasets.Dataset.from_dict({"prompt": ["hi"], "completion": ["seven"]})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenize_dataset(data, tok)
    # A model vocabulary smaller than the tokenizer's is checked too.
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenize_dataset(datasets.Dataset.from_dict({"prompt": ["hi"], "completion": ["ok"]}), tok, vocab_size=10)


# ----------------------------------------------------------------- sources and categories
def test_local_sources_columns_exclude_and_cap(tok, tmp_path):
    rows = [{"question": f"what is {w}", "answer": w, "kind": k} for w, k in
            [("two", "keep"), ("three", "skip"), ("four", "keep"), ("five", "keep")]]
    jsonl = write_jsonl(tmp_path / "q.jsonl", rows)
    (tmp_path / "q.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "q.parquet"))
    for name in (jsonl, str(tmp_path / "q.json"), str(tmp_path / "q.parquet")):
        ds = load_source(DataSource(name=name, exclude={"kind": ["skip"]}, n=2))
        assert ds["answer"] == ["two", "four"]
    # question/answer columns are recognised without configuration.
    ex, _ = tokenize_dataset(load_source(jsonl), tok)
    assert [tok.decode(supervised(e)).split()[0] for e in ex] == ["two", "three", "four", "five"]
    with pytest.raises(FileNotFoundError):
        load_source(str(tmp_path / "missing.jsonl"))


def test_categories_and_class_labels():
    assert CATEGORIES == ("math", "code", "general", "other")
    assert category_of("HuggingFaceTB/smoltalk/metamathqa-50k") == "math"
    assert category_of("HuggingFaceTB/smoltalk/self-oss-instruct") == "code"
    assert category_of("smoltalk/openhermes-100k") == "general"
    assert category_of("rg:basic_arithmetic") == "math"
    assert category_of("some/unknown-set") is None
    assert class_label_of("code") == 1
    assert class_label_of(None) == class_label_of("nope") == null_class_label() == len(CATEGORIES)
    assert class_label_of("b", categories=("a", "b")) == 1


def test_build_dataset_concatenates_with_class_labels(tok, tmp_path):
    code = write_jsonl(tmp_path / "mbpp_like.jsonl", [{"prompt": "hi", "completion": "a b"}])
    misc = write_jsonl(tmp_path / "misc.jsonl", [{"prompt": "hi", "completion": "ok"}] * 2)
    ds, reports = build_dataset([code, {"name": misc, "category": "general"}, misc], tok, shuffle_seed=0)
    assert len(ds) == 5 and [r["examples"] for r in reports] == [1, 2, 2]
    labels = sorted(ds["class_label"])
    assert labels == [1, 2, 2, null_class_label(), null_class_label()]


# ------------------------------------------------------------------------- reasoning-gym
def test_reasoning_gym_generation_is_seeded():
    a = reasoning_gym_dataset("basic_arithmetic", 8, seed=5)
    b = reasoning_gym_dataset("basic_arithmetic", 8, seed=5)
    c = reasoning_gym_dataset("basic_arithmetic", 8, seed=6)
    assert a.to_list() == b.to_list()
    assert a["prompt"] != c["prompt"]
    assert len(set(a["prompt"])) > 1
    # The stored entry scores its own answer with the generator's scorer.
    import reasoning_gym

    score = reasoning_gym.get_score_answer_fn("basic_arithmetic")
    for row in a:
        entry = json.loads(row["entry"])
        assert entry["question"] == row["prompt"] and entry["answer"] == row["answer"] == row["completion"]
        assert score(row["answer"], entry) == 1.0


def test_reasoning_gym_source_tokenizes_as_math(tok):
    ds, reports = build_dataset([DataSource(name="rg:chain_sum", n=6, seed=1)], tok)
    assert len(ds) == 6 and set(ds["class_label"]) == {CATEGORIES.index("math")}
    assert {"answer", "entry"} <= set(ds.column_names)
    with pytest.raises(ValueError, match="needs n"):
        load_source("rg:chain_sum")


# -------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from l2d.pretrained import load_smollm2_tokenizer

    return load_smollm2_tokenizer()  # builds the default cache once, then reads it quickly


@pytest.mark.smollm2
def test_smollm2_chat_turns_supervise_reply_and_end_of_turn(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}]
    ex, _ = tokenize_dataset(load_source(write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])), tok,
                             source_name="gsm8k-chat")
    assert len(ex) == 2
    assert [tok.decode(supervised(e)) for e in ex] == ["4<|im_end|>\n", "It is 6.<|im_end|>\n"]
    prompt = tok.apply_chat_template(conv[:3], tokenize=False, add_generation_prompt=True)
    assert tok.decode([t for t, l in zip(ex[1]["input_ids"], ex[1]["labels"]) if l == IGNORE_INDEX]) == prompt
    assert max(max(e["input_ids"]) for e in ex) < len(tok)
    batch = Collator(tok.pad_token_id)([ex[0], ex[1]])
    assert batch["input_ids"].shape == (2, ex[1]["length"])
