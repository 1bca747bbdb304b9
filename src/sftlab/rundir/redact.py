"""Keep secrets out of everything a run writes: config.yaml, metrics.json, the W&B config.

Two nets: a key whose name says it holds a credential (`api_key`, `hf_token`, `password`, ...) has its value
replaced, and any string containing the value of a credential-looking environment variable
(WANDB_API_KEY, HF_TOKEN, OPENAI_API_KEY, any *_KEY / *_TOKEN / *_SECRET / *_PASSWORD) is masked wherever it
appears, e.g. when a user interpolates `${oc.env:OPENAI_API_KEY}` into a config value.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
SECRET_KEY = re.compile(
    r"(^|_)(api_key|apikey|access_token|auth_token|hf_token|secret|password)$", re.IGNORECASE
)
SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would mask harmless text


def secret_values() -> list[str]:
    return sorted(
        {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN},
        key=len,
        reverse=True,
    )


def _mask_text(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, MASK)
    return text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a plain container (dicts, lists, scalars) with secrets masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: MASK if isinstance(k, str) and SECRET_KEY.search(k) and obj[k] else redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return _mask_text(obj, secrets)
    return obj


def secret_override(arg: str) -> str | None:
    """The key of a command-line override that sets a credential-looking key (`+model.hf_token=...`,
    `logger.wandb.api_key=...`), else None."""
    key, eq, _ = arg.lstrip("+~").partition("=")
    return key if eq and SECRET_KEY.search(key.rpartition(".")[2]) else None


def redact_override(arg: str) -> str:
    """An override as given, its value masked when its key holds a credential."""
    return f"{arg.partition('=')[0]}={MASK}" if secret_override(arg) else arg
