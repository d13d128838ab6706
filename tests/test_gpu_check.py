"""`make gpu-check` on a machine without a GPU fails at once with one clear line; its report writer
turns the sections' files into one JSON and one markdown page."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_report)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="0" tests="3" time="12.5"><testcase classname="tests.test_kernels" name="test_a" time="1"/>
<testcase classname="tests.test_kernels" name="test_b" time="1"><failure message="x">boom</failure></testcase>
<testcase classname="tests.test_kernels" name="test_c" time="1"/></testsuite></testsuites>"""


def test_gpu_check_without_a_gpu_fails_cleanly(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "PY": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no CUDA GPU is visible" in out.stderr
    assert not (tmp_path / "kernel_tests.xml").exists()  # nothing ran


def test_report_writer_gathers_every_section(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"status": "ok", "gpu": "NVIDIA H100", "gpu_count": 1,
                                                   "torch": "2.13", "triton": "3.9", "cuda": "12.8"}))
    (tmp_path / "kernel_tests.xml").write_text(JUNIT)
    (tmp_path / "kernel_speed.txt").write_text("modulated rms norm, 16384x4096: triton 0.41 ms\n")
    (tmp_path / "train_step.json").write_text(json.dumps({"status": "ok", "seconds": 40.0, "rows": [
        {"name": "L2D", "ms": 812.5, "peak MiB": 20480.0}, {"name": "LoRA", "ms": 700.25, "peak MiB": 30000.0}]}))
    (tmp_path / "generate.json").write_text(json.dumps({"status": "ok", "rows": [
        {"setting": "base.generate", "steps": 0, "ms_per_token": 12.0}]}))
    (tmp_path / "device_map.json").write_text(json.dumps({"status": "skipped", "reason": "1 GPU visible"}))
    (tmp_path / "gpu_check.log").write_text("")
    assert gpu_report.main(["write", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["kernel_tests"]["status"] == "failed"
    assert report["kernel_tests"]["failed"] == ["tests.test_kernels::test_b"]
    assert report["train_step"]["status"] == "ok" and report["device_map"]["status"] == "skipped"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100" in md and "| L2D | 812.5 | 2.048e+04 |" in md
    assert "| kernel_tests | failed | " in md and "- tests.test_kernels::test_b" in md
    assert "triton 0.41 ms" in md


def test_a_section_without_output_is_reported_failed_with_its_log(tmp_path):
    (tmp_path / "generate.log").write_text("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory\n")
    report = gpu_report.gather(tmp_path)
    assert report["generate"]["status"] == "failed" and "OutOfMemoryError" in report["generate"]["log_tail"]
    assert "## Generation by steps: failed" in gpu_report.render_markdown(report)
    assert gpu_report.markdown_table([{"a": 1.23456, "b": None}]) == "| a | b |\n|---|---|\n| 1.235 |  |"
