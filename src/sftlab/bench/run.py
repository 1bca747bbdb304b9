"""`sftlab-bench` (`make bench`): throughput, efficiency, memory and data-preparation figures in one run.

A plain argparse CLI rather than a Hydra app: it runs many configurations side by side, each composed from
conf/ with the Hydra compose API (`-o KEY=VALUE` overrides apply to all of them); Hydra's run directory and
logging would only get in the way. Every trainer runs in its own spawned process (peak RSS per runner, no
state shared between them). Prints a table and writes `bench.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException

from sftlab import build
from sftlab.bench import data as gen
from sftlab.bench import loss_memory
from sftlab.bench.callbacks import FirstStepMarker, train_command
from sftlab.bench.hardware import machine, matmul_peak, pick_device
from sftlab.bench.report import history_row, render, render_figures, summarize, targets
from sftlab.bench.scale import data_scale
from sftlab.bench.stats import Record, steady

log = logging.getLogger("sftlab.bench")

# The GPU preset: a randomly initialised model with Mistral-7B's shapes (no download), bf16 weights,
# sequence length 2048 with gradient checkpointing.
MISTRAL_7B_SHAPES = (
    "model.random_init={model_type: mistral, seed: 0, hidden_size: 4096, intermediate_size: 14336, "
    "num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, max_position_embeddings: 32768, "
    "tie_word_embeddings: false}"
)
# What `--only` takes besides the runs' names, each a `wanted(args, NAME)` section of `_bench`.
SECTIONS = ("data-prep", "data-scale", "data-audit", "loss-memory", "first-step", "cli-latency")
GPU_OVERRIDES = [
    "model=tiny_random",
    MISTRAL_7B_SHAPES,
    "model.dtype=bfloat16",
    "model.context_length=4096",
    "data.max_length=2048",
    "gradient_checkpointing=true",
]


def count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `least`, or argparse's own error naming the option (a zero
    `--repeat` or row count otherwise failed minutes later, deep in the bench)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} (use an integer >= {least})")
        return value

    parse.__name__ = "integer"
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sftlab-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        help="Hydra override for every runner, e.g. -o model=tiny_random (repeatable)",
    )
    ap.add_argument("--warmup", type=count(0), default=3, help="optimizer steps before measuring (default 3)")
    ap.add_argument(
        "--steps", type=count(1), default=8, help="measured optimizer steps per runner (default 8)"
    )
    ap.add_argument(
        "--repeat",
        type=count(1),
        default=1,
        help="rounds: every runner runs once per round, in turn, and the medians pool the measured steps of "
        "all rounds, so a neighbour's burst of load during one runner cannot tilt a ratio (default 1)",
    )
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 steps, small data sets (smoke test)")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help=f"only these runs: names as in the table, {', '.join(SECTIONS)} (none named: the matmul peak "
        "alone)",
    )
    ap.add_argument(
        "--varied-rows", type=count(1), default=600, help="size of the generated varied-length set"
    )
    ap.add_argument("--prep-rows", type=count(1), default=10_000, help="alpaca rows to prepare")
    ap.add_argument(
        "--scale-rows",
        type=count(1),
        nargs="+",
        default=[10_000, 100_000],
        help="row counts for data-scale (default 10000 100000; add 1000000 where time allows)",
    )
    ap.add_argument("--scale-num-proc", type=count(1), default=None, help="data.num_proc for data-scale")
    ap.add_argument(
        "--audit-rows", type=count(1), default=100_000, help="alpaca rows for the data audit's time"
    )
    ap.add_argument(
        "--loss-targets",
        type=count(1),
        default=2048,
        help="target tokens of the loss-memory figure, above its chunk size of 1024 (default 2048)",
    )
    ap.add_argument(
        "--gpu-7b",
        action="store_true",
        help="CUDA: Mistral-7B shapes, random init; LoRA + QLoRA, length 2048, checkpointing",
    )
    ap.add_argument(
        "--threads",
        type=count(1),
        default=None,
        help="torch threads in every runner and the matmul peak (default: torch's choice, the cores)",
    )
    ap.add_argument(
        "--peers",
        nargs="*",
        default=None,
        metavar="NAME",
        help="sftlab's default run beside other frameworks (llamafactory torchtune litgpt axolotl; none "
        "named: all), each in its venv from `make bench-peers`, judged by one sftlab evaluator; writes "
        "bench-peers.json (docs/peers.md)",
    )
    ap.add_argument("--out", default="bench.json", help="where to write the figures (default bench.json)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
        args.varied_rows, args.prep_rows = min(args.varied_rows, 64), min(args.prep_rows, 500)
        args.audit_rows = min(args.audit_rows, 500)
        args.scale_rows = [min(n, 2000) for n in args.scale_rows[:1]]
    return args


def check_only(args: argparse.Namespace) -> None:
    """A name `--only` does not know stops the bench before it starts (a typo would otherwise run nothing
    and print an empty table)."""
    if not args.only or args.peers is not None:
        return
    with tempfile.TemporaryDirectory(prefix="sftlab-bench-") as scratch:
        every = argparse.Namespace(**{**vars(args), "only": None})
        runs = [name for name, _, _ in plan(every, Path(scratch))]
    unknown = [name for name in args.only if name not in {*runs, *SECTIONS}]
    if unknown:
        raise SystemExit(
            f"sftlab-bench --only: unknown {', '.join(unknown)}; known: {', '.join([*runs, *SECTIONS])}"
        )


def plan(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, dict]]:
    """(name, "module:function", spec) of every trainer run, in the order they run."""
    steps = args.warmup + args.steps
    base = list(args.override)
    runs = _gpu_runs(args, workdir, base) if args.gpu_7b else _cpu_runs(args, workdir, base)
    for name, _, spec in runs:
        spec.update(name=name, workdir=str(workdir), steps=steps, threads=args.threads)
    return [r for r in runs if wanted(args, r[0])]


def _gpu_runs(args: argparse.Namespace, workdir: Path, base: list[str]) -> list[tuple[str, str, dict]]:
    varied = _varied_file(args, workdir, max_words=900)  # most examples reach the 2048-token max length
    over = [*GPU_OVERRIDES, *base, f"data.train_path={varied}", "data.val_path=null", "data.test_path=null"]
    return [
        ("gpu/lora", "ours:run_sftlab", {"overrides": over}),
        ("gpu/qlora", "ours:run_sftlab", {"overrides": [*over, "adapter=qlora"]}),
    ]


def _cpu_runs(args: argparse.Namespace, workdir: Path, base: list[str]) -> list[tuple[str, str, dict]]:
    varied = _varied_file(args, workdir)
    vover = [*base, f"data.train_path={varied}", "data.val_path=null", "data.test_path=null"]
    runs = []
    # TRL loads its model with transformers' own default attention (SDPA), as its users do.
    sdpa = "model.attn_implementation=sdpa"
    for tag, over in (("iso", base), ("varied", vover)):
        runs += [
            (f"{tag}/bare", "peers:run_bare", {"overrides": over}),
            (f"{tag}/sftlab", "ours:run_sftlab", {"overrides": over}),
            (f"{tag}/trl-default", "peers:run_trl", {"overrides": [*over, sdpa], "trl": "default"}),
            (f"{tag}/trl-best", "peers:run_trl", {"overrides": [*over, sdpa], "trl": "best"}),
        ]
    runs[2:2] = [("iso/sftlab-sdpa", "ours:run_sftlab", {"overrides": [*base, sdpa]})]  # the attention lever
    runs[7:7] = [
        ("varied/sftlab-packed", "ours:run_sftlab", {"overrides": vover, "data": {"packing": True}}),
        ("varied/sftlab-grouped", "ours:run_sftlab", {"overrides": vover, "data": {"group_by_length": True}}),
    ]
    runs.append(("iso/sftlab-qlora", "ours:run_sftlab", {"overrides": [*base, "adapter=qlora"]}))
    return runs


def _varied_file(args: argparse.Namespace, workdir: Path, max_words: int = 70) -> Path:
    rows = gen.varied_conversations(args.varied_rows, seed=0, max_words=max_words)
    return gen.write_jsonl(rows, workdir / "varied.jsonl")


def call(target: str, spec: dict) -> dict:
    """Run `sftlab.bench.<module>:<function>(spec)` in a fresh spawned process."""
    module, function = target.split(":")
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_invoke, module, function, spec).result()


def _invoke(module: str, function: str, spec: dict) -> dict:
    import importlib

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    logging.basicConfig(level=logging.WARNING)
    try:
        return getattr(importlib.import_module(f"sftlab.bench.{module}"), function)(spec)
    except Exception as err:
        raise _portable(err) from None


def _portable(err: Exception) -> Exception:
    """`err`, or a RuntimeError with its type and message where it would not survive the trip back to
    the parent: an exception whose constructor takes other arguments than its `args` (Hydra's
    OverrideParseException) fails to unpickle there, and the parent would see only "a process in the
    process pool was terminated abruptly"."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def data_prep(spec: dict) -> dict:
    """Rows/s to read, render, tokenize and mask `rows` alpaca rows (no cache), then the cached reload."""

    workdir = Path(spec["workdir"])
    cfg = build.compose(spec["overrides"], workdir / "prep")
    p = build.parts(cfg)
    path = gen.write_jsonl(gen.alpaca_rows(spec["rows"]), workdir / "alpaca.jsonl")
    settings = {
        "train_path": str(path),
        "val_path": None,
        "test_path": None,
        "format": "alpaca",
        "cache_dir": str(workdir / "data-cache"),
        "max_drop_ratio": 1.0,
    }
    timings = []
    for _ in range(2):  # first: processed and written to the cache; second: a new datamodule reads the cache
        dm = build.datamodule(p, setup=False, **settings)
        start = time.perf_counter()
        dm.setup("fit")
        timings.append(time.perf_counter() - start)
    kept = len(dm.splits["train"].examples)
    cached = (workdir / "data-cache").is_dir() and any((workdir / "data-cache").iterdir())
    tokens, tokenize_s = tokenizer_alone(dm.splits["train"].rows, p)
    return {
        "rows": spec["rows"],
        "kept": kept,
        "seconds": timings[0],
        "rows_per_s": spec["rows"] / timings[0],
        "reload_s": timings[1] if cached else None,
        "cache": cached,
        "tokens": tokens,
        "tokenizer_s": tokenize_s,
        "tokenizer_rows_per_s": spec["rows"] / tokenize_s,
    }


