"""`sftlab-bench --peers`: sftlab's default run beside other SFT frameworks, each through its own CLI, on the
same recipe, judged by one sftlab evaluator (docs/peers.md).

Every framework trains the same converted SmolLM2-135M-Instruct directory on the same 800 ISO-date
conversations (LoRA r=16 on all linear layers, dropout 0, lr 2e-4, batch 8, one epoch = 100 steps, max length
256, loss on the assistant tokens) from a recipe file a user of that framework would recognise
(experiments/peers/), in its own virtual environment (`make bench-peers`), as a subprocess. Measured per run:

* train seconds of the 100 steps, from the framework's own report where it prints one (HF Trainer's
  `train_runtime`, litgpt's "Training Time"; sftlab: a callback, validation excluded), else the process's wall
  time (the note says which);
* tokens/s: the non-pad tokens of the 800 training conversations as sftlab counts them (template-rendered,
  right-padded batches' attention ones) / train seconds, the same numerator for everyone;
* tokens per CPU second: the same tokens / the CPU time of the whole process tree (`wait4` rusage: user +
  system, model loading included), the figure a neighbour's load hardly moves;
* peak RSS: the largest resident set of the process tree (`ru_maxrss`).

Then `judge` loads the framework's saved adapter (peft format; litgpt's merged checkpoint converted to HF
names by litgpt's own tools) onto the base and runs sftlab's generation evaluator (greedy, the 100 test
questions, sftlab's prompt rendering): the exact match column. A framework that cannot run here is a row
with the reason (the error's last line), never left out.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from sftlab.bench.callbacks import train_command
from sftlab.paths import config_dir

log = logging.getLogger("sftlab.bench")

ROOT = Path(__file__).resolve().parents[3]  # the checkout, where `make bench-peers` puts .peers/
RECIPES = config_dir() / "experiment" / "peers"  # experiments/peers/, in a checkout and in a wheel
MODEL_NAME = "SmolLM2-135M-Instruct"
# How a peer's failure shows in its log, most telling first: the error's own line, not the traceback's tail.
_ERROR_LINE = re.compile(
    r"(^\w+(\.\w+)*(Error|Exception|Interrupt)\b|^error\b|requires|not supported|No module named)", re.I
)


def peers_dir() -> Path:
    """Where `make bench-peers` put the peers' virtual environments."""
    return Path(os.environ.get("SFTLAB_PEERS_DIR") or ROOT / ".peers")


# ---- data in each peer's own format (pure) ---------------------------------------------------------------
def messages_rows(conversations: Sequence[list[dict]]) -> list[dict]:
    """OpenAI-style `messages` rows: LLaMA-Factory's sharegpt formatting with role/content tags, axolotl's
    `chat_template` type and torchtune's `chat_dataset(conversation_style="openai")` all read these."""
    return [
        {"messages": [{"role": m["role"], "content": m["content"]} for m in conv]} for conv in conversations
    ]


def alpaca_rows(conversations: Sequence[list[dict]]) -> list[dict]:
    """litgpt's JSON data module: instruction/input/output, single-turn only (what its SFT data takes)."""
    rows = []
    for conv in conversations:
        roles = [m["role"] for m in conv]
        if roles != ["user", "assistant"]:
            raise ValueError(f"litgpt's alpaca rows hold one user and one assistant turn, not {roles}")
        rows.append({"instruction": conv[0]["content"], "input": "", "output": conv[1]["content"]})
    return rows


