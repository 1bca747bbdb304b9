"""Every command line in README.md and docs/*.md is checked, so the docs cannot drift from the code.

A command line is a `python train.py ...`, `sftlab-<command> ...`, `python -m sftlab.bench.*`, or
`make train|bench ARGS=...` line in a bash/sh/console code block (console: the `$ ` lines), or an inline code
span with arguments. Nothing is run: Hydra commands (train, inspect, eval, bench `-o`) compose with their
overrides, sweep values one at a time, and the train config passes sftlab's validation (except that the
user's own data files need not exist); the key=value commands (chat, serve, merge) and the flag commands
(report, bench, profile) parse their arguments with the command's own parser.

Markers, written as a trailing shell comment so a reader sees them:
  `# not checked: <why>`  the line cannot be checked here (it needs a directory of the user's own);
  `# invalid on purpose`  the line shows an error: it must be rejected.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import itertools
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sftlab import build
from sftlab.config import validate
from sftlab.errors import ConfigError, SFTLabError
from tests.conftest import ROOT

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell"}
SKIP_MARKER = re.compile(r"#\s*not checked:\s*\S")
INVALID_MARKER = "# invalid on purpose"
NAMES = ("train", "eval", "inspect", "chat", "serve", "merge", "report", "bench", "data", "synth", "review")
SCRIPTS = {f"sftlab-{name}": name for name in NAMES}
MODULES = {"sftlab.bench.run": "bench", "sftlab.bench.profile": "profile"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"|", "||", "&", "&&", ";"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun"}
HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--resolve", "--shell-completion", "-sc"}
RUN_DIR = "/nonexistent/sftlab-docs-check"
# Overrides that need a Hydra plugin of the `sweeps` extra (installed by `make install`).
PLUGINS = {
    "hparams_search=optuna": "hydra_plugins.hydra_optuna_sweeper",
    "hydra/launcher=local_parallel": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
}
HYDRA_CONFIG_DIR_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn"}


class DocError(Exception):
    """A documented command line that does not compose or parse."""


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # the command line as written
    kind: str  # train, eval, inspect, chat, serve, merge, report, bench, profile
    argv: tuple[str, ...]
    inline: bool

    @property
    def skipped(self) -> bool:
        return bool(SKIP_MARKER.search(self.text))

    @property
    def invalid(self) -> bool:
        return INVALID_MARKER in self.text


# ---- extraction ------------------------------------------------------------------------------------------
def code_lines(markdown: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, inline?) of every candidate: shell block lines (continuations joined), console
    `$ ` lines, and inline code spans outside code blocks (which may wrap over lines)."""
    lines = markdown.splitlines()
    prose: list[tuple[int, str]] = []
    fence, lang, pending, pending_at = None, "", "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, lang = stripped[:3], stripped[3:].strip().split(" ")[0].lower()
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
                continue
            if lang == "console":
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:]
            elif lang not in SHELL_BLOCKS:
                continue
            if not pending:
                pending_at = number
            pending += stripped
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            yield pending_at, pending, False
            pending = ""
            continue
        prose.append((number, line))
    text = "\n".join(line for _, line in prose)
    starts = list(itertools.accumulate((len(line) + 1 for _, line in prose), initial=0))
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        index = bisect.bisect_right(starts, match.start()) - 1
        span = match.group(1).replace("\n", " ").replace("\\|", "|").strip()
        yield prose[index][0], span, True


def tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def segments(words: list[str]) -> Iterator[list[str]]:
    """Simple commands of a shell line, split at pipes and separators; leading VAR=value dropped."""
    current: list[str] = []
    for word in [*words, ";"]:
        if word in SEPARATORS:
            while current and ENV_ASSIGNMENT.match(current[0]):
                current.pop(0)
            if current:
                yield current
            current = []
        else:
            current.append(word)


def _without_redirections(words: list[str]) -> list[str]:
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in REDIRECTS:
            skip = True
        else:
            out.append(word)
    return out