def tokenizer_alone(conversations: list, p: Any) -> tuple[int, float]:
    """(tokens, best-of-3 seconds) of the one batched tokenizer call data preparation makes on these rows
    (every distinct segment text): the ceiling on rows/s, whatever reading, rendering and masking cost."""
    from sftlab.data.tokenize import encode_batch, render

    segments = [render(conv, p.template, p.tokenizer, "all_assistant") for conv in conversations]
    texts = list(dict.fromkeys(seg.text for segs in segments for seg in segs))
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        ids = encode_batch(texts, p.tokenizer)
        seconds.append(time.perf_counter() - start)
    return sum(map(len, ids)), min(seconds)


def first_step(overrides: list[str], workdir: Path, timeout: float = 300) -> dict:
    """Seconds from launching `python train.py` to the end of its first optimizer step (model cached).

    Default config except `eval=none` (the base-model evaluation before training is a separate, optional cost)
    and `logger=csv` (no W&B service process to leave behind when the run is stopped after its first step).
    """
    marker = workdir / "first_step.txt"
    marker.unlink(missing_ok=True)
    cmd = train_command(
        overrides, workdir / "first_step_run", "bench_first_step", FirstStepMarker, path=marker
    )
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    launched = time.time()
    errors = workdir / "first_step.log"
    with open(errors, "w") as err:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        while not marker.exists():
            if proc.poll() is not None:
                return {"seconds": None, "error": errors.read_text()[-2000:]}
            if time.time() - launched > timeout:
                return {"seconds": None, "error": f"no optimizer step within {timeout} s"}
            time.sleep(0.1)
        return {"seconds": float(marker.read_text()) - launched}
    finally:
        if proc.poll() is None:  # the measurement is taken; the rest of the run is not needed
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # Lightning defers SIGTERM to the end of the step
                proc.kill()
                proc.wait()


