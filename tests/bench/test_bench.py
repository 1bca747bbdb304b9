"""sftlab-bench: the arithmetic behind its figures, and a 2-step run of every runner on the tiny model.

No timing is asserted anywhere: speed is what the benchmark prints, never what a test checks.
"""

from __future__ import annotations

import argparse
import tempfile

import pytest
import torch

from sftlab.bench import peers, run
from sftlab.bench.hardware import FlopModel, flop_model
from sftlab.bench.ours import run_sftlab
from sftlab.bench.report import RATIO_TARGETS, summarize, targets
from sftlab.bench.run import _portable, main, parse_args, plan, pooled
from sftlab.bench.stats import Record, Step, batch_counts, example_lengths, median_rate, padding_efficiency
from sftlab.data.tokenize import IGNORE_INDEX

X = IGNORE_INDEX


def test_step_flops_counts_frozen_trainable_head_and_causal_attention():
    fm = FlopModel(frozen=100, trainable=10, head=50, layers=2, attn_dim=8)
    # 7 tokens, 3 targets, examples of 4 and 3 tokens: pairs = 4*5 + 3*4 = 32
    expected = (4 * 100 + 6 * 10) * 7 + 4 * 50 * 3 + 6 * 8 * 32 * 2
    assert fm.step_flops(tokens=7, targets=3, pairs=32) == expected


