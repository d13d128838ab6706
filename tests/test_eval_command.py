"""`l2d eval` end to end on a tiny saved base and adapter: table, JSON and plot from the command line."""
import json

import pytest

from l2d.cli import main
from eval_fixture import save_eval_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rows = [{"question": f"Tom has {a} apples and buys {b}. How many?", "answer": f"{a}+{b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6)]]
    return save_eval_folder(tmp_path_factory.mktemp("eval_cli"), rows)


def test_l2d_eval_cli_writes_table_json_and_plot(saved, capsys):
    out_json, out_png = saved / "res.json", saved / "steps.png"
    code = main(["eval", str(saved / "adapter"), "--base", str(saved / "base"), "--task", "gsm8k",
                 "--data", str(saved / "gsm8k.jsonl"), "--num-shots", "0", "--steps", "0,2", "--n", "3",
                 "--max-new-tokens", "4", "--batch-size", "2", "--json", str(out_json), "--plot", str(out_png),
                 "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "NFE/token" in table and "l2d" in table
    res = json.loads(out_json.read_text())
    assert [r["steps"] for r in res["rows"]] == [0, 2]
    assert res["rows"][1]["nfe_per_token"] == pytest.approx(3)  # euler, 2 steps + the read-out
    assert len(res["rows"][0]["completions"]) == 3
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_l2d_eval_paper_protocol_samples_with_the_midpoint_solver(saved, capsys):
    """--protocol paper: the midpoint solver by default (2 NFE a step + the read-out), sampled tokens
    (reproducible under --seed), the protocol named in the table and the JSON rows."""
    out_json = saved / "paper.json"
    argv = ["eval", str(saved / "adapter"), "--base", str(saved / "base"), "--task", "gsm8k", "--data",
            str(saved / "gsm8k.jsonl"), "--num-shots", "0", "--steps", "3", "--n", "3", "--max-new-tokens", "4",
            "--protocol", "paper", "--json", str(out_json), "--no-progress"]
    assert main(argv) == 0
    assert "paper" in capsys.readouterr().out
    first = json.loads(out_json.read_text())["rows"][0]
    assert first["protocol"] == "paper" and first["solver"] == "midpoint"
    assert first["nfe_per_token"] == pytest.approx(7)
    assert main(argv) == 0
    again = json.loads(out_json.read_text())["rows"][0]
    assert [c["completions"] for c in again["completions"]] == [c["completions"] for c in first["completions"]]


def test_base_only_rejects_steps(saved, capsys):
    code = main(["eval", "base", "--base", str(saved / "base"), "--task", "gsm8k", "--data",
                 str(saved / "gsm8k.jsonl"), "--steps", "0,4", "--no-progress"])
    assert code != 0 and "only --steps 0" in capsys.readouterr().err


def test_l2d_generate_streams_the_answer_and_reports_nfe(saved, capsys):
    code = main(["generate", str(saved / "adapter"), "--base", str(saved / "base"), "--prompt", "1+2",
                 "--steps", "3", "--solver", "midpoint", "--max-new-tokens", "5"])
    assert code == 0
    captured = capsys.readouterr()
    assert "evaluations of the diffusion path per token" in captured.err
    assert "7.0 evaluations" in captured.err  # midpoint: 2 x 3 steps + the read-out
    code = main(["generate", "base", "--base", str(saved / "base"), "--prompt", "1+2", "--steps", "2"])
    assert code != 0 and "without a diffusion path" in capsys.readouterr().err
