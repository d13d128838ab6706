"""Every `python -m ...` the README, the docs and the Makefile tell users to run is a real entry
point: ``--help`` prints a usage line. (A module that lost its ``__main__`` block exits 0 and
does nothing, which is how `make demo` once ran no demo at all.)"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]


def documented_modules() -> list[str]:
    found = set()
    for path in DOCUMENTED:
        found.update(re.findall(r"python -m (l2d[\w.]*)", path.read_text()))
    return sorted(found)


def test_the_docs_name_the_demo_entry_points():
    # The scan itself must find what `make demo` and the README run, or the test below checks nothing.
    assert {"l2d.demo", "l2d.mdm.demo"} <= set(documented_modules())


@pytest.mark.parametrize("module", documented_modules())
def test_documented_module_prints_usage(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout, f"`python -m {module} --help` printed no usage: {run.stdout[:300]!r}"