def write_json(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- running a process and reading its log ---------------------------------------------------------------
@dataclass
class Proc:
    """A finished subprocess: exit code, wall and CPU seconds and peak RSS of its whole process tree."""

    rc: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    log: Path
    timed_out: bool = False


def run_process(
    cmd: Sequence[str], *, cwd: Path, log_path: Path, env: dict | None = None, timeout: float = 3600
) -> Proc:
    """Run `cmd` with output to `log_path`; rusage from `wait4` covers the process and every descendant it
    waited for (data workers, the torchrun a CLI may start). Past `timeout` the process group is killed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Proc(
        rc=proc.returncode,
        wall_s=time.perf_counter() - start,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        log=log_path,
        timed_out=timed_out,
    )


def failure_reason(text: str) -> str:
    """The line of a failed run's log that says why: the last error-looking line (an exception's message,
    "requires CUDA", "No module named ..."), else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def hf_train_runtime(text: str) -> float | None:
    """HF Trainer's own measure of its training loop (`train_runtime`), as LLaMA-Factory and axolotl log
    it."""
    found = re.findall(r"'train_runtime':\s*'?([\d.]+)", text)
    return float(found[-1]) if found else None


def litgpt_training_time(text: str) -> float | None:
    # its performance report: "| - Training Time             :  164.33 s"
    found = re.findall(r"Training Time\s*:\s*([\d.]+)\s*s", text, re.I)
    return float(found[-1]) if found else None


def tqdm_elapsed(text: str) -> float | None:
    """The elapsed time of the last progress bar that reached its total (`100/100 [02:10<00:00, ...]`): the
    training loop's time where a framework reports nothing else (torchtune)."""
    done = [m for m in _TQDM.finditer(text) if m["n"] == m["total"]]
    if not done:
        return None
    m = done[-1]
    return int(m["h"] or 0) * 3600 + int(m["m"]) * 60 + int(m["s"])


_TQDM = re.compile(r"(?P<n>\d+)/(?P<total>\d+) \[(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d+)<")


def sftlab_train_time(path: Path) -> float | None:
    return json.loads(path.read_text())["train_s"] if path.is_file() else None


class TrainClock(pl.Callback):
    """Writes sftlab's training seconds (fit start to end, validation excluded, as the peers run none) to
    `path`; `sftlab-bench --peers` adds it to `python -m sftlab.cli.train` through `+callbacks`."""

    def __init__(self, path: str) -> None:
        self.path, self.started, self.val_s, self._val_start = path, 0.0, 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started, self.val_s = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_s += time.perf_counter() - self._val_start

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = time.perf_counter() - self.started
        data = {"train_s": total - self.val_s, "val_s": self.val_s, "steps": trainer.global_step}
        Path(self.path).write_text(json.dumps(data) + "\n")


# ---- the frameworks --------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What every run shares, prepared once by `prepare` (sftlab's own data path)."""

    model_dir: str
    train: list[list[dict]]
    val: list[list[dict]]
    tokens: int
    targets: int
    sample_text: str
    sample_target: str


@dataclass
class Framework:
    """One framework: how its run directory is laid out, its commands, where its result lands and how long
    its training took."""

    name: str
    version: str
    lay_out: Callable[[Path, Setup], None]
    commands: Callable[[Path, Path], list[list[str]]]  # (run dir, venv) -> commands, training one first
    result: Callable[[Path], dict]  # run dir -> {"adapter": dir} | {"weights": file}
    train_time: Callable[[Path, str], float | None]  # (run dir, log text) -> seconds
    timing: str  # where train seconds come from, for the note
    render: str | None = None  # Python run in the peer's venv, in the run dir: prints the sample's text
    train_index: int = 0  # which command trains: only its wall, CPU and RSS are the run's figures


def _link_model(model_dir: str, target: Path) -> None:
    """The peer reads the same converted directory sftlab trains from (files linked, never copied)."""
    target.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.is_file() and not (target / f.name).exists():
            (target / f.name).symlink_to(f)


def _copy_recipe(name: str, run: Path) -> None:
    src = RECIPES / name
    if not src.is_file():
        raise FileNotFoundError(f"recipe {src} is missing (experiments/peers/ in a checkout)")
    shutil.copy(src, run / name)


def _llamafactory_layout(run: Path, s: Setup) -> None:
    _link_model(s.model_dir, run / "models" / MODEL_NAME)
    write_json(messages_rows(s.train), run / "data" / "iso_dates_train.json")
    shutil.copy(RECIPES / "dataset_info.json", run / "data" / "dataset_info.json")
    _copy_recipe("llamafactory_lora.yaml", run)