def test_flop_model_splits_parameters_by_role(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    fm = flop_model(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert fm.trainable == lora > 0
    assert fm.head == 49152 * 64  # tied embedding = head, counted once, as the head
    assert fm.frozen + fm.trainable + fm.head == sum(p.numel() for p in model.parameters())
    assert (fm.layers, fm.attn_dim) == (2, 64)


def test_step_shapes_cover_every_decoder_linear_forward_and_backward(tiny_model):
    """The shapes bench multiplies each frozen decoder linear once forward and once for its input's gradient:
    4 FLOPs per weight per token, as the flop model counts frozen weights; the meta skeleton of the config
    has the loaded model's linears."""
    from sftlab.bench.shapes import skeleton, step_shapes

    shapes = step_shapes(tiny_model, tokens=7)
    assert sorted(step_shapes(skeleton(tiny_model.config), tokens=7)) == sorted(shapes)
    linears = sum(
        m.weight.numel()
        for n, m in tiny_model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers" in n
    )
    assert sum(2 * m * k * n * count for m, k, n, count in shapes) == 4 * linears * 7


def test_step_shapes_follow_the_models_own_layout():
    """Falcon: one fused query-key-value projection (multi-query: 64 -> 64 + 2 x 16) and a two-matrix MLP,
    not the q, k, v, o, gate, up, down of a Llama."""
    from transformers import FalconConfig

    from sftlab.bench.shapes import skeleton, step_shapes

    config = FalconConfig(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, multi_query=True
    )
    forward = {(k, n, count) for m, k, n, count in step_shapes(skeleton(config), tokens=7)[::2]}
    assert forward == {(64, 96, 2), (64, 64, 2), (64, 256, 2), (256, 64, 2)}


def test_batch_counts_padded():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "labels": torch.tensor([[X, X, 7, 8], [X, 6, X, X]]),
    }
    # 6 non-pad tokens, 3 targets, 8 computed, pairs 4*5 + 2*3, no shared prefix
    assert batch_counts(batch) == (6, 3, 8, 26, 0)


def test_batch_counts_a_shared_prompt_prefix_once():
    from sftlab.bench.hardware import FlopModel
    from sftlab.bench.report import _efficiency

    prompt = list(range(10, 30))  # 20 tokens every row starts with, none of them a target
    batch = {
        "input_ids": torch.tensor([[*prompt, 1, 2, 3], [*prompt, 4, 5, 0], [*prompt, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 23, [1] * 22 + [0], [1] * 21 + [0, 0]]),
    }
    batch["labels"] = torch.where(torch.arange(23) >= 21, batch["input_ids"], X).masked_fill(
        batch["attention_mask"] == 0, X
    )
    tokens, targets, computed, pairs, repeated = batch_counts(batch)
    assert (tokens, targets, computed, repeated) == (66, 3, 69, 2 * 20)  # the prefix counted once: 26 tokens
    assert pairs == 23 * 24 + 22 * 23 + 21 * 22 - 2 * 20 * 21
    # model FLOPs per second: the tokens computed once, not the 66 the rows hold
    fm = FlopModel(frozen=10, trainable=1, head=0, layers=1, attn_dim=1)
    step = Step(tokens, targets, computed, pairs, repeated, seconds=1.0)
    rate = _efficiency(fm, [step], {"bf16_gflops": 1.0})["model_gflops"] * 1e9
    assert rate == fm.step_flops(26, targets, pairs)


def test_batch_counts_packed_and_padding_free():
    packed = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
        "labels": torch.tensor([[X, 2, 3, X, 5, X]]),
    }
    assert example_lengths(packed) == [3, 2]
    assert batch_counts(packed) == (5, 3, 6, 3 * 4 + 2 * 3, 0)
    flat = {k: v[:, :5] for k, v in packed.items() if k != "attention_mask"}  # TRL padding_free: no mask
    assert batch_counts(flat) == (5, 3, 5, 18, 0)


def test_padding_efficiency_and_median_rate():
    steps = [
        Step(90, 10, 100, 0, seconds=1.0),
        Step(60, 6, 100, 0, seconds=2.0),
        Step(100, 50, 200, 0, seconds=4.0),
    ]
    assert padding_efficiency(steps) == pytest.approx(250 / 400)
    assert median_rate(steps) == 30.0  # rates 90, 30, 25
    assert median_rate(steps, "targets") == 10.0  # 10, 3, 12.5


def test_targets_are_ratios_of_median_rates():
    recs = [
        Record("iso/sftlab", [Step(300, 30, 300, 0, seconds=1.0)] * 3),
        Record("iso/trl-default", [Step(150, 9, 160, 0, seconds=1.0)]),
        Record("iso/trl-best", [Step(280, 9, 280, 0, seconds=1.0)]),
        Record("iso/bare", [Step(310, 9, 330, 0, seconds=1.0)]),
    ]
    result = {"runs": summarize(recs, warmup=1, peak={"bf16_gflops": 1.0, "fp32_gflops": 1.0})}
    got = {t["what"]: (t["value"] and round(t["value"], 3), t["holds"]) for t in targets(result)}
    assert got == {
        "sftlab / TRL defaults": (2.0, True),
        "sftlab / TRL best": (round(300 / 280, 3), False),
        "sftlab / bare loop": (round(300 / 310, 3), True),
        "compute efficiency (bf16 peak)": (None, None),  # no FLOP model recorded: reported, not guessed
    }


def test_default_plan_runs_every_runner_a_target_names(tmp_path):
    args = argparse.Namespace(
        override=[], warmup=3, steps=8, varied_rows=16, gpu_7b=False, only=None, threads=None
    )
    names = [name for name, _, _ in plan(args, tmp_path)]
    assert {n for _, a, b, _ in RATIO_TARGETS for n in (a, b)} <= set(names)
    assert "iso/sftlab-qlora" in names and len(names) == len(set(names))


def test_a_bad_override_stops_the_bench_before_any_runner_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=r"-o data=\[: no viable alternative"):
        main(["--only", "data-scale", "--workdir", str(tmp_path), "-o", "data=["])
    assert not list(tmp_path.iterdir())  # no runner started
    with pytest.raises(SystemExit, match=r"-o data=\[: no viable alternative"):
        main(["--peers", "litgpt", "--workdir", str(tmp_path), "-o", "data=["])


def test_the_scratch_directory_goes_when_the_bench_ends_and_stays_named_when_it_fails(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "bench.json"
    args = ["--only", "--quick", "--out", str(out)]  # no runs: the matmul peak alone
    assert main(args) is None  # what the console script exits with: anything else is a failure status
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]

    def fails(*args, **kwargs):
        raise RuntimeError("a runner failed")

    monkeypatch.setattr(run, "peaks", fails)
    with pytest.raises(RuntimeError, match="a runner failed"):
        main(args)
    (kept,) = tmp_path.glob("sftlab-bench-*")
    assert f"the scratch directory is kept: {kept}" in capsys.readouterr().err
    monkeypatch.undo()
    main([*args, "--workdir", str(tmp_path / "mine")])
    assert (tmp_path / "mine").is_dir() and f"runs and data in {tmp_path / 'mine'}" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--repeat", "0"], ["--scale-rows", "1000", "0"], ["--warmup", "-1"]])
