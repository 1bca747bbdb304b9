"""Validate a composed config before anything heavy loads, reporting every problem at once.

The schema of an option is the signature of the class or function its `_target_` names: a key that the target
does not accept is a typo (`+adapter.rank=8`, `optimizer.betas1=...` in a YAML), and a value whose type
contradicts a simple annotation (int, float, bool, str) is rejected without coercion. Options without a
`_target_` (the model group) are checked against the keys their YAML files define: the base every model
extends (conf/model_defaults.yaml) and any key an option file adds, unless that key is one letter-slip from a
base key (`dtyep`). Ranges and choices that no signature can express live in RULES. Each problem names the
key, the value given, the file it comes from, and what is allowed.

Files are looked up where Hydra composed them from (`Origin`: its config sources in search-path order, the
primary config and the chosen options), so a config dir of your own on `hydra.searchpath` or `--config-dir`
is checked like the shipped one, and a problem in one of its files names that file.
"""

from __future__ import annotations

import difflib
import errno
import importlib.resources
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from sftlab import paths
from sftlab.errors import ConfigError, SFTLabError

HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _gt0(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _ge1(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer.lr": (_gt0, "a number > 0"),
    "optimizer.weight_decay": (lambda v: isinstance(v, int | float) and v >= 0, "a number >= 0"),
    "adapter.r": (_ge1, "an integer >= 1"),
    "adapter.lora_alpha": (_gt0, "a number > 0"),
    "adapter.lora_dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "a number in [0, 1)"),
    "data.batch_size": (_ge1, "an integer >= 1"),
    "data.eval_batch_size": (_ge1, "an integer >= 1"),
    "data.max_length": (lambda v: v is None or _ge1(v), "an integer >= 1 (or null for no limit)"),
    "data.num_workers": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "trainer.max_epochs": (
        lambda v: v is None or _ge1(v) or v == -1,
        "an integer >= 1 (-1: until max_steps)",
    ),
    "trainer.max_steps": (lambda v: _ge1(v) or v == -1, "an integer >= 1, or -1 for no limit"),
    "trainer.accumulate_grad_batches": (_ge1, "an integer >= 1"),
    "trainer.gradient_clip_val": (
        lambda v: v is None or (isinstance(v, int | float) and v >= 0),
        "a number >= 0",
    ),
    "scheduler.warmup": (lambda v: isinstance(v, int | float) and v >= 0, "a number >= 0 (< 1: a fraction)"),
    "data.max_drop_ratio": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1,
        "a fraction in [0, 1]",
    ),
    "data.val_fraction": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
        "a fraction in [0, 1)",
    ),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "share_prefix": (lambda v: isinstance(v, bool), "true or false"),
    "loss_chunk_size": (lambda v: v is None or _ge1(v), "an integer >= 1 (or null for one chunk)"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.truncation": ("truncate", "drop"),
    "data.train_on": ("all_assistant", "last_assistant", "all"),
    "scheduler.kind": ("cosine", "linear", "constant"),
    # the data and eval modules check these too, but only once the data is read or the model has trained
    "data.reasoning": ("keep_last", "keep_all", "drop"),
    "eval.generate.reasoning": ("strip", "show"),
    "eval_precision": ("auto", "32", "bf16-mixed", "16-mixed"),
}


@dataclass(frozen=True)
class Source:
    """One config source: a folder (`file`) or a package folder (`pkg`), as Hydra's search path lists it."""

    root: Any  # pathlib.Path or an importlib.resources Traversable
    label: str

    @classmethod
    def of(cls, schema: str, path: str) -> Source | None:
        if schema == "file":
            return cls(Path(path), path)
        if schema == "pkg":  # pkg://package.module/sub/dir
            module, _, sub = path.partition("/")
            try:
                root = importlib.resources.files(module)
            except ModuleNotFoundError:
                return None
            return cls(root / sub if sub else root, f"pkg://{path}")
        return None  # `structured` (Hydra's ConfigStore): no files to point at

    def read(self, rel: str) -> tuple[str, str] | None:
        """(the file's name for messages, its text), or None when this source has no such file."""
        target = self.root / rel
        if not target.is_file():
            return None
        name = str(Path(target).resolve()) if isinstance(target, Path) else f"{self.label}/{rel}"
        return name, target.read_text(encoding="utf-8")

    def listing(self, rel: str = "") -> list[Any]:
        folder = self.root / rel if rel else self.root
        return list(folder.iterdir()) if folder.is_dir() else []


@dataclass(frozen=True)
class OptionFile:
    name: str  # the file, for messages
    cfg: DictConfig  # its content without the defaults list
    is_global: bool  # `# @package _global_`: its keys are top-level keys


@dataclass(frozen=True)
class Origin:
    """Where a composed config came from: Hydra's config sources (search-path order: the first holding a file
    wins, as in Hydra), the primary config's name and the option chosen in each group."""

    sources: tuple[Source, ...]
    config_name: str = "train"
    choices: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hydra(cls, hydra_cfg: Any) -> Origin:
        """From `HydraConfig.get()` inside an app, or the `hydra` node of a config composed with it."""
        found = (Source.of(s.schema, s.path) for s in hydra_cfg.runtime.config_sources)
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}
        return cls(tuple(s for s in found if s), hydra_cfg.job.config_name or "train", choices)

    @classmethod
    def shipped(cls, choices: Mapping[str, Any] | None = None, config_name: str = "train") -> Origin:
        """The shipped config alone, for a config whose Hydra node is gone."""
        return cls((Source(paths.config_dir(), str(paths.config_dir())),), config_name, dict(choices or {}))

    def load(self, rel: str) -> OptionFile | None:
        for source in self.sources:
            if (found := source.read(rel)) is not None:
                name, text = found
                cfg = OmegaConf.create(text) or OmegaConf.create({})
                is_global = any(
                    line.replace(" ", "") == "#@package_global_" for line in text.splitlines()[:10]
                )
                return OptionFile(name, cfg, is_global)
        return None

    def groups(self) -> set[str]:
        return {
            p.name
            for s in self.sources
            for p in s.listing()
            if p.is_dir() and not p.name.startswith(("_", "."))
        }

    def options(self, group: str) -> set[str]:
        return {p.name[:-5] for s in self.sources for p in s.listing(group) if p.name.endswith(".yaml")}

    def chain(self, rel: str) -> list[OptionFile]:
        """The file `rel` (group/option.yaml) and the files its defaults list extends, nearest first."""
        file = self.load(rel)
        if file is None:
            return []
        defaults = list(file.cfg.get("defaults") or [])
        own = OptionFile(
            file.name,
            OmegaConf.masked_copy(file.cfg, [k for k in file.cfg if k != "defaults"]),
            file.is_global,
        )
        group = rel.rpartition("/")[0]
        chain = [own]
        for entry in reversed(defaults):
            if not isinstance(entry, str) or entry == "_self_":
                continue  # `override /group: option` entries choose other groups' options
            path, _, package = entry.partition("@")
            if package in ("", "_here_"):
                rel_path = path[1:] if path.startswith("/") else f"{group}/{path}" if group else path
                chain += self.chain(rel_path + ".yaml")
        return chain

    def option_keys(self, group: str) -> tuple[set[str], dict[str, str]]:
        """(keys of the bases the group's options extend, {a key an option adds: the file adding it})."""
        base: set[str] = set()
        added: dict[str, str] = {}
        for option in sorted(self.options(group)):
            own, *bases = self.chain(f"{group}/{option}.yaml") or [None]
            for b in bases:
                base |= {str(k) for k in b.cfg}
            if own is not None:
                for k in own.cfg:
                    added.setdefault(str(k), own.name)
        return base, {k: v for k, v in added.items() if k not in base}

    def where(self, key: str) -> str:
        """Where a key's value was set, for messages: the chosen option's file (or its base that sets the
        key), else the primary config."""
        group, _, rest = key.partition(".")
        option = self.choices.get(group)
        if isinstance(option, str) and option.startswith("["):  # eval=[a,b]: each option nests under its name
            option = rest.partition(".")[0]
        if isinstance(option, str) and option in self.options(group):
            chain = self.chain(f"{group}/{option}.yaml")
            for file in chain:
                at = key if file.is_global else rest
                if rest and _sets(file.cfg, at):
                    return f"{file.name} or the command line"
            if chain:
                return f"{chain[0].name} or the command line"
        return f"{self.config_name}.yaml, an experiment or the command line"


def _sets(cfg: DictConfig, key: str) -> bool:
    """Whether a file's content writes `key` (an interpolation there need not resolve)."""
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _simple_type(annotation: Any) -> tuple[type, ...] | None:
    """The accepted runtime types when an annotation is simple (int, float, bool, str, optionally None)."""
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    members = args or (annotation,)
    simple = {int: (int,), float: (int, float), bool: (bool,), str: (str,), type(None): (type(None),)}
    if not all(m in simple for m in members):
        return None
    return tuple(t for m in members for t in simple[m])


def _forwarded_kwargs(obj: Any) -> set[str] | None:
    """The keywords a class passes its **kwargs on to, where sftlab knows them: Lightning's WandbLogger hands
    them to `wandb.init`, which rejects an unknown one with a TypeError inside `fit()`."""
    if inspect.isclass(obj) and any(
        c.__name__ == "WandbLogger" and c.__module__.startswith(("pytorch_lightning", "lightning"))
        for c in obj.__mro__
    ):
        import wandb

        own = {
            n for c in obj.__mro__ if "__init__" in vars(c) for n in inspect.signature(c.__init__).parameters
        }
        return (own | set(inspect.signature(wandb.init).parameters)) - {"self", "args", "kwargs"}
    return None


def _signature(target: str) -> tuple[set[str] | None, dict[str, Any]]:
    """Accepted keyword names (None: accepts **kwargs) and type hints of a `_target_`."""
    obj = get_method(target)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(obj).parameters
    names = None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set(params)
    if names is None:
        names = _forwarded_kwargs(obj)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references in third-party code: skip type checks
        hints = {}
    return names, hints


def _check_target_node(path: str, node: DictConfig, origin: Origin, problems: list[str]) -> None:
    target = node["_target_"]
    try:
        names, hints = _signature(target)
    except (ImportError, AttributeError, ValueError) as err:
        problems.append(f"{path}._target_={target!r} ({origin.where(path)}): cannot be imported ({err}).")
        return
    for key in node:
        if key in HYDRA_KEYS:
            continue
        full = f"{path}.{key}"
        if names is not None and key not in names:
            allowed = ", ".join(sorted(names - {"self"}))
            problems.append(f"{full}: unknown key ({origin.where(full)}); {target} accepts: {allowed}.")
            continue
        value = OmegaConf.select(node, str(key))
        accepted = _simple_type(hints.get(key))
        if accepted and value is not None and not isinstance(value, DictConfig | ListConfig):
            bad_bool = isinstance(value, bool) and bool not in accepted
            if bad_bool or not isinstance(value, accepted):
                problems.append(
                    f"{full}={value!r} ({origin.where(full)}): must be of type "
                    f"{' or '.join(t.__name__ for t in accepted)}, got {type(value).__name__}."
                )


def _walk(path: str, node: Any, origin: Origin, problems: list[str]) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target_node(path, node, origin, problems)
        for key in node:
            full = f"{path}.{key}" if path else str(key)
            if OmegaConf.is_missing(node, key):
                problems.append(f"{full}: no value (???); set it in {origin.where(full)}.")
            elif key not in HYDRA_KEYS:
                _walk(full, node[key], origin, problems)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _walk(f"{path}[{i}]", item, origin, problems)


def _check_model(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    base, added = origin.option_keys("model")
    allowed = base | set(added)
    for key in (str(k) for k in cfg.get("model") or {}):
        near = difflib.get_close_matches(key, base, n=1, cutoff=0.8) if key not in base else []
        if key not in allowed or near:
            hint = f"did you mean {near[0]}?" if near else f"allowed: {', '.join(sorted(allowed))}."
            problems.append(f"model.{key}: unknown key ({origin.where('model.' + key)}); {hint}")


def _check_top_level(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    """Group names, the primary config's keys and keys set by options placed at the top level (`_global_`):
    anything else came from a `+key=...` on the command line."""
    allowed = origin.groups()
    for primary in origin.chain(f"{origin.config_name}.yaml"):  # a primary config may extend train.yaml
        allowed |= {str(k) for k in primary.cfg}
    for group in origin.groups():
        for option in origin.options(group):
            for file in origin.chain(f"{group}/{option}.yaml"):
                if file.is_global:
                    allowed |= {str(k) for k in file.cfg}
    for key in cfg:
        if key not in allowed:
            problems.append(
                f"{key}: unknown top-level key (a `+{key}=...` typo?); allowed: {', '.join(sorted(allowed))}."
            )


def _check_rules(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    reported = {p.split("=")[0].split(":")[0] for p in problems}
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if (
            key not in reported
            and value != "__absent__"
            and not (ok(value) and not (isinstance(value, float) and math.isnan(value)))
        ):
            problems.append(f"{key}={value!r} ({origin.where(key)}): must be {allowed}.")
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and str(value) not in options:  # 32 may come as an int
            problems.append(f"{key}={value!r} ({origin.where(key)}): must be one of {', '.join(options)}.")


def _check_paths(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    for split in ("train", "val", "test"):
        key = f"data.{split}_path"
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or not (value.endswith(DATA_SUFFIXES) or value.startswith("pkg://")):
            continue  # null, a hub dataset id or a list: checked when the data loads
        try:
            problem = _unreadable(Path(paths.resolve(value, key=key)))
        except SFTLabError:
            problem = "file not found."
        if problem:
            problems.append(f"{key}={value!r} ({origin.where(key)}): {problem}")


def _unreadable(path: Path) -> str | None:
    """Why a data file cannot be read, in words, or None when it can."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop (the link points back to itself); point to the real file."
        if err.errno == errno.EACCES:
            return "permission denied on a folder above it; fix its permissions or copy the file."
        return "file not found."
    if path.is_dir():
        return "a folder, not a file; point to a .jsonl/.json/.csv/.parquet file inside it."
    if not os.access(path, os.R_OK):
        return "not readable (permission denied); fix its permissions (chmod u+r) or copy the file."
    return None


BUNDLED_DATA = "pkg://sftlab/resources/"


def _check_data_mix(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    """Your training data with the bundled ISO-date validation/test sets (`data.train_path=...` without
    `data=jsonl`) would early-stop and report on a task you are not training: refuse, naming the fix.
    Training without any validation split has no best checkpoint and no early stopping: refuse before anything
    loads."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return
    train, val, test = (data.get(f"{s}_path") for s in ("train", "val", "test"))
    bundled = [
        f"data.{s}_path"
        for s, v in (("val", val), ("test", test))
        if isinstance(v, str) and v.startswith(BUNDLED_DATA)
    ]
    train_reported = any(p.startswith("data.train_path=") for p in problems)  # one problem per key
    if isinstance(train, str) and not train.startswith(BUNDLED_DATA) and bundled and not train_reported:
        problems.append(
            f"data.train_path={train!r} is your data but {' and '.join(bundled)} still point to the bundled "
            f"ISO-date sets ({origin.where('data.train_path')}): add data=jsonl (validation held out from "
            "your data, no test set) or set data.val_path / data.test_path to your own files."
        )
    if (
        origin.config_name == "train"
        and val is None
        and not data.get("val_fraction")
        and not data.get("val_size")
    ):
        problems.append(
            f"data.val_path=null and data.val_fraction={data.get('val_fraction')!r} "
            f"({origin.where('data.val_fraction')}): training needs a validation split (best checkpoint, "
            "early stopping). Set data.val_path=<file> or data.val_fraction=0.05."
        )


def _check_loggers(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    """Every logger switched off (`logger.csv=null`) leaves Lightning's LearningRateMonitor nothing to log to,
    and it would stop the run at the first step: say so before anything loads."""
    loggers, callbacks = cfg.get("logger"), cfg.get("callbacks")
    if origin.config_name != "train" or not isinstance(callbacks, DictConfig):
        return
    if isinstance(loggers, DictConfig) and any(v is not None for v in loggers.values()):
        return
    monitors = [
        name
        for name, c in callbacks.items()
        if isinstance(c, DictConfig) and str(c.get("_target_", "")).endswith(".LearningRateMonitor")
    ]
    for name in monitors:
        problems.append(
            f"callbacks.{name} ({origin.where(f'callbacks.{name}')}): logs the learning rate, but every "
            "logger is off. Keep a logger (logger=csv writes csv/metrics.csv, which sftlab-report reads) or "
            f"switch this callback off too: callbacks.{name}=null."
        )


def streaming_problems(data: Mapping[str, Any], trainer: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """With `data.streaming=true`: (key, problem) for each setting a stream cannot honour (docs/streaming.md).
    `trainer`: None where it is not known (the datamodule built on its own)."""
    val_size = data.get("val_size", 0)
    if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 0:
        return [("data.val_size", "must be an integer >= 0 (rows).")]
    if data.get("streaming") is not True:
        if val_size:
            why = "holds out the first rows of a stream; without data.streaming=true use data.val_fraction"
            return [("data.val_size", f"{why}.")]
        return []
    out = []
    if val_size and data.get("val_path") is not None:
        out.append(("data.val_size", "gives a validation split and so does data.val_path: keep one of them."))
    buffer = data.get("shuffle_buffer", 1000)
    if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 0:
        out.append(("data.shuffle_buffer", "must be an integer >= 0 (rows; 0 or 1: the source order)."))
    if data.get("val_fraction"):
        out.append(
            (
                "data.val_fraction",
                "a fraction of a stream of unknown length cannot be held out: set data.val_size=<rows> (the "
                "first rows held out) or data.val_path (a separate source), and data.val_fraction=0.",
            )
        )
    refused = {
        "dedupe": "finding duplicates across a stream needs every row seen; dedupe the data beforehand",
        "group_by_length": "length grouping sorts the whole split; use data.packing=true instead",
        "audit": "the audit reads the whole data; run sftlab-data audit on a sample beforehand",
    }
    for key, why in refused.items():
        if data.get(key):
            out.append((f"data.{key}", f"not with data.streaming=true ({why}); set data.{key}=false."))
    if data.get("num_workers"):
        out.append(
            (
                "data.num_workers",
                "a stream is read in the training process (its position goes into checkpoints); set "
                "data.num_workers=0.",
            )
        )
    train = data.get("train_path")
    if isinstance(train, Sequence) and not isinstance(train, str):
        weights = [s.get("weight", 1) for s in train if isinstance(s, Mapping)]
        if any(w != 1 for w in weights):
            out.append(
                (
                    "data.train_path",
                    "mixture weights are not applied to a stream (its sources are read one after the "
                    "other); drop the weights, or set data.streaming=false.",
                )
            )
    if trainer is not None:
        steps = trainer.get("max_steps")
        if not (isinstance(steps, int) and steps >= 1):
            out.append(
                (
                    "trainer.max_steps",
                    f"is {steps!r}; a stream has no length, so the run, its learning-rate schedule and its "
                    "progress are counted in optimizer steps: set trainer.max_steps=<steps>.",
                )
            )
        every = trainer.get("val_check_interval")
        if not (isinstance(every, int) and not isinstance(every, bool)) and every != 1.0:
            out.append(
                (
                    "trainer.val_check_interval",
                    f"is {every!r}; a fraction of an epoch has no meaning for a stream: set it to a number "
                    "of micro-batches (an integer, e.g. 200), or 1.0 (only when the stream ends).",
                )
            )
    return out


def _check_streaming(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    data, trainer = cfg.get("data"), cfg.get("trainer")
    if not isinstance(data, DictConfig):
        return
    for key, problem in streaming_problems(data, trainer if isinstance(trainer, DictConfig) else None):
        problems.append(
            f"{key} ({origin.where(key)}; data.streaming=true in {origin.where('data.streaming')}): {problem}"
        )


def _check_devices(cfg: DictConfig, origin: Origin, problems: list[str]) -> None:
    """More CPU processes than cores multiplies the global batch and slows every step, never what was meant:
    on CPU, `trainer.devices` is a number of processes, each with its own batch."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return
    devices, accelerator = trainer.get("devices"), trainer.get("accelerator")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _cuda_available())
    cores = os.cpu_count() or 1
    if on_cpu and isinstance(devices, int) and not isinstance(devices, bool) and devices > cores:
        problems.append(
            f"trainer.devices={devices} ({origin.where('trainer.devices')}): on CPU each device is a process "
            f"with its own batch of data.batch_size, and this machine has {cores} cores. Use "
            f"trainer.devices<={cores} (1 for one process using every core)."
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(cfg: DictConfig, origin: Origin | None = None) -> None:
    """Raise one ConfigError listing every problem. `origin`: where Hydra composed `cfg` from; by default the
    running Hydra app's own record of it, outside an app the shipped config with no option choices known."""
    if origin is None:
        origin = Origin.from_hydra(HydraConfig.get()) if HydraConfig.initialized() else Origin.shipped()
    problems: list[str] = []
    _check_top_level(cfg, origin, problems)
    _check_model(cfg, origin, problems)
    _walk("", cfg, origin, problems)
    _check_rules(cfg, origin, problems)
    _check_paths(cfg, origin, problems)
    problems += device_problems(cfg, origin)
    _check_data_mix(cfg, origin, problems)
    _check_loggers(cfg, origin, problems)
    _check_streaming(cfg, origin, problems)
    _check_devices(cfg, origin, problems)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid configuration ({len(problems)} problem(s)):\n{listing}")


# ---- devices, strategies and kernels ---------------------------------------------------------------------
# Attention implementations that keep packed examples apart: eager, SDPA and flex build a block-diagonal
# mask from the restarting position ids (transformers' masking_utils); flash-attention runs varlen kernels on
# the packed rows flattened into one (sftlab.model.forward). Anything else (paged, hub kernels) would let
# one example attend to another.
PACKING_ATTENTION = ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def _strategy(cfg: DictConfig) -> str:
    """The trainer strategy's registry name or class name, lower case ("" for the default)."""
    node = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if isinstance(node, DictConfig):
        return str(node.get("_target_", "")).rsplit(".", 1)[-1].lower()
    return str(node or "").lower()


def _strategy_label(cfg: DictConfig) -> str:
    """The strategy as the config gives it, for messages."""
    node = OmegaConf.select(cfg, "trainer.strategy", default=None)
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else str(node)


def _deepspeed_stage(cfg: DictConfig, strategy: str) -> int | None:
    if "deepspeed" not in strategy:
        return None
    node = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if isinstance(node, DictConfig):
        return int(node.get("stage", 2))
    digits = [c for c in strategy.removeprefix("deepspeed_stage_")[:1] if c.isdigit()]
    return int(digits[0]) if digits else 2


def device_problems(cfg: DictConfig, origin: Origin, cuda_available: bool | None = None) -> list[str]:
    """Choices that cannot run together, each naming its keys. `cuda_available=None` (config validation, on
    any machine): only what `trainer.accelerator=cpu` rules out; True/False (preflight): what this machine
    can do."""
    problems: list[str] = []
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    strategy, label = _strategy(cfg), _strategy_label(cfg)
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="auto"))
    attention = str(OmegaConf.select(cfg, "model.attn_implementation", default=None) or "auto")
    adapter = str(OmegaConf.select(cfg, "adapter._target_", default="")).rsplit(".", 1)[-1]
    no_cuda = accelerator == "cpu" or (cuda_available is False and accelerator in ("auto", "gpu", "cuda"))
    why = (
        "trainer.accelerator=cpu"
        if accelerator == "cpu"
        else f"trainer.accelerator={accelerator} and this machine has no CUDA device"
    )

    def at(key: str) -> str:
        return f"{key} ({origin.where(key)})"

    if no_cuda:
        if "fsdp" in strategy or "deepspeed" in strategy:
            name = "FSDP" if "fsdp" in strategy else "DeepSpeed"
            problems.append(
                f"{at('trainer.strategy')}={label} with {why}: {name} needs CUDA GPUs. On CPUs use "
                "trainer=ddp trainer.accelerator=cpu (gloo), or run on a GPU machine."
            )
        if precision in ("16-mixed", "16"):
            problems.append(
                f"{at('trainer.precision')}={precision} with {why}: fp16 autocast needs a GPU. Use "
                "trainer.precision=bf16-mixed (or auto, or 32) on CPUs."
            )
        if attention.startswith("flash_attention"):
            problems.append(
                f"{at('model.attn_implementation')}={attention} with {why}: flash-attention kernels need a "
                "CUDA GPU. Use model.attn_implementation=sdpa."
            )
        if cuda_available is False and accelerator in ("gpu", "cuda") and not problems:
            problems.append(
                f"{at('trainer.accelerator')}={accelerator}: no CUDA device is visible "
                "(torch.cuda.is_available() is False). Use trainer=cpu or trainer.accelerator=auto."
            )
    quantized = adapter in ("QLoRA", "LoRA8bit")
    stage = _deepspeed_stage(cfg, strategy)
    if quantized and stage == 3:
        problems.append(
            f"{at('adapter')}={adapter} with {at('trainer.strategy')}={label}: ZeRO stage 3 partitions "
            "parameters, and a base model bitsandbytes quantized before the strategy sees it cannot be "
            "partitioned. Use trainer=deepspeed (stage 2), or trainer=fsdp with adapter=qlora "
            "adapter.quant_storage=bfloat16."
        )
    if quantized and "fsdp" in strategy:
        storage = OmegaConf.select(cfg, "adapter.quant_storage", default=None)
        compute = OmegaConf.select(cfg, "adapter.compute_dtype", default=None)
        if adapter == "LoRA8bit":
            problems.append(
                f"{at('adapter')}=LoRA8bit with {at('trainer.strategy')}={label}: FSDP cannot shard 8-bit "
                "bitsandbytes weights. Use adapter=qlora adapter.quant_storage=bfloat16, or trainer=ddp."
            )
        elif storage != compute:
            problems.append(
                f"{at('adapter.quant_storage')}={storage} with {at('trainer.strategy')}={label}: FSDP "
                "flattens each unit's weights into one tensor of one dtype, so the 4-bit weights must be "
                f"stored in the compute dtype: set adapter.quant_storage={compute}."
            )
    packing = OmegaConf.select(cfg, "data.packing", default=False)
    if packing is True and attention not in PACKING_ATTENTION:
        problems.append(
            f"{at('data.packing')}=true with {at('model.attn_implementation')}={attention}: that attention "
            f"cannot keep packed examples apart. Use one of {', '.join(PACKING_ATTENTION)}, or "
            "data.packing=false."
        )
    return problems


def check_devices(cfg: DictConfig, origin: Origin | None = None) -> None:
    """`device_problems` for this machine (it imports torch, so it runs in preflight, not in validation)."""
    import torch

    if origin is None:
        origin = Origin.from_hydra(HydraConfig.get()) if HydraConfig.initialized() else Origin.shipped()
    problems = device_problems(cfg, origin, torch.cuda.is_available())
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid configuration for this machine ({len(problems)} problem(s)):\n{listing}")
