"""`sftlab-merge run=<run dir> [out=<dir>]`: fold the adapter into the base and write a servable HF directory.

The output loads with plain `AutoModelForCausalLM.from_pretrained(out)` and serves with `vllm serve out`:
safetensors weights, the tokenizer with the run's chat template, and a generation config whose stop tokens
include the template's end-of-turn token (vLLM and transformers stop on `generation_config.eos_token_id`).

QLoRA / 8-bit runs: by default (`base=dequantized`) the adapter is merged into the dequantized quantized
base, i.e. the very weights it was trained against, so the merged model computes what the adapter model did.
`base=original` merges into the original-precision weights instead (the adapter then also "undoes" the
quantization error it learned around). Either way the largest logits difference between the merged model and
the adapter model is measured on a probe prompt, printed and written to `merge_report.json`.

`format=gguf quant=f16|bf16|q8_0|...` writes a GGUF file + Ollama Modelfile instead, checked by loading it
back (sftlab.export; docs/export.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import PreTrainedModel

from sftlab import export
from sftlab.build import LoadedRun, load_run
from sftlab.cli.args import parse
from sftlab.data.tokenize import encode_prompt
from sftlab.errors import ConfigError, SFTLabError
from sftlab.model.generate import stop_token_ids
from sftlab.model.load import DTYPES
from sftlab.rundir.read import MERGED_CONFIG
from sftlab.rundir.write import atomic_dir, write_json

log = logging.getLogger("sftlab.merge")

PROBE = [
    {"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): the 5th of March, 2021"},
    {"role": "assistant", "content": "2021-03-05"},
    {"role": "user", "content": "And what is 2 + 2?"},
]


@dataclass
class MergeArgs:
    """run: a train.py run directory. out: where to write (default <run>/merged). dtype: weights to save
    (default: the run's model.dtype). base: dequantized | original (quantized runs only). overwrite: replace
    an existing out directory. format: hf (a Hugging Face directory) | gguf (default out <run>/gguf-<quant>).
    quant: the GGUF weight type (f16, bf16, q8_0, f32, q5_1, q5_0, q4_1, q4_0)."""

    run: str = "???"
    out: str | None = None
    dtype: str | None = None
    base: str = "dequantized"
    overwrite: bool = False
    format: str = "hf"
    quant: str = "f16"


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def _quantized(run: LoadedRun) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in run.model.modules())


def _dequantized_base_with_adapter(run_dir: Path, dtype: torch.dtype) -> PeftModel:
    """The quantized base, dequantized to plain Linear layers, with the adapter loaded on top."""
    base = load_run(run_dir, with_adapter=False)
    base.model.dequantize()
    model = base.model.to(dtype)
    return PeftModel.from_pretrained(model, run_dir / "adapter")


def merged_model(args: MergeArgs) -> tuple[PreTrainedModel, LoadedRun, dict]:
    """(merged model, the adapter run it came from, report with the measured logits difference)."""
    run_dir = Path(args.run)
    adapter_run = load_run(run_dir)
    dtype = DTYPES[args.dtype or adapter_run.cfg.model.dtype]
    ids = encode_prompt(PROBE, adapter_run.template, adapter_run.tokenizer)
    reference = probe_logits(adapter_run.model, ids)
    quantized = _quantized(adapter_run)
    if quantized:  # the quantized model is no longer needed: free it before loading the base again
        adapter_run.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not quantized and not isinstance(adapter_run.model, PeftModel):  # full fine-tuning: just export
        model = adapter_run.model
    elif quantized and args.base == "dequantized":
        model = _dequantized_base_with_adapter(run_dir, dtype).merge_and_unload()
    elif quantized:
        model = load_run(run_dir, quantized=False).model.merge_and_unload()
    else:
        model = adapter_run.model.merge_and_unload()
    model = model.to(dtype).eval()
    merged_logits = probe_logits(model, ids)
    diff = (merged_logits - reference).abs()
    agreement = float((merged_logits.argmax(-1) == reference.argmax(-1)).float().mean())
    report = {
        "run": str(run_dir),
        "quantized_base": quantized,
        "merged_into": args.base if quantized else "base",
        "dtype": str(dtype).removeprefix("torch."),
        "probe_tokens": len(ids),
        "logits_max_abs_diff": float(diff.max()),
        "logits_mean_abs_diff": float(diff.mean()),
        "greedy_next_token_agreement": agreement,
    }
    return model, adapter_run, report


def write_merged(out: Path, model: PreTrainedModel, run: LoadedRun, report: dict) -> None:
    """Weights + tokenizer (with the chat template) + generation config + the run's config + the report."""
    stops = stop_token_ids(run.template, run.tokenizer)
    model.config.use_cache = True  # training turned the KV cache off; serving wants it
    gen = model.generation_config
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = run.tokenizer.pad_token_id
    gen.bos_token_id = run.tokenizer.bos_token_id
    model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)  # saved by training with the run's template as its chat template
    (out / MERGED_CONFIG).write_text(OmegaConf.to_yaml(run.cfg), encoding="utf-8")
    write_json(out / "merge_report.json", {**report, "stop_token_ids": stops})


