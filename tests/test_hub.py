"""push_to_hub: the right files, a model card with the hub's metadata, and `l2d train --push-to-hub`.

No test reaches a hub: a fake HfApi records what the real code would create and upload.
"""
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import l2d.train
from l2d import L2DModel, get_l2d_model
from l2d.cli import main
from l2d.hub import eval_table, push_folder
from tiny import randomize_path, tiny_base, tiny_config


class FakeApi:
    """Records create_repo and upload_folder; keeps the uploaded files' bytes (the folder is temporary)."""

    def __init__(self, token=None):
        self.token, self.repos, self.uploads = token, [], []

    def create_repo(self, repo_id, **kw):
        self.repos.append((repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.uploads.append({"repo_id": repo_id, "files": files, **kw})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture()
def model():
    base = tiny_base()
    base.config._name_or_path = "org/tiny-llama"
    m = get_l2d_model(base, tiny_config())
    randomize_path(m)
    return m


def _card(upload) -> ModelCard:
    return ModelCard(upload["files"]["README.md"].decode())


def test_push_uploads_the_adapter_files_and_a_card_with_metadata(model, tmp_path):
    api = FakeApi()
    recipe = {"model": {"name_or_path": "org/tiny-llama"}, "method": "l2d", "train": {"lr": 1e-4}}
    model.push_to_hub("me/tiny-l2d", private=True, commit_message="first", recipe=recipe, api=api)
    assert api.repos == [("me/tiny-l2d", {"private": True, "exist_ok": True, "repo_type": "model"})]
    (up,) = api.uploads
    assert up["repo_id"] == "me/tiny-l2d" and up["commit_message"] == "first"
    assert sorted(up["files"]) == ["README.md", "l2d_config.json", "l2d_model.safetensors", "recipe.yaml"]
    assert yaml.safe_load(up["files"]["recipe.yaml"]) == recipe
    card = _card(up)
    assert card.data.base_model == "org/tiny-llama" and card.data.library_name == "l2d"
    assert "l2d" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert 'L2DModel.from_pretrained(base, "me/tiny-l2d")' in card.text
    assert "## Training recipe" in card.text and "lr: 0.0001" in card.text
    n = sum(p.numel() for p in model.path.state_dict().values())
    assert f"{n:,d} trainable parameters" in card.text


def test_uploaded_files_load_back_to_the_same_path(model, tmp_path):
    api = FakeApi()
    model.push_to_hub("me/tiny-l2d", api=api)
    for name, data in api.uploads[0]["files"].items():
        (tmp_path / name).write_bytes(data)
    loaded = L2DModel.from_pretrained(model.base_model, str(tmp_path))
    for (k, a), b in zip(model.path.state_dict().items(), loaded.path.state_dict().values()):
        assert torch.equal(a, b), k


def test_card_holds_the_eval_table_when_known(model):
    rows = [{"method": "l2d", "task": "gsm8k", "steps": 0, "solver": "euler", "n": 10, "accuracy": 0.2,
             "low": 0.05, "high": 0.5, "nfe_per_token": 0.0},
            {"method": "l2d", "task": "gsm8k", "steps": None, "solver": "dopri5", "n": 10, "accuracy": 0.4,
             "low": 0.2, "high": 0.6, "nfe_per_token": 12.5}]
    api = FakeApi()
    model.push_to_hub("me/tiny-l2d", eval_results={"rows": rows}, api=api)
    text = _card(api.uploads[0]).text
    assert "## Evaluation" in text and "| l2d | gsm8k | dopri5 | 10 | 40.0 | [20.0, 60.0] | 12.5 |" in text
    assert "| l2d | gsm8k | 0 | 10 | 20.0 |" in eval_table(rows)
    no_eval = FakeApi()
    model.push_to_hub("me/tiny-l2d", api=no_eval)
    assert "## Evaluation" not in _card(no_eval.uploads[0]).text and "recipe.yaml" not in no_eval.uploads[0]["files"]


def test_push_of_a_peft_baseline_folder(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_base(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    (tmp_path / "recipe.yaml").write_text("method: lora\n")
    (tmp_path / "checkpoints").mkdir()
    api = FakeApi()
    push_folder(tmp_path, "me/tiny-lora", api=api)
    up = api.uploads[0]
    assert sorted(up["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "recipe.yaml"]
    assert _card(up).data.library_name == "peft"


def test_l2d_train_push_to_hub_pushes_the_finished_run(model, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    model.save_pretrained(str(tmp_path / "run"))
    (tmp_path / "run" / "recipe.yaml").write_text("method: l2d\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  sources: [x.jsonl]\n")
    apis = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: apis.append(FakeApi(token)) or apis[-1])
    monkeypatch.setattr(l2d.train, "train", lambda *a, **k: {"output_dir": str(tmp_path / "run"), "stopped": None})
    assert main(["train", str(recipe), "--push-to-hub", "me/run", "--hub-private"]) == 0
    (api,) = apis
    assert api.repos[0][1]["private"] is True
    assert sorted(api.uploads[0]["files"]) == ["README.md", "l2d_config.json", "l2d_model.safetensors", "recipe.yaml"]
    assert "Pushed" in capsys.readouterr().out