def _litgpt_layout(run: Path, s: Setup) -> None:
    _link_model(s.model_dir, run / "checkpoints" / "HuggingFaceTB" / MODEL_NAME)
    write_json(alpaca_rows(s.train), run / "data" / "train.json")
    write_json(alpaca_rows(s.val), run / "data" / "val.json")
    _copy_recipe("litgpt_lora.yaml", run)


def _torchtune_layout(run: Path, s: Setup) -> None:
    _link_model(s.model_dir, run / "models" / MODEL_NAME)
    write_jsonl(messages_rows(s.train), run / "data" / "iso_dates_train.jsonl")
    _copy_recipe("torchtune_lora.yaml", run)
    shutil.copy(RECIPES / "torchtune_chatml.py", run / "torchtune_chatml.py")


def _axolotl_layout(run: Path, s: Setup) -> None:
    _link_model(s.model_dir, run / "models" / MODEL_NAME)
    write_jsonl(messages_rows(s.train), run / "data" / "iso_dates_train.jsonl")
    _copy_recipe("axolotl_lora.yaml", run)


def _bin(venv: Path, name: str) -> str:
    return str(venv / "bin" / name)


LITGPT_CKPT = f"checkpoints/HuggingFaceTB/{MODEL_NAME}"
LITGPT_OUT = "out/finetune/lora"

_RENDER_LLAMAFACTORY = """
import json
from transformers import AutoTokenizer
from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
tok = AutoTokenizer.from_pretrained("models/SmolLM2-135M-Instruct")
template = get_template_and_fix_tokenizer(tok, DataArguments(template="chatml"))
conv = json.load(open("data/iso_dates_train.json"))[0]["messages"]
prompt, answer = template.encode_oneturn(tok, conv)
print(json.dumps({"text": tok.decode(prompt + answer), "target": tok.decode(answer)}))
"""

_RENDER_LITGPT = """
import json
from pathlib import Path
from litgpt.data.base import SFTDataset
from litgpt.prompts import ChatML
from litgpt.tokenizer import Tokenizer
tok = Tokenizer(Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
row = json.load(open("data/train.json"))[0]
item = SFTDataset([row], tok, prompt_style=ChatML(), max_seq_length=256, mask_prompt=True)[0]
ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
decode = lambda x: tok.processor.decode(x, skip_special_tokens=False)
print(json.dumps({"text": decode(ids), "target": decode([t for t in labels if t != -100])}))
"""

_RENDER_TORCHTUNE = """
import json, sys
sys.path.insert(0, ".")
from torchtune.data import Message
from torchtune_chatml import chatml_tokenizer
tok = chatml_tokenizer("models/SmolLM2-135M-Instruct", max_seq_len=256)
conv = json.loads(open("data/iso_dates_train.jsonl").readline())["messages"]
msgs = [Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant") for m in conv]
ids, mask = tok.tokenize_messages(msgs)
print(json.dumps({"text": tok.decode(ids, skip_special_tokens=False),
                  "target": tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)}))
"""

_RENDER_AXOLOTL = """
import json
from transformers import AutoTokenizer
from axolotl.utils.chat_templates import get_chat_template
tok = AutoTokenizer.from_pretrained("models/SmolLM2-135M-Instruct")
conv = json.loads(open("data/iso_dates_train.jsonl").readline())["messages"]
text = tok.apply_chat_template(conv, chat_template=get_chat_template("chatml"), tokenize=False)
print(json.dumps({"text": text, "target": None}))
"""