def peaks(device: torch.device, quick: bool, before: dict | None = None) -> dict:
    """Matmul peaks; with `before`, the best of both measurements (a neighbour's job only ever lowers it)."""
    n = 1024 if quick else 2048
    out: dict[str, Any] = {"n": n}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        wall, cpu = matmul_peak(dtype, n=n, device=device)
        out[f"{name}_gflops"] = max(wall, (before or {}).get(f"{name}_gflops", 0.0))
        out[f"{name}_gflops_per_cpu_s"] = max(cpu, (before or {}).get(f"{name}_gflops_per_cpu_s", 0.0))
    return out


def main(argv: list[str] | None = None) -> None:
    """`sftlab-bench`. Returns nothing: a console script exits with its function's return value, and any
    object but None or an int reads as a failure (and is printed)."""
    run(argv)


def run(argv: list[str] | None = None) -> dict:
    """The bench: prints its tables and returns what it wrote to its JSON file."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # a bad -o fails here, in seconds, rather than in the first runner's process
        build.compose(args.override)
    except HydraException as err:
        raise SystemExit(f"sftlab-bench: -o {' -o '.join(args.override)}: {err}") from None
    check_only(args)
    # A temporary scratch directory (data caches of up to gigabytes, the peers' runs) is removed when the
    # bench ends, kept and named when it fails; `--workdir DIR` keeps it either way.
    keep = args.workdir is not None
    prefix = "sftlab-peers-" if args.peers is not None else "sftlab-bench-"
    args.workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    try:
        if args.peers is not None:
            from sftlab.bench import frameworks

            result = frameworks.main(args, call)
        else:
            result = _bench(args, argv)
    except BaseException:
        print(f"sftlab-bench: the scratch directory is kept: {args.workdir}", file=sys.stderr)
        raise
    if keep:
        print(f"runs and data in {args.workdir}")
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return result


def _bench(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Every measurement but the peers', in the scratch directory `args.workdir`."""
    # OMP_WAIT_POLICY is left as `python train.py` runs (OpenMP threads spin briefly between parallel
    # regions, then sleep). PASSIVE (sleep at once) made every 2-thread step 25-35 % slower on a quiet
    # machine, since a training step is thousands of small parallel regions; ACTIVE (spin forever) let this
    # parent's idle threads take a core from the runners: 3x slower.
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    device = pick_device()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "device": str(device),
        "warmup": args.warmup,
        "steps": args.steps,
        "overrides": args.override,
        "quick": args.quick,
        "commit": _commit(),
        "command": " ".join(["sftlab-bench", *(argv if argv is not None else sys.argv[1:])]),
    }
    result["peak"] = peaks(device, args.quick)
    log.info(
        "matmul peak: fp32 %.0f, bf16 %.0f GFLOP/s",
        result["peak"]["fp32_gflops"],
        result["peak"]["bf16_gflops"],
    )
    rounds: dict[str, list[Record]] = {}
    for k in range(args.repeat):
        for name, target, spec in plan(args, workdir):
            t0 = time.time()
            rounds.setdefault(name, []).append(Record.from_dict(call(target, spec)))
            result["runs"] = summarize(pooled(rounds, args.warmup), args.warmup, result["peak"])
            _write(args.out, result)  # a long run interrupted still leaves what it measured
            this_round = summarize(rounds[name][-1:], args.warmup, result["peak"])[name]["tokens_per_s"]
            log.info("%-22s %6.0f tok/s  round %d done in %.0f s", name, this_round, k + 1, time.time() - t0)
    result["repeat"] = args.repeat
    result["peak"] = peaks(device, args.quick, before=result["peak"])
    result["runs"] = summarize(pooled(rounds, args.warmup), args.warmup, result["peak"])
    if not args.gpu_7b and wanted(args, "data-prep"):
        result["data_prep"] = call(
            "run:data_prep", {"overrides": args.override, "workdir": str(workdir), "rows": args.prep_rows}
        )
        _write(args.out, result)
    if not args.gpu_7b and wanted(args, "data-scale"):
        # Minutes at 100k rows and more: a full run takes the first (smallest) size only, `--only data-scale`
        # every size asked for.
        quick = args.only is None and len(args.scale_rows) > 1
        spec = {
            "overrides": args.override,
            "workdir": str(workdir),
            "sizes": args.scale_rows[:1] if quick else args.scale_rows,
            "num_proc": args.scale_num_proc,
            "repeat": args.repeat,
        }
        result["data_scale"], result["data_scale_quick"] = data_scale(spec, call), quick
        _write(args.out, result)
    if not args.gpu_7b and wanted(args, "data-audit"):
        spec = {"overrides": args.override, "workdir": str(workdir), "rows": args.audit_rows}
        result["data_audit"] = call("audit:data_audit", spec)
        _write(args.out, result)
    if wanted(args, "loss-memory"):
        # The smallest size of `python -m sftlab.bench.loss_memory`, chunked and not: the trend with more
        # targets is that module's own table.
        result["loss_memory"] = loss_memory.run([args.loss_targets], 1024, device=device.type)
        _write(args.out, result)
    if not args.gpu_7b and wanted(args, "first-step"):
        result["first_step"] = first_step(args.override, workdir)
    if wanted(args, "cli-latency"):
        result["cli_latency_s"] = cli_latency()
    result["targets"] = targets(result)
    result["total_s"] = round(time.time() - started, 1)
    _write(args.out, result)
    print(render(result))
    if "cli_latency_s" in result:
        lat = result["cli_latency_s"]
        print(
            f"CLI latency: --help {lat['help']:.1f} s, --cfg job {lat['cfg_job']:.1f} s, "
            f"completion {lat['completion']:.1f} s (target <= 3 s)"
        )
    print(render_figures(result))
    print("\nrow for the History table of docs/performance.md:\n" + history_row(result))
    print(f"\nwritten {args.out} ({result['total_s']:.0f} s)")
    return result


