"""`sftlab-bench --peers`: the data each peer reads, the logs it writes, the reasons a peer did not run,
the merged-checkpoint loading of the judge, and (slow, where `make bench-peers` built its venv) one peer end
to end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from sftlab.bench import frameworks as fw

CONVS = [
    [
        {"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): February 15, 2019"},
        {"role": "assistant", "content": "2019-02-15"},
    ],
    [
        {"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): 2025, June 18"},
        {"role": "assistant", "content": "2025-06-18"},
    ],
]


def _setup(model_dir: Path) -> fw.Setup:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text("{}")
    return fw.Setup(str(model_dir), CONVS, CONVS[:1], 0, 0, "", "")


def test_llamafactory_layout_writes_messages_rows_its_dataset_info_names(tmp_path):
    run = tmp_path / "run"
    fw.FRAMEWORKS["llamafactory"].lay_out(run, _setup(tmp_path / "model"))
    info = json.loads((run / "data" / "dataset_info.json").read_text())["iso_dates"]
    rows = json.loads((run / "data" / info["file_name"]).read_text())
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): February 15, 2019"},
                {"role": "assistant", "content": "2019-02-15"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): 2025, June 18"},
                {"role": "assistant", "content": "2025-06-18"},
            ]
        },
    ]
    assert info["formatting"] == "sharegpt" and info["tags"]["assistant_tag"] == "assistant"
    assert (run / "llamafactory_lora.yaml").is_file()
    assert (run / "models" / fw.MODEL_NAME / "config.json").resolve() == (tmp_path / "model" / "config.json")


def test_litgpt_layout_writes_alpaca_train_and_val(tmp_path):
    run = tmp_path / "run"
    fw.FRAMEWORKS["litgpt"].lay_out(run, _setup(tmp_path / "model"))
    assert json.loads((run / "data" / "train.json").read_text()) == [
        {
            "instruction": "Convert this date to ISO 8601 (YYYY-MM-DD): February 15, 2019",
            "input": "",
            "output": "2019-02-15",
        },
        {
            "instruction": "Convert this date to ISO 8601 (YYYY-MM-DD): 2025, June 18",
            "input": "",
            "output": "2025-06-18",
        },
    ]
    assert len(json.loads((run / "data" / "val.json").read_text())) == 1
    # litgpt reads the model config from the checkpoint directory's name
    assert (run / "checkpoints" / "HuggingFaceTB" / fw.MODEL_NAME / "config.json").exists()


def test_jsonl_layouts_write_one_messages_row_per_line(tmp_path):
    for name in ("torchtune", "axolotl"):
        run = tmp_path / name
        fw.FRAMEWORKS[name].lay_out(run, _setup(tmp_path / "model"))
        lines = (run / "data" / "iso_dates_train.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == [{"messages": c} for c in CONVS]
    assert (tmp_path / "torchtune" / "torchtune_chatml.py").is_file()


def test_alpaca_rows_refuse_a_multi_turn_conversation():
    with pytest.raises(ValueError, match="one user and one assistant turn"):
        fw.alpaca_rows([CONVS[0] + CONVS[1]])


def test_logs_are_read_for_the_training_seconds():
    hf = "{'loss': 0.31, 'epoch': 1.0}\n{'train_runtime': 181.254, 'train_samples_per_second': 4.41}\n"
    assert fw.hf_train_runtime(hf) == 181.254
    assert (
        fw.litgpt_training_time("| Performance\n| - Training Time             :  164.33 s\n| - Tok/sec")
        == 164.33
    )
    bar = (
        "1|50|Loss: 0.9:  50%|#####     | 50/100 [01:05<01:05, 1.3s/it]\r"
        "1|100|Loss: 0.2: 100%|##| 100/100 [02:10<00:00]"
    )
    assert fw.tqdm_elapsed(bar) == 130
    assert fw.tqdm_elapsed("100/100 [1:02:03<00:00]") == 3723
    assert fw.tqdm_elapsed("50/100 [01:05<01:05]") is None
    assert fw.hf_train_runtime("nothing") is None


def test_a_failed_subprocess_is_measured_and_its_reason_is_the_error_line(tmp_path):
    code = (
        "import atexit, sys; atexit.register(print, 'shutting down data workers'); print('loading model'); "
        "sys.stdout.flush(); raise RuntimeError('bf16 requires CUDA')"
    )
    proc = fw.run_process([sys.executable, "-c", code], cwd=tmp_path, log_path=tmp_path / "x.log", timeout=60)
    assert proc.rc == 1 and not proc.timed_out
    assert proc.cpu_s > 0 and proc.peak_rss_mb > 1
    assert fw.failure_reason(proc.log.read_text()) == "RuntimeError: bf16 requires CUDA"


def test_a_process_past_its_time_is_killed(tmp_path):
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = fw.run_process(cmd, cwd=tmp_path, log_path=tmp_path / "x.log", timeout=0.5)
    assert proc.timed_out and proc.rc == -9 and proc.wall_s < 30


def test_a_peer_without_venv_is_a_row_naming_why(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_PEERS_DIR", str(tmp_path / "peers"))
    (tmp_path / "peers" / "axolotl").mkdir(parents=True)
    (tmp_path / "peers" / "axolotl" / "install-error.txt").write_text(
        "Using Python 3.11.7\nerror: No solution found when resolving dependencies\n"
        "  cause: axolotl==0.21.0 depends on Python>=3.12\n"
    )
    setup = _setup(tmp_path / "model")
    rows = []
    for name in ("litgpt", "axolotl"):
        row, trained = fw.run_framework(fw.FRAMEWORKS[name], setup, tmp_path / "work", fw.peers_dir(), 60)
        assert trained == {} and not row.ok
        rows.append(row)
    assert (
        rows[0].note == f"no virtual environment at {tmp_path / 'peers' / 'litgpt'} (run `make bench-peers`)"
    )
    assert rows[1].note == "not installed: error: No solution found when resolving dependencies"
    table = fw.render_table(rows).splitlines()
    assert table[0].startswith("| framework | version | tokens/s | tok/cpu-s |")
    assert table[3] == (
        "| axolotl | 0.21.0 | — | — | — | — | — | did not run: not installed: error: No solution found when "
        "resolving dependencies |"
    )


def test_a_venv_without_the_cli_names_it(tmp_path, monkeypatch):
    venv = tmp_path / "peers" / "llamafactory"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").write_text("llamafactory==0.9.5\n")
    row, _ = fw.run_framework(
        fw.FRAMEWORKS["llamafactory"], _setup(tmp_path / "m"), tmp_path / "w", venv.parent, 60
    )
    assert row.note.startswith(f"{venv / 'bin' / 'llamafactory-cli'} does not exist")


def test_table_figures_and_pooled_rounds():
    rounds = [
        fw.Row("x", "1", ok=True, train_s=100.0, wall_s=110.0, cpu_s=200.0, peak_rss_mb=900.0, tokens=40000),
        fw.Row("x", "1", ok=True, train_s=70.0, wall_s=90.0, cpu_s=160.0, peak_rss_mb=1000.0, tokens=40000),
        fw.Row("x", "1", ok=True, train_s=90.0, wall_s=95.0, cpu_s=150.0, peak_rss_mb=950.0, tokens=40000),
    ]
    row = fw.pool(rounds)
    assert (row.train_s, row.cpu_s, row.peak_rss_mb) == (90.0, 160.0, 1000.0)
    assert row.tokens_per_s == 40000 / 90 and row.tokens_per_cpu_s == 250.0
    row.exact_match = 0.93
    assert fw.render_table([row]).splitlines()[2] == "| x | 1 | 444 | 250 | 90.0 | 1000 | 0.93 |  |"


def test_template_comparison_names_the_difference():
    ours, target = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n", "a<|im_end|>"
    assert fw.compare_render(ours, target, ours, target) == "template text identical, same trained tokens"
    assert fw.compare_render(ours.rstrip("\n"), target, ours, target).startswith(
        "template text identical but the final newline"
    )
    assert fw.compare_render(ours, None, ours, target) == "template text identical (trained part not checked)"
    assert fw.compare_render(ours, target + "\n", ours, target).endswith(
        "trained part 'a<|im_end|>\\n' vs sftlab 'a<|im_end|>'"
    )
    assert fw.compare_render("<|im_start|>system\nHi<|im_end|>\n" + ours, target, ours, target).startswith(
        "template text differs"
    )


def test_merged_weights_load_into_the_base_and_mismatches_are_refused(tmp_path, tiny_model):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] += 1.0
    state.pop("lm_head.weight", None)  # tied: convert_from_litgpt leaves it out
    torch.save(state, tmp_path / "model.pth")
    before = tiny_model.state_dict()[name].clone()
    fw.load_full_weights(tiny_model, tmp_path / "model.pth")
    assert torch.equal(tiny_model.state_dict()[name], before + 1.0)
    state["transformer.h.0.attn.qkv.weight"] = state.pop(name)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.q_proj.weight'\]"):
        fw.load_full_weights(tiny_model, tmp_path / "bad.pth")


@pytest.mark.slow
def test_one_peer_end_to_end_on_a_few_rows(tmp_path):
    """LLaMA-Factory trains two steps through its CLI on 16 rows and the judge scores its adapter."""
    root = fw.peers_dir()
    if fw.venv_problem(fw.FRAMEWORKS["llamafactory"], root):
        pytest.skip(f"llamafactory: {fw.venv_problem(fw.FRAMEWORKS['llamafactory'], root)}")
    from sftlab.bench.run import run

    src = Path(fw.ROOT / "src/sftlab/resources/iso_dates")
    (tmp_path / "train.jsonl").write_text("".join((src / "train.jsonl").read_text().splitlines(True)[:16]))
    for split, n in (("val", 4), ("test", 4)):
        rows = (src / f"{split}.jsonl").read_text().splitlines(True)[:n]
        (tmp_path / f"{split}.jsonl").write_text("".join(rows))
    os.environ.setdefault("WANDB_MODE", "disabled")
    result = run(
        [
            "--peers",
            "llamafactory",
            "-o",
            f"data.train_path={tmp_path / 'train.jsonl'}",
            "-o",
            f"data.val_path={tmp_path / 'val.jsonl'}",
            "-o",
            f"data.test_path={tmp_path / 'test.jsonl'}",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "peers.json"),
        ]
    )
    rows = {r["framework"]: r for r in result["rows"]}
    assert rows["sftlab"]["ok"] and rows["llamafactory"]["ok"], rows
    assert rows["llamafactory"]["exact_match"] is not None
    assert "template text identical" in rows["llamafactory"]["note"]