FRAMEWORKS: dict[str, Framework] = {
    "llamafactory": Framework(
        name="llamafactory",
        version="0.9.5",
        lay_out=_llamafactory_layout,
        commands=lambda run, venv: [[_bin(venv, "llamafactory-cli"), "train", "llamafactory_lora.yaml"]],
        result=lambda run: {"adapter": str(run / "saves" / "smollm2-135m" / "lora")},
        train_time=lambda run, text: hf_train_runtime(text),
        timing="HF Trainer train_runtime",
        render=_RENDER_LLAMAFACTORY,
    ),
    "torchtune": Framework(
        name="torchtune",
        version="0.6.1",
        lay_out=_torchtune_layout,
        commands=lambda run, venv: [
            [_bin(venv, "tune"), "run", "lora_finetune_single_device", "--config", "torchtune_lora.yaml"]
        ],
        result=lambda run: {"adapter": str(_last_epoch_dir(run / "out"))},
        train_time=lambda run, text: tqdm_elapsed(text),
        timing="torchtune's progress bar (whole seconds)",
        render=_RENDER_TORCHTUNE,
    ),
    "litgpt": Framework(
        name="litgpt",
        version="0.5.13",
        lay_out=_litgpt_layout,
        commands=lambda run, venv: [
            [_bin(venv, "litgpt"), "convert_to_litgpt", LITGPT_CKPT],
            [_bin(venv, "litgpt"), "finetune_lora", "--config", "litgpt_lora.yaml"],
            [_bin(venv, "litgpt"), "merge_lora", f"{LITGPT_OUT}/final"],
            [_bin(venv, "litgpt"), "convert_from_litgpt", f"{LITGPT_OUT}/final", f"{LITGPT_OUT}/hf"],
        ],
        result=lambda run: {"weights": str(run / LITGPT_OUT / "hf" / "model.pth")},
        train_time=lambda run, text: litgpt_training_time(text),
        timing="litgpt's Training Time",
        render=_RENDER_LITGPT,
        train_index=1,
    ),
    "axolotl": Framework(
        name="axolotl",
        version="0.21.0",
        lay_out=_axolotl_layout,
        commands=lambda run, venv: [[_bin(venv, "axolotl"), "train", "axolotl_lora.yaml"]],
        result=lambda run: {"adapter": str(run / "outputs" / "lora")},
        train_time=lambda run, text: hf_train_runtime(text),
        timing="HF Trainer train_runtime",
        render=_RENDER_AXOLOTL,
    ),
}


def _last_epoch_dir(out: Path) -> Path:
    epochs = sorted(out.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    return epochs[-1] if epochs else out / "epoch_0"


# ---- one row of the table --------------------------------------------------------------------------------
@dataclass
class Row:
    framework: str
    version: str
    ok: bool = False
    train_s: float | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    tokens: int = 0
    exact_match: float | None = None
    note: str = ""
    rounds: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.train_s if self.ok and self.train_s else None

    @property
    def tokens_per_cpu_s(self) -> float | None:
        return self.tokens / self.cpu_s if self.ok and self.cpu_s else None

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "tokens_per_cpu_s": self.tokens_per_cpu_s}


def venv_problem(fw: Framework, root: Path) -> str | None:
    """Why the framework's venv cannot run, or None: missing, or its install failed (that error's line)."""
    venv = root / fw.name
    err = venv / "install-error.txt"
    if not (venv / ".installed").is_file():
        if err.is_file():
            return f"not installed: {failure_reason(err.read_text())}"
        return f"no virtual environment at {venv} (run `make bench-peers`)"
    return None


