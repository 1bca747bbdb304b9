"""`key=value` command lines for the small CLIs (merge, serve), with the feel of `python train.py key=value`.

The arguments are merged onto a dataclass schema, so an unknown key or a badly typed value is refused with
one message instead of being ignored. Not Hydra apps: these commands write no output directory of their own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sftlab.errors import ConfigError

T = TypeVar("T")


def parse(schema: type[T], argv: Sequence[str] | None = None, *, prog: str) -> T:
    """Parse `key=value` arguments (Hydra override syntax for plain values) into an instance of `schema`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        shown = {k: "required" if v == "???" else repr(v) for k, v in _defaults(schema).items()}
        print(f"usage: {prog} " + " ".join(f"{k}=<{v}>" for k, v in shown.items()))
        print(schema.__doc__ or "")
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"{prog}: expected key=value arguments, got {bad[0]!r}. Try `{prog} --help`.")
    try:
        overrides = OmegaConf.from_dotlist([a.lstrip("+") for a in argv])
        cfg = OmegaConf.merge(OmegaConf.structured(schema), overrides)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{prog}: {str(err).splitlines()[0]}. Try `{prog} --help` for the keys.") from None


def _defaults(schema: type) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(schema))
