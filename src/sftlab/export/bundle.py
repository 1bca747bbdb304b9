"""`sftlab-merge format=gguf`: the GGUF file, its Ollama Modelfile and the verification, in one directory.

<out>/<name>.<quant>.gguf   the merged model for llama.cpp / Ollama / LM Studio
<out>/Modelfile             `ollama create <name> -f Modelfile` (run in <out>)
<out>/merge.json            what was merged and what the reloaded file was checked against
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.errors import ConfigError, SFTLabError
from sftlab.export.gguf import check_quant, check_supported, write_gguf
from sftlab.export.ollama import modelfile
from sftlab.export.verify import probe_conversations, verify_gguf
from sftlab.rundir.write import write_json

log = logging.getLogger(__name__)


def check(model_config: Any, quant: str) -> None:
    """Refuse an unsupported quantization or architecture before anything is merged."""
    check_quant(quant)
    check_supported(model_config)


def export_gguf(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Any,
    run_cfg: Any,
    quant: str,
    report: dict,
    name: str,
    verify: bool = True,
) -> dict:
    """Write the bundle into `out` (an empty or new directory) and return merge.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.{quant}.gguf"
    written = write_gguf(model, tokenizer, template, path, quant=quant, name=name)
    try:
        (out / "Modelfile").write_text(modelfile(path.name, template, written.stop_tokens), encoding="utf-8")
        ollama = "Modelfile"
    except ConfigError as err:  # template=tokenizer: llama.cpp still gets the Jinja template from the file
        log.warning("%s", err)
        ollama = f"not written: {err}"
    summary = {**report, "format": "gguf", "gguf": {**asdict(written), "path": path.name}, "ollama": ollama}
    if verify:
        summary["verification"] = verify_gguf(
            path, quant, model, tokenizer, template, probe_conversations(run_cfg.data)
        )
    write_json(out / "merge.json", summary)
    if verify and not summary["verification"]["passed"]:
        failed = [k for k, v in summary["verification"]["checks"].items() if v is False]
        raise SFTLabError(
            f"format=gguf: {path} was written but does not reproduce the merged model ({', '.join(failed)}); "
            f"see {out / 'merge.json'}. Try quant=f16, or report the model type if f16 fails."
        )
    return summary
