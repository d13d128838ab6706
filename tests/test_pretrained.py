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


@pytest.mark.smollm2
@pytest.mark.slow
def test_stale_cache_is_rebuilt(tmp_path):
    """A cache whose stamp does not match the installed gguf is not trusted."""
    cache = tmp_path / "smollm2"
    cache.mkdir()
    (cache / "l2d_source.json").write_text(json.dumps({"gguf": "other", "size": 1}))
    model, tok = load_smollm2(cache_dir=cache)
    assert (cache / "model.safetensors").is_file()
    assert json.loads((cache / "l2d_source.json").read_text())["gguf"] == pretrained.SMOLLM2_GGUF_FILE
