"""`python -m sftlab`: the sftlab commands, one line each.

The list is the installed distribution's console scripts (pyproject `[project.scripts]`), each described by
the first paragraph of its module's docstring, read from the source without importing it (no torch loads).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution


def summary(module: str) -> str:
    """The first paragraph of a module's docstring on one line, after its leading "`usage`: " if any."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return re.sub(r"^`[^:]*: ", "", first)


def commands() -> list[tuple[str, str]]:
    """(command, description) for every console script of the installed sftlab."""
    scripts = [ep for ep in distribution("sftlab").entry_points if ep.group == "console_scripts"]
    return [(ep.name, summary(ep.module)) for ep in sorted(scripts, key=lambda ep: ep.name)]


def main() -> None:
    try:
        listing = commands()
    except PackageNotFoundError:
        sys.exit("sftlab is not installed (no package metadata): `pip install -e .` in the checkout.")
    width = max(len(name) for name, _ in listing)
    print("sftlab commands (each takes --help; `python train.py` in a checkout is sftlab-train):")
    for name, text in listing:
        print(f"  {name:<{width}}  {text}")


if __name__ == "__main__":
    main()
