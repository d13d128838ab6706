"""The `l2d` command: help documents every recipe key and option, errors are one clear line."""
import subprocess
import sys

import pytest

from l2d.cli import COMMANDS, build_parser, main
from l2d.recipe import describe


def test_train_help_documents_every_option_and_recipe_key(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--set", "--resume", "--stop-after", "--overwrite"):
        assert option in text
    keys = [k for k, _, _ in describe()]
    assert "train.lr" in keys and "l2d.sigma" in keys and "data.sources" in keys
    missing = [k for k in keys if k not in text]
    assert not missing, f"keys missing from `l2d train --help`: {missing}"
    assert all(h for _, _, h in describe()), "every recipe field has a help text"


def test_every_command_is_registered_by_one_function():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == ["train", "generate", "eval", "bench"] and len(COMMANDS) == 4


def test_bad_recipe_is_one_line_naming_the_key(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  sources: [x.jsonl]\ntrain:\n  lr: fast\n")
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert "train.lr: expected float" in err and "Traceback" not in err
    assert main(["train", str(path), "--set", "train.lr=1e-4", "--set", "train.bogus=1"]) == 1
    assert "unknown key train.bogus" in capsys.readouterr().err


def test_python_dash_m_l2d_runs():
    out = subprocess.run([sys.executable, "-m", "l2d", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout
