"""Validate a composed config before anything heavy loads, reporting every problem at once.

The schema of an option is the signature of the class or function its `_target_` names: a key that the target
does not accept is a typo (`+adapter.rank=8`, `optimizer.betas1=...` in a YAML), and a value whose type
contradicts a simple annotation (int, float, bool, str) is rejected without coercion. Options without a
`_target_` (the model group) are checked against the union of keys their YAML files define. Ranges and
choices that no signature can express live in RULES. Each problem names the key, the value given, the file
it comes from, and what is allowed.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from sftlab import paths
from sftlab.errors import ConfigError, SFTLabError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
TOP_LEVEL_EXTRA = {"optimized_metric"}
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
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.truncation": ("truncate", "drop"),
    "data.train_on": ("all_assistant", "last_assistant", "all"),
    "scheduler.kind": ("cosine", "linear", "constant"),
}


def _where(key: str, choices: dict[str, str]) -> str:
    group = key.split(".")[0]
    option = choices.get(group)
    if option and (CONF_DIR / group / f"{option}.yaml").is_file():
        return f"conf/{group}/{option}.yaml or the command line"
    return "conf/train.yaml, an experiment or the command line"


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


def _signature(target: str) -> tuple[set[str] | None, dict[str, Any]]:
    """Accepted keyword names (None: accepts **kwargs) and type hints of a `_target_`."""
    obj = get_method(target)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(obj).parameters
    names = None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set(params)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references in third-party code: skip type checks
        hints = {}
    return names, hints


def _check_target_node(path: str, node: DictConfig, choices: dict[str, str], problems: list[str]) -> None:
    target = node["_target_"]
    try:
        names, hints = _signature(target)
    except (ImportError, AttributeError, ValueError) as err:
        problems.append(f"{path}._target_={target!r} ({_where(path, choices)}): cannot be imported ({err}).")
        return
    for key in node:
        if key in HYDRA_KEYS:
            continue
        full = f"{path}.{key}"
        if names is not None and key not in names:
            allowed = ", ".join(sorted(names - {"self"}))
            problems.append(f"{full}: unknown key ({_where(full, choices)}); {target} accepts: {allowed}.")
            continue
        value = OmegaConf.select(node, str(key))
        accepted = _simple_type(hints.get(key))
        if accepted and value is not None and not isinstance(value, DictConfig | ListConfig):
            bad_bool = isinstance(value, bool) and bool not in accepted
            if bad_bool or not isinstance(value, accepted):
                problems.append(
                    f"{full}={value!r} ({_where(full, choices)}): must be of type "
                    f"{' or '.join(t.__name__ for t in accepted)}, got {type(value).__name__}."
                )


def _walk(path: str, node: Any, choices: dict[str, str], problems: list[str]) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target_node(path, node, choices, problems)
        for key in node:
            if key not in HYDRA_KEYS:
                _walk(f"{path}.{key}" if path else str(key), node[key], choices, problems)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _walk(f"{path}[{i}]", item, choices, problems)


def _yaml_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.yaml"):
        keys |= {str(k) for k in OmegaConf.load(file) if k != "defaults"}
    return keys


def _check_model(cfg: DictConfig, choices: dict[str, str], problems: list[str]) -> None:
    allowed = _yaml_keys(CONF_DIR / "model") | {"allow_cpu"}
    for key in cfg.get("model") or {}:
        if key not in allowed:
            problems.append(
                f"model.{key}: unknown key ({_where('model', choices)}); "
                f"allowed: {', '.join(sorted(allowed))}."
            )


def _check_top_level(cfg: DictConfig, problems: list[str]) -> None:
    allowed = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | _yaml_keys(CONF_DIR) | TOP_LEVEL_EXTRA
    for key in cfg:
        if key not in allowed:
            problems.append(
                f"{key}: unknown top-level key (a `+{key}=...` typo?); allowed: {', '.join(sorted(allowed))}."
            )


def _check_rules(cfg: DictConfig, choices: dict[str, str], problems: list[str]) -> None:
    reported = {p.split("=")[0].split(":")[0] for p in problems}
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if (
            key not in reported
            and value != "__absent__"
            and not (ok(value) and not (isinstance(value, float) and math.isnan(value)))
        ):
            problems.append(f"{key}={value!r} ({_where(key, choices)}): must be {allowed}.")
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and value not in options:
            problems.append(f"{key}={value!r} ({_where(key, choices)}): must be one of {', '.join(options)}.")


def _check_paths(cfg: DictConfig, choices: dict[str, str], problems: list[str]) -> None:
    for split in ("train", "val", "test"):
        key = f"data.{split}_path"
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or not (value.endswith(DATA_SUFFIXES) or value.startswith("pkg://")):
            continue  # null, a hub dataset id or a list: checked when the data loads
        try:
            exists = Path(paths.resolve(value, key=key)).is_file()
        except SFTLabError:
            exists = False
        if not exists:
            problems.append(f"{key}={value!r} ({_where(key, choices)}): file not found.")


def validate(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    """Raise one ConfigError listing every problem; `choices` maps group -> option (Hydra runtime.choices)."""
    choices = dict(choices or {})
    problems: list[str] = []
    _check_top_level(cfg, problems)
    _check_model(cfg, choices, problems)
    _walk("", cfg, choices, problems)
    _check_rules(cfg, choices, problems)
    _check_paths(cfg, choices, problems)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid configuration ({len(problems)} problem(s)):\n{listing}")