def classify(words: list[str]) -> tuple[str, list[str]] | None:
    """(kind, arguments) when `words` starts a documented sftlab command."""
    words = _without_redirections(words)
    while words and words[0] in ("srun", "nohup", "time"):
        words = words[1:]
    if not words:
        return None
    head = Path(words[0]).name
    if head in SCRIPTS:
        return SCRIPTS[head], words[1:]
    if head.startswith("python") and len(words) > 1:
        if words[1] == "train.py":
            return "train", words[2:]
        if words[1] == "-m" and len(words) > 2 and words[2] in MODULES:
            return MODULES[words[2]], words[3:]
    if head == "make" and len(words) > 1 and words[1] in ("train", "bench"):
        args = [w.partition("=")[2] for w in words[2:] if w.startswith("ARGS=")]
        return words[1], shlex.split(args[0]) if args else []
    return None


def doc_commands(files: list[Path] = DOC_FILES) -> list[DocCommand]:
    found = []
    for path in files:
        lines = sorted(code_lines(path.read_text(encoding="utf-8")), key=lambda hit: hit[0])
        for number, text, inline in lines:
            for words in segments(tokens(text)):
                hit = classify(words)
                # An inline span that is only a command's name names it; it is not a command line.
                if hit and not (inline and not hit[1]):
                    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                    found.append(DocCommand(f"{name}:{number}", text, hit[0], tuple(hit[1]), inline))
    return found


# ---- checks ----------------------------------------------------------------------------------------------
def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Each value of each sweep, the others at their first value: every documented value composes, without
    the product of all of them. An interval (Optuna) is represented by its lower end."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    options: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            options.append([override.input_line])
        elif override.is_interval_sweep():
            options.append([f"{key}={override.value().start}"])
        else:
            options.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    variants = [[values[0] for values in options]]
    for i, values in enumerate(options):
        for value in values[1:]:
            variants.append([*variants[0][:i], value, *variants[0][i + 1 :]])
    return variants


def check_composes(overrides: list[str], config_name: str = "train") -> None:
    # paths.output_dir is Hydra's job directory, which only a running app has; nothing is written there.
    output_dir = RUN_DIR if config_name in ("train", "data_audit") else None
    for variant in sweep_variants(overrides):
        cfg, origin = build.compose_with_origin(variant, output_dir=output_dir, config_name=config_name)
        OmegaConf.to_container(cfg, resolve=True)
        if config_name == "eval_run":
            if OmegaConf.is_missing(cfg, "run"):
                raise DocError("sftlab-eval needs run=<a run directory>")
            continue
        try:
            validate(cfg, origin)
        except ConfigError as err:
            # The user's own data files (my/train.jsonl) need not exist here; everything else must hold.
            problems = [p for p in str(err).splitlines()[1:] if not p.endswith("file not found.")]
            if problems:
                raise DocError("\n".join(problems)) from None


def parsed_by_own_parser(main, argv: list[str]) -> argparse.Namespace:
    """What a command's argparse parser makes of `argv`, stopping before the command does anything."""

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main(argv)
        except Parsed as done:
            return done.args[0]
    raise AssertionError(f"{main.__module__}.main returned without parsing its arguments")


def check_train(argv: list[str]) -> None:
    overrides, words = [], list(argv)
    while words:
        word = words.pop(0)
        if word in HYDRA_CONFIG_DIR_FLAGS:
            raise DocError(f"{word} cannot be composed here: end the line with `# not checked: <why>`")
        if word in HYDRA_FLAGS_WITH_VALUE:
            words.pop(0)
        elif word not in HYDRA_FLAGS:
            overrides.append(word)
    check_composes(overrides)


@functools.cache
def problem(kind: str, argv: tuple[str, ...]) -> str | None:
    """Why the command line `kind argv` would not start, or None. Cached: many pages repeat a line."""
    try:
        check(kind, list(argv))
    except DocError as err:
        return str(err)
    return None


