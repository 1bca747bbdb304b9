"""`sftlab-merge format=gguf`: the bundle (GGUF + Modelfile + merge.json) and a verification that can fail."""

from __future__ import annotations

import json

import pytest
import torch

from sftlab.cli.merge import MergeArgs, main, merge
from sftlab.errors import SFTLabError
from sftlab.export.bundle import export_gguf
from sftlab.export.gguf import write_gguf
from sftlab.export.verify import load_gguf, probe_conversations, verify_gguf
from tests.conftest import make_adapter_run
from tests.export.test_gguf import random_model

PROBE = [
    {"role": "user", "content": "the 5th of March, 2021"},
    {"role": "assistant", "content": "2021-03-05"},
]


@pytest.fixture(scope="module")
def bundle(small_tokenizer, chatml, tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "out"
    template = chatml.bind(small_tokenizer)
    model = random_model("llama", small_tokenizer)
    summary = export_gguf(out, model, small_tokenizer, template, tiny_cfg, "q8_0", {"run": "r"}, "tuned")
    return out, summary


def test_bundle_holds_a_verified_gguf_a_modelfile_and_merge_json(bundle):
    out, summary = bundle
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "merge.json", "tuned.q8_0.gguf"]
    report = json.loads((out / "merge.json").read_text())
    assert report == json.loads(json.dumps(summary)) and report["run"] == "r"
    v = report["verification"]
    assert v["passed"] and v["checks"]["tokenizer_ids_equal"] and v["checks"]["chat_template_equal"]
    assert 0 < v["logits_max_abs_diff"] <= v["tolerance"]["max"] == 4.0  # q8_0 is lossy, within its limit
    assert v["probe_conversations"] == 4  # the first 4 conversations of the run's test split
    assert report["gguf"]["quant"] == "q8_0" and report["gguf"]["stop_tokens"] == ["<|im_end|>"]
    assert (out / "Modelfile").read_text().startswith("FROM ./tuned.q8_0.gguf\n")


def test_probes_come_from_the_runs_own_data(tiny_cfg, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tiny_cfg.data.copy()
    data.test_path = str(tmp_path / "test.jsonl")
    assert probe_conversations(data, n=2) == [r["messages"] for r in rows[:2]]
    data.test_path = None  # no test split: the validation split (the bundled ISO dates here)
    assert probe_conversations(data, n=1)[0][0]["content"].startswith("Convert this date to ISO 8601")


def test_verification_fails_for_a_file_that_is_not_the_model(small_tokenizer, chatml, tmp_path):
    tok, template = small_tokenizer, chatml.bind(small_tokenizer)
    model = random_model("llama", tok)
    path = tmp_path / "m.f16.gguf"
    write_gguf(model, tok, template, path, quant="f16")
    assert verify_gguf(path, "f16", model, tok, template, [PROBE], max_new_tokens=4)["passed"]
    with torch.no_grad():
        model.model.norm.weight.mul_(50)  # the merged model no longer matches the file
    report = verify_gguf(path, "f16", model, tok, template, [PROBE], max_new_tokens=4)
    assert not report["passed"] and report["checks"]["logits_within_tolerance"] is False


def test_smollm2_tokenizer_survives_the_file(tokenizer, chatml, tmp_path):
    """The real 49k-token vocabulary: prompt ids, digits included, are the same read back from the file."""
    template = chatml.bind(tokenizer)
    path = tmp_path / "m.f16.gguf"
    write_gguf(random_model("llama", tokenizer), tokenizer, template, path, quant="f16")
    from transformers import AutoTokenizer

    file_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "<|im_start|>user\nConvert 26.05.2014 (day.month.year) to ISO 8601, ünïcode 💡<|im_end|>\n"
    assert file_tok(text, add_special_tokens=False)["input_ids"] == tokenizer(text)["input_ids"]
    assert file_tok.chat_template == template.to_jinja() and file_tok.eos_token == "<|im_end|>"


def test_unknown_format_and_quant_are_refused_before_merging(tmp_path):
    with pytest.raises(SFTLabError, match="format='onnx'"):
        merge(MergeArgs(run=str(tmp_path), format="onnx"))
    with pytest.raises(SFTLabError, match="quant='q2'"):
        merge(MergeArgs(run=str(tmp_path), format="gguf", quant="q2"))


@pytest.mark.slow
def test_merge_cli_exports_an_adapter_run(tmp_path, capsys):
    run_dir, *_ = make_adapter_run(tmp_path / "run", [])
    main([f"run={run_dir}", "format=gguf", "quant=f16"])
    out = run_dir / "gguf-f16"
    report = json.loads((out / "merge.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["checks"]["greedy_answers_equal"]
    assert "verified by reloading with transformers" in capsys.readouterr().out
    model, _ = load_gguf(out / "run.f16.gguf")
    assert model.config.vocab_size == 49152


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_default_model_exports_within_tolerance(quant, tmp_path):
    """The acceptance: the default run's model (SmolLM2-135M-Instruct + a LoRA adapter) as f16 and q8_0."""
    run_dir, *_ = make_adapter_run(tmp_path / "run", ["model=smollm2_135m"], scale=0.01)
    main([f"run={run_dir}", "format=gguf", f"quant={quant}"])
    v = json.loads((run_dir / f"gguf-{quant}" / "merge.json").read_text())["verification"]
    assert v["passed"], v
    assert v["logits_max_abs_diff"] <= v["tolerance"]["max"] and v["probe_conversations"] == 4
    if quant == "f16":
        assert v["greedy_same"] == "4/4"