def test_a_count_below_its_least_is_refused_naming_the_option(option, capsys):
    with pytest.raises(SystemExit):
        parse_args(option)
    assert f"argument {option[0]}: {option[-1]} (use an integer >= " in capsys.readouterr().err
    assert parse_args(["--warmup", "0", "--repeat", "1"]).warmup == 0


def test_a_name_only_does_not_know_stops_the_bench_naming_what_it_knows(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit, match=r"unknown data_scale; known: iso/bare, iso/sftlab, .*data-scale"):
        main(["--only", "iso/sftlab", "data_scale", "--quick"])
    assert not list(tmp_path.iterdir())  # nothing ran, nothing left


def test_a_runner_error_reaches_the_parent_with_its_type_and_message():
    from hydra.errors import OverrideParseException

    err = _portable(OverrideParseException(override="x=[", message="no viable alternative"))
    assert type(err) is RuntimeError and str(err) == "OverrideParseException: no viable alternative"
    plain = ValueError("kept as it is")
    assert _portable(plain) is plain


def test_rounds_pool_the_measured_steps_and_drop_each_rounds_warmup():
    def rec(seconds: list[float], peak: float) -> Record:
        steps = [Step(tokens=100, targets=10, pairs=1, computed=100, seconds=t) for t in seconds]
        return Record("iso/sftlab", steps, {"peak_memory_mb": peak, "adapter": "lora"})

    # Round 1 fast, round 2 slowed by a neighbour: warm-up steps (9 s) of both rounds never count.
    (merged,) = pooled({"iso/sftlab": [rec([9, 1, 1, 1], 50), rec([9, 2, 2, 2], 70)]}, warmup=1)
    assert [s.seconds for s in merged.steps] == [9, 1, 1, 1, 2, 2, 2]
    assert merged.extra == {"peak_memory_mb": 70, "adapter": "lora"}
    assert summarize([merged], 1, {})["iso/sftlab"]["step_s"] == 1.5  # the median of both rounds


@pytest.fixture
def spec(tmp_path, tiny_model_dir):
    """32 short generated conversations, max length 64: data preparation and steps stay small."""
    from sftlab.bench.data import varied_conversations, write_jsonl

    path = write_jsonl(varied_conversations(32, max_words=20), tmp_path / "varied.jsonl")
    over = [
        "model=tiny_random",
        f"data.train_path={path}",
        "data.val_path=null",
        "data.test_path=null",
        "data.max_length=64",
    ]
    return {"overrides": over, "workdir": str(tmp_path), "steps": 2}


def test_sftlab_and_bare_loop_train_on_identical_batches(spec):
    ours = Record.from_dict(run_sftlab({**spec, "name": "iso/sftlab"}))
    bare = Record.from_dict(peers.run_bare({**spec, "name": "iso/bare"}))
    assert len(ours.steps) == len(bare.steps) == 2
    strip = [(s.tokens, s.targets, s.computed, s.pairs) for s in ours.steps]
    assert strip == [(s.tokens, s.targets, s.computed, s.pairs) for s in bare.steps]
    assert ours.extra["precision"] == bare.extra["precision"] and ours.extra["flops"] == bare.extra["flops"]
    assert ours.extra["peak_memory_mb"] > 0


def test_packed_rows_fill_max_length(spec):
    rec = Record.from_dict(run_sftlab({**spec, "name": "p", "data": {"packing": True}}))
    for s in rec.steps:
        assert s.computed == 8 * 64  # 8 rows, each packed up to max_length
        assert s.tokens / s.computed > 0.8  # examples of 5-50 tokens fill 64-token rows this well
        assert s.pairs < s.tokens * 64  # attention per example, not per row: n(n+1) summed over examples
    assert rec.extra["data"] == {"packing": True}