MERGE_OUTPUT_FILES = (MERGED_CONFIG, "merge_report.json", "merge.json")  # merge.json: a GGUF bundle


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an `out` that would destroy anything but an earlier merge output: the run itself, a folder
    holding it, another run, a folder of other files. Nothing is deleted here; the swap happens after the new
    output is complete (`atomic_dir`)."""
    run, target = run_dir.resolve(), out.resolve()
    if _within(run, target):
        raise ConfigError(
            f"out={str(out)!r} is (or contains) the input run {str(run_dir)!r}; choose an out outside it, "
            f"e.g. the default {str(run_dir / 'merged')!r}."
        )
    for above in [target, *target.parents]:
        is_run = (above / "config.yaml").is_file() and any(
            (above / d).is_dir() for d in ("adapter", "model", "checkpoints")
        )
        if above != run and is_run:
            raise ConfigError(
                f"out={str(out)!r} is inside another run directory ({str(above)!r}); "
                "choose an out outside it."
            )
    if target.exists() and not target.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file, not a directory; choose another out.")
    if target.is_dir() and any(target.iterdir()):
        if not _is_merge_output(target):
            raise ConfigError(
                f"out={str(out)!r} holds files that are not an sftlab-merge output; sftlab-merge "
                "replaces only its own earlier output (with overwrite=true). Choose an empty or new out."
            )
        if not overwrite:
            raise SFTLabError(f"out={str(out)!r} holds an earlier merge; pass overwrite=true or another out.")


def _is_merge_output(folder: Path) -> bool:
    """A folder written by sftlab-merge, and nothing else: its files, the HF model files, no sub-folders."""
    return any((folder / name).is_file() for name in MERGE_OUTPUT_FILES) and not any(
        p.is_dir() for p in folder.iterdir()
    )


def merge(args: MergeArgs) -> Path:
    if args.base not in ("dequantized", "original"):
        raise ConfigError(f"base={args.base!r}: use base=dequantized or base=original.")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ConfigError(f"dtype={args.dtype!r}: use one of {', '.join(DTYPES)}.")
    if args.format not in ("hf", "gguf"):
        raise ConfigError(f"format={args.format!r}: use format=hf or format=gguf.")
    if args.format == "gguf":
        export.check_quant(args.quant)
    default_out = "merged" if args.format == "hf" else f"gguf-{args.quant}"
    out = Path(args.out) if args.out else Path(args.run) / default_out
    check_out(Path(args.run), out, args.overwrite)
    model, run, report = merged_model(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "gguf":
        return export_gguf(out, model, run, report, args.quant)
    with atomic_dir(out) as tmp:  # an existing output is replaced only once the new one is complete
        write_merged(tmp, model, run, report)
    log.info(
        "Merged model written to %s (logits max |diff| vs the adapter model: %.3g)",
        out,
        report["logits_max_abs_diff"],
    )
    print(
        f"merged: {out}\nlogits max |diff| vs adapter model: {report['logits_max_abs_diff']:.3g} "
        f"(greedy agreement {report['greedy_next_token_agreement']:.3f})\nserve: vllm serve {out}  "
        f"or  sftlab-serve run={out}"
    )
    return out


def export_gguf(out: Path, model: PreTrainedModel, run: LoadedRun, report: dict, quant: str) -> Path:
    """The GGUF bundle, written beside `out` and swapped in when complete. A file that fails verification
    is still swapped in (merge.json says what failed, for a look), then the command fails."""
    name = Path(run.run_dir).resolve().name
    failure = None
    with atomic_dir(out) as tmp:
        try:
            summary = export.export_gguf(
                tmp, model, run.tokenizer, run.template, run.cfg, quant, report, name
            )
        except SFTLabError as err:
            if not (tmp / "merge.json").is_file():
                raise
            failure = SFTLabError(str(err).replace(str(tmp), str(out)))
    if failure is not None:
        raise failure
    v = summary["verification"]
    print(
        f"gguf: {out / summary['gguf']['path']} ({summary['gguf']['bytes'] / 1e6:.0f} MB, {quant})\n"
        f"verified by reloading with transformers: logits max |diff| {v['logits_max_abs_diff']:.3g} "
        f"(limit {v['tolerance']['max']:g}), argmax agreement {v['argmax_agreement']:.3f}, greedy answers "
        f"same {v['greedy_same']}, tokenizer ids equal {v['checks']['tokenizer_ids_equal']}\n"
        f"ollama: cd {out} && ollama create {name} -f Modelfile\n"
        f"llama.cpp: llama-cli -m {out / summary['gguf']['path']} -cnv   (uses the training chat template)"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        merge(parse(MergeArgs, argv, prog="sftlab-merge"))
    except SFTLabError as err:
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
