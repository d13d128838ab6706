"""Every `l2d` error is one line that says what was wrong and what to do, never a traceback."""
import json

import pytest

from l2d import L2DConfig, L2DModel, get_l2d_model
from l2d.cli import error_line, main
from tiny import tiny_base, tiny_config


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return err


@pytest.fixture()
def adapter(tmp_path):
    model = get_l2d_model(tiny_base(), tiny_config())
    model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_unknown_task_names_the_closest_one_before_loading_anything(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), "--task", "gsm9k"]) == 1
    err = _one_line_error(capsys)
    assert "unknown task 'gsm9k' (did you mean gsm8k?)" in err and "--task" in err


def test_corrupt_adapter_config_names_the_file(adapter, capsys):
    cfg = adapter / "l2d_config.json"
    cfg.write_text('{"sigma": 64.0\n"rank": 4}\n')
    data = adapter.parent / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert main(["eval", str(adapter), "--task", "gsm8k", "--data", str(data)]) == 1
    err = _one_line_error(capsys)
    assert str(cfg) in err and "corrupt" in err
    with pytest.raises(ValueError, match="l2d_config.json"):
        L2DModel.from_pretrained(tiny_base(), str(adapter))
    with pytest.raises(ValueError, match="l2d_config.json"):
        L2DConfig.load(str(adapter))


def test_unknown_recipe_key_suggests_the_closest(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  sources: [x.jsonl]\n")
    assert main(["train", str(path), "--set", "l2d.sigmaa=16"]) == 1
    assert "unknown key l2d.sigmaa (did you mean sigma?)" in _one_line_error(capsys)
    assert main(["train", str(path), "--set", "trian.lr=1e-4"]) == 1
    assert "(did you mean train?)" in _one_line_error(capsys)


def test_missing_adapter_and_bad_dtype_are_one_line(adapter, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), "--task", "gsm8k"]) == 1
    assert "holds no l2d_config.json" in _one_line_error(capsys)
    assert main(["generate", str(adapter), "--prompt", "hi", "--dtype", "float8"]) == 1
    assert "unknown dtype 'float8'" in _one_line_error(capsys)


def test_unexpected_errors_are_one_line_with_a_pointer_to_the_traceback():
    line = error_line(RuntimeError("boom\nsecond line"))
    assert line == "RuntimeError: boom second line (unexpected; rerun with -v for the traceback and report it)"
    assert error_line(KeyError("no such key")) == "no such key"  # not the repr with quotes
    assert "pip install foo" in error_line(ModuleNotFoundError("No module named 'foo'", name="foo"))
