"""`make gpu-check`: everything sftlab needs a CUDA device to prove, in one command (at most ~8 min on one
H100/H200), written to `gpu-check.json` and `gpu-check.md`.

1. The tests marked `gpu` (tests/training/test_gpu.py): a bf16-mixed and a 16-mixed step, QLoRA on
   bitsandbytes' CUDA kernels, evaluation and generation on the GPU after fit(), packed == unpacked with SDPA
   and (where installed) flash-attention varlen, merging on the GPU.
2. Throughput and memory: a randomly initialised model with Mistral-7B's shapes, LoRA and QLoRA, sequence
   length 2048, gradient checkpointing; and a full fine-tune of a 1B-shaped (Llama 3.2 1B) model. Each runs
   through sftlab (the real SFTModule on Lightning's Trainer, `sftlab.bench.ours`) and as a bare
   transformers + peft loop over the very same batches (`sftlab.bench.peers.run_bare`), each in its own
   process: tokens/s and peak `torch.cuda.max_memory_allocated`, and their ratios, are the figures.

What it needs beside a CUDA build of torch, transformers, peft, pytorch-lightning and torchmetrics:
hydra-core, omegaconf and antlr4-python3-runtime (required), bitsandbytes (QLoRA rows and test), flash-attn
(the varlen test, optional). `make gpu-wheels` downloads the missing ones as wheels into wheels/gpu/ (under
64 MiB) for a machine without network: `pip install --no-deps wheels/gpu/*.whl`. The check prints what is
missing before it starts.

`--dry-run`: the same code path on the CPU with tiny shapes (the tiny random model, length 64, 2 steps); the
`gpu` tests are collected and skip. The default test suite runs it (tests/bench/test_gpu_check.py), so the
script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# module name -> (distribution, what it is for); None: required
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "pytorch_lightning": "pytorch-lightning",
    "torchmetrics": "torchmetrics",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
}
OPTIONAL = {
    "bitsandbytes": ("bitsandbytes", "QLoRA rows and the QLoRA test"),
    "flash_attn": ("flash-attn", "the flash-attention varlen packing test"),
    "pytest": ("pytest", "the gpu-marked tests"),
}
GPU_TESTS = ["tests/training/test_gpu.py"]
ROOT = Path(__file__).resolve().parents[3]  # the checkout (the tests are not in the wheel)
# Llama 3.2 1B's shapes (the vocabulary is the tokenizer's: SmolLM2's 49,152 tokens).
LLAMA_1B_SHAPES = (
    "model.random_init={model_type: llama, seed: 0, hidden_size: 2048, intermediate_size: 8192, "
    "num_hidden_layers: 16, num_attention_heads: 32, num_key_value_heads: 8, max_position_embeddings: 4096, "
    "tie_word_embeddings: true}"
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions of what the check uses, and what is missing (required ones stop it)."""
    found = {dist: _version(dist) for dist in REQUIRED.values()}
    found.update({dist: _version(dist) for dist, _ in OPTIONAL.values()})
    missing = [dist for mod, dist in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    absent = {dist: why for mod, (dist, why) in OPTIONAL.items() if importlib.util.find_spec(mod) is None}
    info: dict[str, Any] = {"python": sys.version.split()[0], "versions": found, "missing": missing}
    info["optional_missing"] = absent
    if not missing:
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name() if info["cuda"] else "cpu"
        info["torch_cuda"] = torch.version.cuda
    return info


# ---- 1. the gpu-marked tests -----------------------------------------------------------------------------
def run_tests(out_dir: Path, timeout_s: int) -> dict[str, Any]:
    """pytest on the gpu-marked tests, one row per test from its JUnit XML."""
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed", "cases": []}
    if not (ROOT / GPU_TESTS[0]).is_file():
        return {"skipped": f"no {GPU_TESTS[0]} under {ROOT}: run from a checkout", "cases": []}
    xml = out_dir.resolve() / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    started = time.perf_counter()
    try:
        proc = subprocess.run([*cmd, *GPU_TESTS], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        tail = f"timed out after {timeout_s} s\n{(err.stdout or b'')[-2000:]!r}"
    cases = parse_junit(xml) if xml.is_file() else []
    return {"seconds": round(time.perf_counter() - started, 1), "cases": cases, "output_tail": tail}


def parse_junit(path: Path) -> list[dict[str, Any]]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (node.get("message") or "").strip()
                message = text.splitlines()[0][:200] if text else ""
                break
        cases.append(
            {
                "test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 2),
                "message": message,
            }
        )
    return cases


# ---- 2. throughput and memory beside a bare loop ----------------------------------------------------------
def tokenizer_override() -> list[str]:
    """`SFTLAB_TOKENIZER` (a tokenizer directory, as `make gpu-wheels` writes one) in place of the embedded
    SmolLM2 package, which is too big to travel to a GPU machine."""
    tok = os.environ.get("SFTLAB_TOKENIZER")
    return [f"model.tokenizer_name_or_path={tok}"] if tok else []


def throughput_plan(dry_run: bool, workdir: Path, bnb: bool) -> list[tuple[str, list[str]]]:
    """(row name, Hydra overrides) of each model; both runners run each."""
    from sftlab.bench import data as gen
    from sftlab.bench.run import GPU_OVERRIDES

    rows = gen.varied_conversations(32 if dry_run else 96, seed=0, max_words=30 if dry_run else 900)
    data = gen.write_jsonl(rows, workdir / "varied.jsonl")
    over = [f"data.train_path={data}", "data.val_path=null", "data.test_path=null", "logger=csv"]
    over += tokenizer_override()
    if dry_run:
        tiny = ["model=tiny_random", "data.max_length=64", "trainer.accelerator=cpu"]
        tiny.append("gradient_checkpointing=true")
        # The QLoRA row differs only in its overrides; the dry run leaves it out to stay fast.
        return [("lora", [*tiny, *over]), ("full", [*tiny, *over, "adapter=none"])]
    seven = [*GPU_OVERRIDES, *over, "data.batch_size=2"]
    one_b = [
        "model=tiny_random",
        LLAMA_1B_SHAPES,
        "model.dtype=float32",
        "model.context_length=4096",
        "data.max_length=2048",
        "gradient_checkpointing=true",
        "adapter=none",
        "data.batch_size=2",
        *over,
    ]
    plan = [("mistral7b-lora", seven), ("1b-full", one_b)]
    if bnb:
        plan.insert(1, ("mistral7b-qlora", [*seven, "adapter=qlora"]))
    return plan


def run_throughput(
    dry_run: bool, workdir: Path, warmup: int, steps: int, deadline: float, bnb: bool
) -> list[dict[str, Any]]:
    from sftlab.bench.run import _invoke, call
    from sftlab.bench.stats import Record, median_rate, steady

    rows = []
    for name, overrides in throughput_plan(dry_run, workdir, bnb):
        row: dict[str, Any] = {"model": name}
        for runner, target in (("sftlab", "ours:run_sftlab"), ("bare", "peers:run_bare")):
            if time.monotonic() > deadline:
                row[runner] = {"skipped": "time budget spent"}
                continue
            spec = {"name": f"{name}/{runner}", "overrides": overrides, "workdir": str(workdir)}
            spec.update(steps=warmup + steps, threads=None, device="auto")
            try:
                # Spawned: peak memory is per runner. The dry run stays in this process (seconds, not
                # minutes).
                result = _invoke(*target.split(":"), spec) if dry_run else call(target, spec)
            except Exception as err:  # one failing row must not hide the others
                row[runner] = {"error": f"{type(err).__name__}: {err}"[:300]}
                continue
            rec = Record.from_dict(result)
            measured = steady(rec.steps, warmup)
            row[runner] = {
                "tokens_per_s": round(median_rate(measured), 1),
                "peak_memory_mb": round(rec.extra.get("peak_memory_mb") or 0.0, 1),
                "device": rec.extra.get("device"),
                "steps": len(measured),
            }
        ours, bare = row.get("sftlab", {}), row.get("bare", {})
        if "tokens_per_s" in ours and "tokens_per_s" in bare and bare["tokens_per_s"]:
            row["speed_ratio"] = round(ours["tokens_per_s"] / bare["tokens_per_s"], 3)
            row["memory_ratio"] = round(ours["peak_memory_mb"] / max(bare["peak_memory_mb"], 1e-9), 3)
        rows.append(row)
    return rows


# ---- report -----------------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# sftlab GPU check, {result['date']} on {env.get('device')}"
        + (" (dry run: CPU, tiny shapes)" if result["dry_run"] else ""),
        "",
        f"torch {env['versions'].get('torch')} (CUDA {env.get('torch_cuda')}), transformers "
        f"{env['versions'].get('transformers')}, peft {env['versions'].get('peft')}, pytorch-lightning "
        f"{env['versions'].get('pytorch-lightning')}, bitsandbytes {env['versions'].get('bitsandbytes')}, "
        f"flash-attn {env['versions'].get('flash-attn')}; {result['seconds']:.0f} s in all.",
        "",
        "| test | outcome | s | note |",
        "|---|---|---:|---|",
    ]
    for case in result["tests"]["cases"]:
        lines.append(f"| {case['test']} | {case['outcome']} | {case['seconds']} | {case['message']} |")
    if not result["tests"]["cases"]:
        why = result["tests"].get("skipped", "see output_tail in the JSON")
        lines.append(f"| (no results) | {why} | | |")
    lines += [
        "",
        "| model | sftlab tokens/s | bare tokens/s | sftlab / bare speed | sftlab peak MiB | bare peak MiB "
        "| memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["throughput"]:
        ours, bare = row.get("sftlab", {}), row.get("bare", {})

        def cell(d: dict, key: str) -> str:
            return str(d.get(key, d.get("error", d.get("skipped", "")))).replace("|", "/")

        lines.append(
            f"| {row['model']} | {cell(ours, 'tokens_per_s')} | {cell(bare, 'tokens_per_s')} | "
            f"{row.get('speed_ratio', '')} | {cell(ours, 'peak_memory_mb')} | "
            f"{cell(bare, 'peak_memory_mb')} | {row.get('memory_ratio', '')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sftlab.bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, same code path")
    ap.add_argument("--out", type=Path, default=Path("."), help="where gpu-check.json / .md go")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (2; dry run 1)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (4; dry run 1)")
    ap.add_argument("--budget-s", type=int, default=450, help="no new runner after (s)")
    ap.add_argument("--skip-tests", action="store_true", help="throughput rows only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    env = environment()
    print(f"sftlab gpu-check: python {env['python']}, versions {env['versions']}")
    if env["missing"]:
        sys.exit(
            f"gpu-check needs {', '.join(env['missing'])}: install them (offline: make gpu-wheels on a "
            "connected machine, then pip install --no-deps wheels/gpu/*.whl)."
        )
    for dist, why in env["optional_missing"].items():
        print(f"  without {dist}: no {why}")
    if not env["cuda"] and not args.dry_run:
        sys.exit("gpu-check needs a CUDA device (torch.cuda.is_available() is False); --dry-run: on the CPU.")
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 2)
    steps = args.steps if args.steps is not None else (1 if args.dry_run else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    tests = {"skipped": "--skip-tests", "cases": []}
    if not args.skip_tests:
        tests = run_tests(args.out, timeout_s=max(60, args.budget_s // 2))
        print(f"  gpu tests: {[(c['test'], c['outcome']) for c in tests['cases']]}")
    bnb = "bitsandbytes" not in env["optional_missing"]
    with tempfile.TemporaryDirectory(prefix="sftlab-gpu-check-") as tmp:
        rows = run_throughput(args.dry_run, Path(tmp), warmup, steps, started + args.budget_s, bnb)
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "dry_run": args.dry_run,
        "seconds": round(time.monotonic() - started, 1),
        "environment": env,
        "tests": tests,
        "throughput": rows,
    }
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    (args.out / "gpu-check.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