def test_trl_best_is_padding_free_and_trains_completions(spec):
    rec = Record.from_dict(peers.run_trl({**spec, "name": "iso/trl-best", "trl": "best"}))
    assert len(rec.steps) == 2
    assert rec.extra["settings"] == {
        "bf16": True,
        "gradient_checkpointing": False,
        "padding_free": True,
        "packing": False,
        "max_length": None,
    }
    for s in rec.steps:
        assert s.computed == s.tokens  # one flattened row: nothing padded
        # completions only: the answer repeats the question's words, the prompt adds the instruction
        assert 8 <= s.targets < s.tokens / 2


def test_data_audit_figure_is_timed_and_printed(tmp_path, tiny_model_dir):
    from sftlab.bench.audit import data_audit
    from sftlab.bench.report import render

    audit = data_audit({"overrides": ["model=tiny_random"], "workdir": str(tmp_path), "rows": 200})
    assert audit["rows"] == 200 and audit["seconds"] == pytest.approx(
        audit["read_s"] + audit["audit_s"], abs=0.02
    )
    assert set(audit["duplicates"]) == {"train", "val"}  # 5 % held out, so contamination is measured too
    peak = {"n": 8, "fp32_gflops": 1.0, "bf16_gflops": 1.0}
    machine = {"cpu": "cpu", "cpu_threads": 2}
    text = render(
        {"date": "d", "machine": machine, "warmup": 1, "steps": 1, "peak": peak, "data_audit": audit}
    )
    assert "data audit (sftlab-data audit's analysis): 200 alpaca rows in" in text


def test_one_table_carries_every_figure_and_the_history_row():
    from sftlab.bench.report import figures, history_row, render_figures

    steps = [Step(tokens=400, targets=80, pairs=1, computed=440, seconds=1.0, cpu_seconds=2.0)] * 3
    result = {
        "date": "2026-12-01 15:00 UTC",
        "machine": {"cpu": "EPYC", "cpu_threads": 2},
        "commit": "abc1234",
        "command": "sftlab-bench --repeat 2",
        "runs": summarize([Record("iso/sftlab", steps, {})], 1, {}),
        "targets": [{"what": "sftlab / bare loop", "value": 1.1, "threshold": 0.95, "holds": True}],
        "data_prep": {"rows": 500, "rows_per_s": 9000.0, "reload_s": 0.12},
        "data_scale": [{"rows": 2000, "rows_per_s": 5000.0, "peak_rss_mb": 700.0}],
        "data_scale_quick": True,
        "data_audit": {"rows": 500, "rows_per_s": 3000.0},
        "loss_memory": [
            {"targets": 512, "chunk_size": 1024, "peak_growth_mib": 400.0, "loss": 11.7},
            {"targets": 512, "chunk_size": None, "skipped": "needs about 1 GiB"},
        ],
        "first_step": {"seconds": 8.74},
        "cli_latency_s": {"help": 1.25, "cfg_job": 1.5, "completion": 1.0},
    }
    table = {f: v for f, v, _ in figures(result)}
    assert table == {
        "iso/sftlab tok/s": "400",
        "iso/sftlab % of bf16 peak": "-",
        "sftlab / bare loop": "1.10",
        "data prep rows/s": "9000",
        "cached reload s": "0.12",
        "data scale 2000 rows/s": "5000",
        "data scale 2000 peak MB": "700",
        "data audit rows/s": "3000",
        "loss memory MiB, 512 targets, chunk 1024": "400",
        "loss memory MiB, 512 targets, chunk none": "needs about 1 GiB",
        "first optimizer step s": "8.7",
        "CLI latency help s": "1.2",
        "CLI latency cfg_job s": "1.5",
        "CLI latency completion s": "1.0",
    }
    assert "(quick setting)" in render_figures(result)
    assert history_row(result) == (
        "| 2026-12-01 15:00 UTC | EPYC, 2 threads | abc1234 | `sftlab-bench --repeat 2` "
        "| 400 | - | - | 1.10 |"
    )