def check(kind: str, argv: list[str]) -> None:
    try:
        if kind == "train":
            check_train(argv)
        elif kind == "eval":
            check_composes([a for a in argv if a not in HYDRA_FLAGS], config_name="eval_run")
        elif kind == "inspect":
            from sftlab.cli.inspect import split_args

            check_composes(split_args(argv)[1])
        elif kind in ("chat", "serve", "merge"):
            from sftlab.cli import chat, merge, serve
            from sftlab.cli.args import parse

            schema = {"chat": chat.ChatArgs, "serve": serve.ServeArgs, "merge": merge.MergeArgs}[kind]
            parse(schema, argv, prog=f"sftlab-{kind}")
        elif kind == "data":
            from sftlab.cli.data import COMMANDS as DATA_COMMANDS
            from sftlab.cli.data import quote_checks

            if not argv or argv[0] not in DATA_COMMANDS:
                raise DocError(f"sftlab-data needs a subcommand among {DATA_COMMANDS}")
            check_composes([quote_checks(a) for a in argv[1:]], config_name="data_audit")
        elif kind in ("synth", "review"):
            from sftlab.cli.args import parse
            from sftlab.cli.review import ReviewArgs
            from sftlab.eval.synth import SynthSettings

            schema = {"synth": SynthSettings, "review": ReviewArgs}[kind]
            parse(
                schema, [a for a in argv if not (kind == "review" and a == "summary")], prog=f"sftlab-{kind}"
            )
        elif kind == "report":
            from sftlab.cli import report

            parsed_by_own_parser(report.main, argv)
        elif kind == "bench":
            from sftlab.bench import run

            check_composes(run.parse_args(argv).override)
        elif kind == "profile":
            from sftlab.bench import profile

            check_composes(parsed_by_own_parser(profile.main, argv).override)
        else:
            raise AssertionError(f"no check for {kind}")
    except (HydraException, OmegaConfBaseException, SFTLabError) as err:
        raise DocError(str(err)) from None
    except SystemExit as err:
        if err.code not in (0, None):  # argparse's error exit; --help exits 0
            raise DocError(f"the command's parser refused it (exit {err.code})") from None


COMMANDS = doc_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.kind}" for c in COMMANDS])
def test_documented_command_composes_or_parses(command):
    if command.skipped:
        pytest.skip(f"{command.where}: marked not checked")
    for override in set(command.argv) & PLUGINS.keys():
        pytest.importorskip(PLUGINS[override], reason=f"{override} needs the sweeps extra")
    why = problem(command.kind, command.argv)
    if command.invalid:
        assert why, f"{command.where}: `{command.text}` is marked invalid on purpose, but it is accepted"
    elif why:
        pytest.fail(f"{command.where}: `{command.text}` does not work:\n{why}", pytrace=False)


def test_every_command_is_documented():
    kinds = {c.kind for c in COMMANDS if not c.skipped}
    assert kinds == {*NAMES, "profile"}


def test_markers_say_why():
    for c in COMMANDS:
        if "not checked" in c.text:
            assert c.skipped, f"{c.where}: write `# not checked: <why>`"


def test_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python train.py -m adapter.r=8,16` or `sftlab-report` (a name, not a line) or\n"
        "`sftlab-chat run=out/a\nbase=true`.\n"
        "| `sftlab-serve run=a \\| port=1` |\n"
        "```bash\n"
        "A=1 python train.py data=jsonl \\\n"
        "    data.train_path=x.jsonl   # my data\n"
        "printf 'hi' | sftlab-chat run=out/b > log.txt\n"
        'make bench ARGS="--repeat 2"\n'
        "```\n"
        "```console\n"
        "$ sftlab-inspect n=1\n"
        "sftlab-inspect: output, not a command\n"
        "```\n"
        "```python\n"
        "python train.py not=checked\n"
        "```\n",
        encoding="utf-8",
    )
    found = [(c.where.split(":")[1], c.kind, c.argv, c.inline) for c in doc_commands([page])]
    assert found == [
        ("1", "train", ("-m", "adapter.r=8,16"), True),
        ("2", "chat", ("run=out/a", "base=true"), True),
        ("4", "serve", ("run=a",), True),
        ("6", "train", ("data=jsonl", "data.train_path=x.jsonl"), False),
        ("8", "chat", ("run=out/b",), False),
        ("9", "bench", ("--repeat", "2"), False),
        ("12", "inspect", ("n=1",), False),
    ]
