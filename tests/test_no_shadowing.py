"""Nothing in the checkout shadows an installed package when the repository root is on sys.path.

``python -m pytest``, ``python -m l2d.demo`` and ``python -c`` put the current folder first on
``sys.path``. transformers (5.25 and newer) imports Hugging Face's ``kernels`` package when a model
module loads, so a top-level ``kernels`` package or module of ours found there first would break
every model import. Checked in a fresh interpreter started from the root, as a user would.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path
root = Path.cwd().resolve()
assert sys.path[0] in ("", str(root)), sys.path[:2]
report = {"kernels": None, "families": []}
spec = importlib.util.find_spec("kernels")
if spec is not None:
    import kernels
    origin = Path(kernels.__file__).resolve() if getattr(kernels, "__file__", None) else None
    report["kernels"] = str(origin)
import l2d_kernels
report["l2d_kernels"] = str(Path(l2d_kernels.__file__).resolve())
sys.path.append(str(root / "tests"))      # appended: the root stays first
import torch
from tiny import FAMILIES, tiny_base
for family in sorted(FAMILIES):
    base = tiny_base(family)
    with torch.no_grad():
        logits = base(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all(), family
    report["families"].append(family)
print(json.dumps(report))
"""


def test_repository_root_first_on_sys_path_shadows_nothing():
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    if report["kernels"] is not None:    # Hugging Face's package, installed with transformers >= 5.25
        import importlib.metadata as md

        installed = Path(md.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
        assert Path(report["kernels"]) == installed, f"{report['kernels']} shadows {installed}"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a plain folder"
    from tiny import FAMILIES
    assert report["families"] == sorted(FAMILIES)


def test_no_top_level_module_of_the_checkout_takes_an_installed_name():
    """Scripts run as ``python benchmarks/x.py`` put their folder first: no file there may be named
    after an installed top-level package either (``benchmarks/kernels.py`` once was)."""
    import importlib.metadata as md

    installed = {name for dist in md.distributions()
                 for name in (dist.read_text("top_level.txt") or "").split()}
    installed |= {"kernels", "transformers", "torch", "triton", "peft", "accelerate", "datasets"}
    for folder in (ROOT, ROOT / "benchmarks", ROOT / "tests", ROOT / "recipes"):
        for entry in folder.iterdir():
            name = entry.stem if entry.suffix == ".py" else entry.name
            importable = entry.suffix == ".py" or (entry / "__init__.py").exists()
            if importable and name != "l2d":
                assert name not in installed, f"{entry.relative_to(ROOT)} shadows the installed {name!r}"
