"""Hydra sweeper and launcher plugins live in the `sweeps` extra; choosing one without it gets one clear line
instead of Hydra's "Could not find 'hydra/launcher/joblib'" and a list of config options."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

INSTALL = "pip install 'sftlab[sweeps]' (in a checkout: pip install -e '.[sweeps]', or make install)"

# command-line choice -> (the plugin's module, what it is)
_OPTUNA = ("hydra_plugins.hydra_optuna_sweeper", "the Optuna sweeper")
_JOBLIB = ("hydra_plugins.hydra_joblib_launcher", "the joblib launcher")
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "the submitit launcher")
PLUGINS = {
    "hparams_search=optuna": _OPTUNA,
    "hydra/sweeper=optuna": _OPTUNA,
    "hydra/launcher=local_parallel": _JOBLIB,
    "hydra/launcher=joblib": _JOBLIB,
    "hydra/launcher=slurm": _SUBMITIT,
    "hydra/launcher=submitit_slurm": _SUBMITIT,
    "hydra/launcher=submitit_local": _SUBMITIT,
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the hydra_plugins namespace itself is absent
        return False


def missing(argv: Sequence[str], installed: Callable[[str], bool] = _installed) -> str | None:
    """The error for the first override in `argv` whose plugin is not installed, else None."""
    for arg in argv:
        choice = arg.lstrip("+~")
        if choice in PLUGINS and not installed(PLUGINS[choice][0]):
            return f"{choice} needs {PLUGINS[choice][1]}, which comes with sftlab's sweeps extra: {INSTALL}"
    return None


def require_for_command_line(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a `@hydra.main` function: checks the command line for plugin choices before Hydra composes."""

    @functools.wraps(main)
    def checked(*args: Any, **kwargs: Any) -> Any:
        error = missing(sys.argv[1:])
        if error:
            sys.exit(f"Error: {error}")
        return main(*args, **kwargs)

    return checked
