"""sftlab-merge: the merged directory computes what the adapter model did, and loads and stops on its own."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftlab.build import load_run
from sftlab.cli.merge import PROBE, main
from sftlab.data.tokenize import encode_prompt
from tests.conftest import make_adapter_run

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def greedy(model, ids, stops, n=12):
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=stops[0],
    )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def lora_merged(tmp_path_factory):
    run_dir, *_ = make_adapter_run(tmp_path_factory.mktemp("lora"), [])
    main([f"run={run_dir}"])
    return run_dir, run_dir / "merged"


def test_merged_logits_equal_adapter_logits_fp32_lora(lora_merged):
    run_dir, out = lora_merged
    run = load_run(run_dir)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = load_run(run_dir, with_adapter=False).model
    ids = encode_prompt(PROBE, run.template, run.tokenizer)
    adapter_logits, merged_logits = logits(run.model, ids), logits(merged, ids)
    assert (adapter_logits - logits(base, ids)).abs().max() > 1e-2  # the adapter changes the model ...
    assert (merged_logits - adapter_logits).abs().max() < 1e-4  # ... and the merge keeps that change
    report = json.loads((out / "merge_report.json").read_text())
    assert report["logits_max_abs_diff"] < 1e-4 and report["quantized_base"] is False


def test_merged_dir_is_plain_hf_and_generates_like_the_adapter(lora_merged):
    run_dir, out = lora_merged
    run = load_run(run_dir)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    # The saved chat template prompts exactly as training did.
    ids = encode_prompt(QUESTION, run.template, run.tokenizer)
    assert (
        tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    )
    gen = json.loads((out / "generation_config.json").read_text())
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops  # the end-of-turn token stops generation
    assert merged.config.use_cache is True
    assert greedy(merged, ids, stops) == greedy(run.model, ids, stops)


def test_qlora_merges_into_the_dequantized_base_and_reports_the_difference(tmp_path):
    run_dir, *_ = make_adapter_run(tmp_path / "q", ["adapter=qlora"])
    main([f"run={run_dir}", f"out={tmp_path / 'm'}"])
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["quantized_base"] is True and report["merged_into"] == "dequantized"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    run = load_run(run_dir)  # the adapter on the 4-bit base, as trained
    ids = encode_prompt(PROBE, run.template, run.tokenizer)
    diff = float((logits(merged, ids) - logits(run.model, ids)).abs().max())
    assert diff == pytest.approx(report["logits_max_abs_diff"], rel=1e-3, abs=1e-6)
    assert diff < 0.05  # bf16 compute in the adapter model vs fp32 merged weights: rounding only


def test_bad_arguments_exit_with_one_message(tmp_path, caplog):
    with pytest.raises(SystemExit):
        main([f"run={tmp_path}", "colour=blue"])
    with pytest.raises(SystemExit):
        main([f"run={tmp_path}"])
    assert "no config.yaml" in caplog.text


def test_load_run_reads_the_merged_directory_too(lora_merged):
    run_dir, out = lora_merged
    run, merged = load_run(run_dir), load_run(out)
    assert merged.template == run.template
    ids = encode_prompt(PROBE, run.template, run.tokenizer)
    assert (logits(merged.model, ids) - logits(run.model, ids)).abs().max() < 1e-4


def test_full_fine_tune_run_is_exported_unchanged(tmp_path):
    run_dir, model, *_ = make_adapter_run(tmp_path / "full", ["adapter=none"])
    assert (run_dir / "model" / "config.json").is_file()
    main([f"run={run_dir}"])
    report = json.loads((run_dir / "merged" / "merge_report.json").read_text())
    assert report["logits_max_abs_diff"] == 0.0
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert all(torch.equal(p, exported.state_dict()[k]) for k, p in model.state_dict().items())
