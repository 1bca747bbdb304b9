"""Choosing a sweep plugin without the `sweeps` extra names the extra (checked for real by check-floors)."""

from __future__ import annotations

import pytest

from sftlab.cli import plugins


@pytest.mark.parametrize(
    ("arg", "needs"),
    [
        ("hparams_search=optuna", "the Optuna sweeper"),
        ("hydra/launcher=local_parallel", "the joblib launcher"),
        ("+hydra/launcher=slurm", "the submitit launcher"),
    ],
)
def test_a_missing_plugin_names_the_extra(arg, needs):
    error = plugins.missing(["optimizer.lr=1e-4", arg], installed=lambda module: False)
    assert error == (
        f"{arg.lstrip('+')} needs {needs}, which comes with sftlab's sweeps extra: pip install "
        "'sftlab[sweeps]' (in a checkout: pip install -e '.[sweeps]', or make install)"
    )


def test_installed_plugins_and_other_overrides_pass():
    assert plugins.missing(["hparams_search=optuna", "hydra/launcher=slurm", "adapter.r=8"]) is None
    assert plugins.missing(["optimizer.lr=1e-4"], installed=lambda module: False) is None
