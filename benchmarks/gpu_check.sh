#!/usr/bin/env bash
# The device check for a lent GPU, in one call (<= 8 minutes on one H100 or H200):
#   1. the GPU tests (pytest -m gpu tests/test_gpu.py: graphs against eager at the same buckets for every
#      sampler, no host sync in steady-state steps, graphs kept across generate() calls, GPU vs CPU tokens,
#      bf16 accuracy, the FSDP2 bf16 step);
#   2. benchmarks/gpu_decode.py (the LLaDA-8B-shape scripted schedule at batch 1 and 8, both rooflines,
#      captures while timed, the tiny-model sampler table);
#   3. one JSON, $OUT_DIR/gpu_check.json, with both.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # on the GPU machine, from the repository root
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/check   # here, on a CPU: the same steps, tiny shapes
#
# The GPU image has torch, transformers, tokenizers, safetensors, numpy and pytest, and nothing is fetched
# there: the steps import d3core alone (no Ray, no serve stack). Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/bench}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
start=$(date +%s)

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
    | tee "$OUT_DIR/gpu_env.txt"

timeout 300 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs --junitxml="$OUT_DIR/gpu_tests.xml" \
    2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

if [ -n "${GPU_CHECK_SMOKE:-}" ]; then
    decode_args=(--device cpu --shape tiny --layers 1 --prompt 32 --repeats 1 --copy-gib 0.05 --skip-tiny)
else
    decode_args=()
fi
timeout 300 $PY benchmarks/gpu_decode.py "${decode_args[@]}" --out "$OUT_DIR/gpu_decode.json" 2>&1 \
    | tee "$OUT_DIR/gpu_decode.log"
decode_rc=${PIPESTATUS[0]}

$PY - "$OUT_DIR" "$tests_rc" "$decode_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
out, tests_rc, decode_rc, wall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tests = {"rc": tests_rc}
junit = os.path.join(out, "gpu_tests.xml")
if os.path.exists(junit):
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    tests["failed"] = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None
                       or c.find("error") is not None]
decode = {"rc": decode_rc}
path = os.path.join(out, "gpu_decode.json")
if decode_rc == 0 and os.path.exists(path):
    with open(path) as f:
        decode.update(json.load(f))
with open(os.path.join(out, "gpu_env.txt")) as f:
    env = f.read().strip()
result = {"env": env, "tests": tests, "decode": decode, "wall_s": wall, "ok": tests_rc == 0 and decode_rc == 0}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=2)
print(json.dumps({"ok": result["ok"], "tests": {k: v for k, v in tests.items() if k != "failed"}, "wall_s": wall}))
EOF
[ "$tests_rc" -eq 0 ] && [ "$decode_rc" -eq 0 ]