def cli_latency() -> dict[str, float]:
    """Wall seconds of `sftlab-train --help`, `--cfg job` and one bash-completion request (what each TAB
    costs), each a fresh process as the shell starts it."""
    line = "sftlab-train model="  # as Hydra's bash completion passes it
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    seconds = {}
    for name, args in (
        ("help", ["--help"]),
        ("cfg_job", ["--cfg", "job"]),
        ("completion", ["-sc", "query=bash"]),
    ):
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "sftlab.cli.train", *args]
        subprocess.run(cmd, env=env, capture_output=True, check=True, timeout=300)
        seconds[name] = round(time.perf_counter() - t0, 2)
    return seconds


def _commit() -> str | None:
    """The checkout's commit (with `+` when it has uncommitted changes), for the dated history."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None  # an installed package, not a checkout
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def pooled(rounds: dict[str, list[Record]], warmup: int) -> list[Record]:
    """One record per runner: the first round's warm-up steps, then the measured steps of every round (each
    round's own warm-up left out), so `summarize` takes medians over all rounds. Peak memory: the highest."""
    out = []
    for name, recs in rounds.items():
        steps = recs[0].steps[:warmup] + [s for r in recs for s in steady(r.steps, warmup)]
        peak = max((r.extra.get("peak_memory_mb") or 0 for r in recs), default=0)
        out.append(Record(name, steps, {**recs[0].extra, "peak_memory_mb": peak or None}))
    return out


def wanted(args: argparse.Namespace, name: str) -> bool:
    return args.only is None or name in args.only


def _write(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


if __name__ == "__main__":
    main()