def run_framework(fw: Framework, setup: Setup, workdir: Path, root: Path, timeout: float) -> tuple[Row, dict]:
    """Lay out the run directory, run the framework's commands; the row (no exact match yet) and what the
    judge loads (empty when the run failed)."""
    row = Row(fw.name, fw.version, tokens=setup.tokens)
    problem = venv_problem(fw, root)
    if problem:
        row.note = problem
        return row, {}
    run = workdir / fw.name
    if run.exists():
        shutil.rmtree(run)  # a scratch directory this bench made in its own workdir
    run.mkdir(parents=True)
    fw.lay_out(run, setup)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env["PYTHONUNBUFFERED"] = "1"  # a killed or failed run still leaves its last lines in the log
    env["AXOLOTL_DO_NOT_TRACK"] = env["DO_NOT_TRACK"] = "1"  # no telemetry retries against a closed network
    env["PYTHONPATH"] = str(run)  # the peer's venv and the recipe's own modules, not this checkout's sources
    # as with the venv activated: a CLI may start another of its venv's commands (axolotl: `accelerate`)
    env["PATH"] = f"{root / fw.name / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    wall = cpu = peak = 0.0
    texts: list[str] = []
    for k, cmd in enumerate(fw.commands(run, root / fw.name)):
        if not Path(cmd[0]).is_file():
            row.note = f"{cmd[0]} does not exist: the venv lacks the {fw.name} CLI (run `make bench-peers`)"
            return row, {}
        proc = run_process(cmd, cwd=run, log_path=run / f"step{k}.log", env=env, timeout=timeout)
        text = proc.log.read_text(errors="replace")
        texts.append(text)
        if k == fw.train_index:
            wall, cpu, peak = proc.wall_s, proc.cpu_s, proc.peak_rss_mb
        if proc.rc != 0:
            why = f"timed out after {timeout:.0f} s" if proc.timed_out else failure_reason(text)
            row.note = f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}` failed: {why}"
            return row, {}
    train_s = fw.train_time(run, texts[fw.train_index])
    row.ok = True
    row.wall_s, row.cpu_s, row.peak_rss_mb = wall, cpu, peak
    row.train_s = train_s if train_s is not None else wall
    row.note = f"time: {fw.timing}" if train_s is not None else "time: process wall (model load included)"
    return row, fw.result(run)


def run_sftlab(setup: Setup, workdir: Path, overrides: list[str], timeout: float) -> tuple[Row, dict]:
    """sftlab's default run through its own CLI (`python -m sftlab.cli.train`), measured as the peers are;
    eval=none because the judge evaluates every framework the same way afterwards."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("sftlab")
    except PackageNotFoundError:  # run from a checkout that was never installed
        ours = "checkout"
    row = Row("sftlab", ours, tokens=setup.tokens)
    run = workdir / "sftlab"
    if run.exists():
        shutil.rmtree(run)
    clock_file = workdir / "sftlab-train-clock.json"
    clock_file.unlink(missing_ok=True)
    cmd = train_command(overrides, run, "bench_train_clock", TrainClock, path=clock_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = run_process(cmd, cwd=workdir, log_path=workdir / "sftlab.log", env=env, timeout=timeout)
    if proc.rc != 0:
        row.note = f"sftlab-train failed: {failure_reason(proc.log.read_text(errors='replace'))}"
        return row, {}
    train_s = sftlab_train_time(clock_file)
    row.ok = True
    row.wall_s, row.cpu_s, row.peak_rss_mb = proc.wall_s, proc.cpu_s, proc.peak_rss_mb
    row.train_s = train_s if train_s is not None else proc.wall_s
    row.note = "time: fit, validation excluded" if train_s is not None else "time: process wall"
    return row, {"adapter": str(run / "adapter")}


# ---- in spawned processes (run.call) ---------------------------------------------------------------------
def prepare(spec: dict) -> dict:
    """The shared inputs, from sftlab's own config and data path: the converted model directory, the train
    and val conversations, the token counts of the training split as sftlab tokenizes it, and one rendered
    example (for the template check)."""
    from sftlab import build, paths
    from sftlab.bench.data import read_conversations
    from sftlab.data.tokenize import IGNORE_INDEX, render

    cfg = build.compose(spec["overrides"], Path(spec["workdir"]) / "prepare")
    p = build.parts(cfg)
    dm = build.datamodule(p)
    examples = dm.splits["train"].examples
    train = read_conversations(paths.resolve(cfg.data.train_path, key="data.train_path"))
    val = read_conversations(paths.resolve(cfg.data.val_path, key="data.val_path"))
    segments = render(train[0], p.template, p.tokenizer, cfg.data.train_on)
    return asdict(
        Setup(
            model_dir=p.source,
            train=train,
            val=val,
            tokens=sum(len(ex.input_ids) for ex in examples),
            targets=sum(sum(t != IGNORE_INDEX for t in ex.labels[1:]) for ex in examples),
            sample_text="".join(s.text for s in segments),
            sample_target="".join(s.text for s in segments if s.train),
        )
    )


def load_full_weights(model: Any, path: str | Path) -> None:
    """A merged checkpoint in HF names (litgpt's `convert_from_litgpt` output: a torch-saved state dict) into
    the base model, every weight accounted for; a tied output head may be absent."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = dict(model.state_dict())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = set(expected) - set(state) - tied
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{path}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state, strict=False)


def judge(spec: dict) -> dict:
    """Held-out exact match of a trained result with sftlab's generation evaluator (greedy, the test split,
    sftlab's prompt rendering): spec `adapter` (a peft directory, loaded onto the base) or `weights` (a full
    state dict in HF names, loaded into the base)."""
    from peft import PeftModel

    from sftlab import build

    out = Path(spec["workdir"]) / f"judge-{spec['name']}"
    overrides = [*spec["overrides"], "eval=generate", "eval.generate.compare_base=false"]
    cfg = build.compose(overrides, out)
    p = build.parts(cfg)
    dm = build.datamodule(p, stage="test")
    model = build.base_model(p, build.adapter(cfg))
    if spec.get("adapter"):
        model = PeftModel.from_pretrained(model, spec["adapter"])
    else:
        load_full_weights(model, spec["weights"])
    model.eval()
    suite = build.suite(cfg, p, dm.splits, out / "eval")
    tuned = suite.run(model, "tuned")["tuned"]
    return {"exact_match": tuned["exact_match"], "n": tuned["n"]}


# ---- the template check ----------------------------------------------------------------------------------
def template_check(fw: Framework, setup: Setup, workdir: Path, root: Path) -> str:
    """Render the first training conversation through the peer's own template code in its venv and compare
    the text (and the trained part) with sftlab's; '' when the peer has no render snippet or cannot run."""
    run = workdir / fw.name
    if fw.render is None or venv_problem(fw, root) or not run.is_dir():
        return ""
    proc = subprocess.run(
        [str(root / fw.name / "bin" / "python"), "-c", fw.render],
        cwd=run,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    if proc.returncode != 0:
        return f"template check failed: {failure_reason(proc.stderr)}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return compare_render(got["text"], got["target"], setup.sample_text, setup.sample_target)


def compare_render(text: str, target: str | None, ours: str, our_target: str) -> str:
    """One phrase: the same text, or where it differs (a trailing newline sftlab renders as the next turn's
    separator, untrained, is named as such)."""
    if text == ours:
        same = "template text identical"
    elif text == ours.rstrip("\n"):
        same = "template text identical but the final newline (untrained in sftlab)"
    else:
        return f"template text differs: {text!r} vs sftlab {ours!r}"
    if target is None:  # the peer renders the text in one place and masks it in another
        return f"{same} (trained part not checked)"
    if target == our_target:
        return f"{same}, same trained tokens"
    return f"{same}; trained part {target!r} vs sftlab {our_target!r}"


# ---- the bench -------------------------------------------------------------------------------------------
COLUMNS = (
    "framework",
    "version",
    "tokens/s",
    "tok/cpu-s",
    "wall s (100 steps)",
    "peak RSS MB",
    "exact match",
    "note",
)


def render_table(rows: Sequence[Row]) -> str:
    """A markdown table, failed frameworks included with their reason."""

    def num(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "—"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            r.framework,
            r.version,
            num(r.tokens_per_s, ".0f"),
            num(r.tokens_per_cpu_s, ".0f"),
            num(r.train_s if r.ok else None, ".1f"),
            num(r.peak_rss_mb if r.ok else None, ".0f"),
            num(r.exact_match, ".2f"),
            (r.note if r.ok else f"did not run: {r.note}").replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pool(rounds: list[Row]) -> Row:
    """Rounds of one framework as one row: the median train time (the medians of tokens/s follow), the
    median CPU time, the highest RSS; the first round's exact match (the same seed trains the same result)."""
    import statistics

    ok = [r for r in rounds if r.ok]
    if not ok:
        return Row(**asdict(rounds[0]))
    row = Row(**{**asdict(ok[0]), "rounds": [asdict(r) | {"rounds": []} for r in rounds]})
    row.train_s = statistics.median(r.train_s for r in ok)
    row.cpu_s = statistics.median(r.cpu_s for r in ok)
    row.wall_s = statistics.median(r.wall_s for r in ok)
    row.peak_rss_mb = max(r.peak_rss_mb for r in ok)
    if len(ok) < len(rounds):
        row.note += f"; {len(rounds) - len(ok)} of {len(rounds)} rounds failed"
    return row


def main(args: Any, call: Callable[[str, dict], dict]) -> dict:
    """`sftlab-bench --peers [NAME ...]`: args from bench/run.py (peers, repeat, override, out, and the
    scratch directory workdir); `call` runs a `module:function` in a spawned process."""
    names = list(args.peers) or list(FRAMEWORKS)
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown:
        raise SystemExit(f"sftlab-bench --peers: unknown {unknown}; known: {', '.join(FRAMEWORKS)}")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path("bench-peers.json" if args.out == "bench.json" else args.out)
    root = peers_dir()
    timeout = float(os.environ.get("SFTLAB_PEERS_TIMEOUT", 3600))
    overrides = list(args.override)
    started = time.time()
    setup = Setup(**call("frameworks:prepare", {"overrides": overrides, "workdir": str(workdir)}))
    log.info("shared inputs: %s, %d train rows, %d tokens", setup.model_dir, len(setup.train), setup.tokens)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_at_start": os.getloadavg(),
        "tokens": setup.tokens,
        "targets": setup.targets,
        "train_rows": len(setup.train),
        "repeat": args.repeat,
        "peers_dir": str(root),
    }
    rounds: dict[str, list[Row]] = {}
    judged: dict[str, dict] = {}
    checks: dict[str, str] = {}
    for k in range(args.repeat):
        for name in ["sftlab", *names]:
            t0 = time.time()
            if name == "sftlab":
                row, trained = run_sftlab(setup, workdir, overrides, timeout)
            else:
                row, trained = run_framework(FRAMEWORKS[name], setup, workdir, root, timeout)
                if k == 0 and row.ok:
                    checks[name] = template_check(FRAMEWORKS[name], setup, workdir, root)
            if trained and name not in judged:
                try:
                    judged[name] = call(
                        "frameworks:judge",
                        {**trained, "name": name, "overrides": overrides, "workdir": str(workdir)},
                    )
                except Exception as err:
                    judged[name] = {"error": f"{type(err).__name__}: {err}"}
            rounds.setdefault(name, []).append(row)
            log.info(
                "%-13s round %d: %s in %.0f s", name, k + 1, "ok" if row.ok else row.note, time.time() - t0
            )
            result["rows"] = [
                _finish(pool(rs), judged.get(n), checks.get(n)).to_dict() for n, rs in rounds.items()
            ]
            out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [_finish(pool(rs), judged.get(n), checks.get(n)) for n, rs in rounds.items()]
    result["rows"] = [r.to_dict() for r in rows]
    result["load_at_end"] = os.getloadavg()
    result["total_s"] = round(time.time() - started, 1)
    result["table"] = render_table(rows)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(f"\nload average at start {result['load_at_start'][0]:.2f}, at end {result['load_at_end'][0]:.2f}")
    print(f"written {out} ({result['total_s']:.0f} s)")
    return result


def _finish(row: Row, judged: dict | None, check: str | None) -> Row:
    if judged:
        if "error" in judged:
            row.note += f"; judge failed: {judged['error']}"
        else:
            row.exact_match = judged["exact_match"]
    if check:
        row.note += f"; {check}"
    return row
