"""`l2d eval` with adaptive solvers and EarlyStop: one adaptive row per run, NFE per token reported."""
import json

import pytest

from l2d.cli import main
from l2d.eval.command import steps_for_solver
from eval_fixture import save_eval_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rows = [{"question": f"{a} + {b}?", "answer": f"#### {a + b}"} for a, b in [(1, 2), (3, 4)]]
    return save_eval_folder(tmp_path_factory.mktemp("eval_solvers"), rows)


def _eval(saved, *extra) -> list[dict]:
    out = saved / "res.json"
    code = main(["eval", str(saved / "adapter"), "--base", str(saved / "base"), "--task", "gsm8k",
                 "--data", str(saved / "gsm8k.jsonl"), "--num-shots", "0", "--max-new-tokens", "3",
                 "--json", str(out), "--no-progress", *extra])
    assert code == 0
    return json.loads(out.read_text())["rows"]


def test_adaptive_steps_replace_every_nonzero_entry():
    assert steps_for_solver([0, 2, 8], "dopri5") == [0, None]
    assert steps_for_solver([4, 8], "bosh3") == [None]
    assert steps_for_solver([0, 2, 8], "euler") == [0, 2, 8]


@pytest.mark.filterwarnings("ignore:.*hit max_nfe")
@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_solver_row_reports_nfe_per_token_under_the_cap(saved, solver, capsys):
    rows = _eval(saved, "--solver", solver, "--steps", "0,8", "--rtol", "0.2", "--atol", "0.2", "--max-nfe", "12")
    assert [r["steps"] for r in rows] == [0, None]
    assert rows[0]["nfe_per_token"] == 0
    assert 1 < rows[1]["nfe_per_token"] <= 13  # the cap, plus the read-out at t=1
    assert rows[1]["solver"] == solver
    table = capsys.readouterr().out
    assert solver in table and "NFE/token" in table


def test_early_stop_cuts_evaluations_per_token(saved):
    full = _eval(saved, "--steps", "16")[0]["nfe_per_token"]
    stopped = _eval(saved, "--steps", "16", "--early-stop", "0.001", "--early-stop-patience", "2")[0]["nfe_per_token"]
    assert full == pytest.approx(17) and stopped < 0.6 * full


def test_bad_solver_names_the_closest(saved, capsys):
    assert main(["eval", str(saved / "adapter"), "--task", "gsm8k", "--solver", "dopri6"]) == 1
    err = capsys.readouterr().err
    assert "unknown solver 'dopri6' (did you mean dopri5?)" in err and "\n" not in err.strip()
