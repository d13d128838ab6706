"""Offline loading of SmolLM2-135M-Instruct: the gguf is dequantized once, then read from a cache."""
import json

import pytest
import torch

from l2d import pretrained
from l2d.pretrained import load_base, load_smollm2, smollm2_cache_dir


def test_cache_dir_resolution(monkeypatch, tmp_path):
    """An explicit folder wins over $L2D_CACHE, which wins over the home default."""
    monkeypatch.setenv("L2D_CACHE", str(tmp_path / "env"))
    assert smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert smollm2_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("L2D_CACHE")
    assert smollm2_cache_dir().parts[-3:] == (".cache", "l2d", "smollm2-135m-instruct")


def test_unknown_local_path_raises(tmp_path):
    """A non-special name goes through from_pretrained and fails loudly when nothing is there."""
    with pytest.raises(OSError):
        load_base(str(tmp_path / "no-such-model"))


@pytest.mark.smollm2
@pytest.mark.slow
def test_second_load_comes_from_cache_with_identical_logits(tmp_path, monkeypatch):
    cache = tmp_path / "smollm2"
    model1, tok1 = load_smollm2(cache_dir=cache)
    assert not model1.training
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    # No temporary folder is left beside the cache.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]

    # The second load must not dequantize again.
    def fail(*a, **k):
        raise AssertionError("second load dequantized the gguf instead of reading the cache")

    monkeypatch.setattr(pretrained, "_load_from_gguf", fail)
    model2, tok2 = load_smollm2(cache_dir=cache)
    assert not model2.training
    assert tok2.pad_token_id is not None and tok2.chat_template == tok1.chat_template

    ids = torch.tensor([tok1("The capital of France is")["input_ids"]])
    assert ids.tolist() == [tok2("The capital of France is")["input_ids"]]
    with torch.no_grad():
        torch.testing.assert_close(model1(ids).logits, model2(ids).logits, rtol=0, atol=0)

    # The special name in the general loader reads the same cache, in the requested dtype.
    model3, _ = load_base("smollm2-135m-instruct", dtype=torch.bfloat16, cache_dir=cache)
    assert model3.dtype == torch.bfloat16


def _tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="a")
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg), tok


def test_cache_is_built_once_and_stale_caches_are_rebuilt(tmp_path, monkeypatch):
    """The gguf is dequantized only when the cache is missing or stamped for another file."""
    calls = []

    def fake_gguf(path):
        calls.append(path)
        return _tiny_model_and_tokenizer()

    monkeypatch.setattr(pretrained, "_load_from_gguf", fake_gguf)
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "l2d_source.json").write_text(json.dumps({"gguf": "other", "size": 1}))  # stale
    model1, tok1 = load_smollm2(cache_dir=cache)
    assert len(calls) == 1 and not model1.training and tok1.pad_token == tok1.eos_token
    stamp = json.loads((cache / "l2d_source.json").read_text())
    assert stamp["gguf"] == pretrained.SMOLLM2_GGUF_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left over
    model2, _ = load_smollm2(cache_dir=cache)
    assert len(calls) == 1  # read from the cache
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model1(ids).logits, model2(ids).logits, rtol=0, atol=0)


def test_hub_id_falls_back_to_the_packaged_copy_offline(monkeypatch):
    """Offline, with nothing in the HF cache, the SmolLM2 hub id loads the gguf copy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "_in_hub_cache", lambda repo: False)
    monkeypatch.setattr(pretrained, "load_smollm2", lambda dtype, cache_dir: ("gguf-model", dtype))
    assert load_base("HuggingFaceTB/SmolLM2-135M-Instruct", dtype=torch.float16) == ("gguf-model", torch.float16)
    assert load_base("SmolLM2-135M-Instruct") == ("gguf-model", torch.float32)
