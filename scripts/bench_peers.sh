#!/usr/bin/env bash
# Virtual environments for the peer frameworks that `sftlab-bench --peers` runs beside sftlab (docs/peers.md):
# one per peer, pinned, OUTSIDE the project's .venv (a peer's dependency pins must not move sftlab's), in
# $SFTLAB_PEERS_DIR (default .peers/ in the checkout, git-ignored).
#
#   scripts/bench_peers.sh                      # all peers                     (make bench-peers)
#   scripts/bench_peers.sh litgpt torchtune     # some of them
#
# Idempotent: a venv whose stamp (.installed, holding the requirement line it was built from) matches is left
# alone; a changed pin or a failed install is redone. A peer that does not install leaves install-error.txt in
# its directory (the installer's last lines) and the others go on; the bench reports that file's last line as
# the peer's reason. Exit status: 0 when every requested peer is installed.
#
# torch: the version installed in the project's venv ($PYTHON, default .venv/bin/python), CPU build. uv does not
# read pip's configuration, so pip's PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL (where a CPU torch lies) are handed
# to it, and the PyTorch CPU index is added when it answers. Without a CPU build at hand, PyPI's torch is a
# multi-GB CUDA build: uv's cache then downloads it once for all four venvs.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PEERS_DIR=${SFTLAB_PEERS_DIR:-$ROOT/.peers}
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3)
TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null) || TORCH=2.13.0
BASE_PY=$("$PYTHON" -c 'import sys; print(sys.executable)')

# name -> requirements (the pins of issue 21; torchtune's torchao is the release of torchtune's month).
declare -A SPECS=(
  [llamafactory]="llamafactory==0.9.5"
  [torchtune]="torchtune==0.6.1 torchao==0.10.0"
  [litgpt]="litgpt[extra]==0.5.13"
  [axolotl]="axolotl==0.21.0"
)
# Peers whose release needs a newer Python than the project's: the first such interpreter found on PATH (or
# pyenv's). Its torch is PyPI's (the CPU file on disk, if any, is for the project's Python).
declare -A NEEDS_PYTHON=([axolotl]=3.12)
find_python() {  # version -> an interpreter of that version, or nothing
  local v=$1 cand
  for cand in "$(command -v "python$v" || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v"; do
    # A pyenv shim is on PATH for every version it knows, but runs only the selected one: try it.
    [[ -n $cand && -x $cand ]] && "$cand" -c '' 2>/dev/null && { echo "$cand"; return; }
  done
}
PEERS=("$@")
((${#PEERS[@]})) || PEERS=(llamafactory torchtune litgpt axolotl)

mkdir -p "$PEERS_DIR"
UV=$(command -v uv || true)
if [[ -z $UV ]]; then
  UV=$PEERS_DIR/.uv/bin/uv
  if [[ ! -x $UV ]]; then
    "$BASE_PY" -m venv "$PEERS_DIR/.uv" && "$PEERS_DIR/.uv/bin/python" -m pip install -q "uv==0.13.8" || {
      echo "bench-peers: could not install uv into $PEERS_DIR/.uv" >&2
      exit 2
    }
  fi
fi
SOURCES=()
for link in ${PIP_FIND_LINKS:-}; do SOURCES+=(--find-links "$link"); done
for index in ${PIP_EXTRA_INDEX_URL:-}; do SOURCES+=(--extra-index-url "$index"); done
CPU_INDEX=https://download.pytorch.org/whl/cpu
if curl -s -o /dev/null --max-time 10 "$CPU_INDEX/"; then
  SOURCES+=(--extra-index-url "$CPU_INDEX" --index-strategy unsafe-best-match)
fi

failed=0
for name in "${PEERS[@]}"; do
  spec=${SPECS[$name]:-}
  if [[ -z $spec ]]; then
    echo "bench-peers: unknown peer '$name' (known: ${!SPECS[*]})" >&2
    failed=1
    continue
  fi
  dir=$PEERS_DIR/$name
  want="$spec torch==$TORCH"
  py=$BASE_PY
  if [[ -n ${NEEDS_PYTHON[$name]:-} ]]; then
    py=$(find_python "${NEEDS_PYTHON[$name]}")
    if [[ -z $py ]]; then
      mkdir -p "$dir"
      echo "$name $spec requires Python >= ${NEEDS_PYTHON[$name]}; none found (python${NEEDS_PYTHON[$name]} on PATH or in pyenv)" |
        tee "$dir/install-error.txt" >&2
      failed=1
      continue
    fi
    want="$spec torch==$TORCH python=${NEEDS_PYTHON[$name]}"
  fi
  if [[ -f $dir/.installed && $(cat "$dir/.installed") == "$want" ]]; then
    echo "bench-peers: $name up to date ($dir)"
    continue
  fi
  echo "bench-peers: $name <- $want"
  mkdir -p "$dir"
  rm -f "$dir/.installed" "$dir/install-error.txt"
  # shellcheck disable=SC2086
  if "$UV" venv -q --allow-existing --python "$py" "$dir" &&
    "$UV" pip install --python "$dir/bin/python" "${SOURCES[@]}" $spec "torch==$TORCH" >"$dir/install.log" 2>&1; then
    # PyPI's torchvision / torchaudio wheels are built against PyPI's (CUDA) torch: beside a CPU torch their
    # import fails ("operator torchvision::nms does not exist") and takes transformers' imports down with it.
    # Nothing these recipes run needs them, so one that does not import is removed.
    # LLaMA-Factory imports torchaudio at start-up (for audio inputs these recipes do not have), and there
    # is no torchaudio release for torch 2.13: its compiled ops (lib/*.so) are taken out, and torchaudio
    # imports in the pure-Python mode it has for builds without them (_IS_TORCHAUDIO_EXT_AVAILABLE=False).
    ta=$("$dir/bin/python" -c "import importlib.util as u; s=u.find_spec('torchaudio'); print(s.submodule_search_locations[0] if s else '')" 2>/dev/null)
    if [[ -n $ta ]] && ! "$dir/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
      echo "bench-peers: $name: torchaudio's compiled ops do not load beside torch $TORCH; using its pure-Python part"
      rm -f "$ta"/lib/*.so
    fi
    for extra in torchvision torchaudio; do
      if "$dir/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$extra') is None)" 2>/dev/null &&
        ! "$dir/bin/python" -c "import $extra" >/dev/null 2>&1; then
        echo "bench-peers: $name: removing $extra (does not import beside torch $TORCH)"
        "$UV" pip uninstall -q --python "$dir/bin/python" "$extra"
      fi
    done
    "$UV" pip freeze --python "$dir/bin/python" >"$dir/freeze.txt"
    echo "$want" >"$dir/.installed"
    echo "bench-peers: $name installed"
  else
    tail -n 20 "$dir/install.log" >"$dir/install-error.txt" 2>/dev/null
    echo "bench-peers: $name FAILED to install (last lines in $dir/install-error.txt):" >&2
    tail -n 5 "$dir/install-error.txt" >&2
    failed=1
  fi
done
exit $failed
