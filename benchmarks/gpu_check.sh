#!/usr/bin/env bash
# `make gpu-check`: everything worth knowing from a few minutes on one GPU, with no network.
#
#   bash benchmarks/gpu_check.sh            # writes runs/gpu_check/{gpu_check.json, gpu_check.md, *.log}
#   OUT=/tmp/gc PY=python bash benchmarks/gpu_check.sh
#
# Sections, each under its own time limit (about 8 minutes in all on one H100):
#   kernel_tests  tests/test_kernels.py on the GPU, Triton compiled (not the CPU interpreter)
#   kernel_speed  fused modulated RMSNorm / LayerNorm, forward+backward, 16384 x 4096 bf16, against eager
#                 torch and torch.compile, bandwidth against a device-to-device copy
#   train_step    one bf16 training step, L2D vs LoRA, on a random-init Llama-3.2-1B-shaped base
#   generate      ms per token of base.generate and of the path at steps 0, 1, 4, 16
#   device_map    with more than one GPU: the base's layers spread over them, loss and tokens as on one
# A section that fails or runs out of time is reported as such; the others still run.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.xml "$OUT"/*.txt "$OUT"/*.md
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" benchmarks/gpu_report.py env --out "$OUT" > "$OUT/env.log" 2>&1; then
    echo "gpu-check: no CUDA GPU is visible here (torch.cuda.is_available() is False); run it on a machine" \
         "with one. Nothing was run." >&2
    exit 2
fi
cat "$OUT/env.json"

section() {  # section NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, never abort
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    [ $rc -eq 124 ] && echo "$name: stopped after ${limit} s" | tee -a "$OUT/$name.log"
    return $rc
}

section kernel_tests 120 env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    --junitxml="$OUT/kernel_tests.xml"
section kernel_speed 120 "$PY" benchmarks/kernel_speed.py --shapes 16384x4096 --kinds rms layer \
    && grep -v "Warning\|warn" "$OUT/kernel_speed.log" > "$OUT/kernel_speed.txt"
section train_step 100 "$PY" benchmarks/gpu_report.py train-step --out "$OUT"
section generate 70 "$PY" benchmarks/gpu_report.py generate --out "$OUT"
section device_map 50 "$PY" benchmarks/gpu_report.py device-map --out "$OUT"

"$PY" benchmarks/gpu_report.py write --out "$OUT"
"$PY" - "$OUT/gpu_check.json" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
bad = [k for k, v in report.items() if v.get("status") not in ("ok", "skipped")]
print("gpu-check: " + ("every section passed" if not bad else "failed: " + ", ".join(bad)))
sys.exit(1 if bad else 0)
PYEOF
