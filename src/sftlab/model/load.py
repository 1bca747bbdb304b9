"""Load a base causal LM and its tokenizer from a Hub id, a local directory, a GGUF file or a random init.

Every source is first turned into a plain Hugging Face directory (`materialize`): a GGUF file is dequantized
once into the cache, a `random_init` model is built once from its config and saved there. Training, the saved
adapter's `base_model_name_or_path`, merging and evaluation then all load the same directory with
`from_pretrained`, so a finished run is loadable by anyone with plain transformers + peft.

Cache location: `model.cache_dir` (default `$SFTLAB_CACHE`, else `~/.cache/sftlab`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sftlab import paths
from sftlab.errors import ConfigError, SFTLabError
from sftlab.model import attention
from sftlab.paths import default_cache_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _publish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> str:
    """Save into a temp directory beside `target`, then rename it into place atomically: a killed conversion
    never leaves a half directory, and of two racing processes the second keeps the first's result."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    try:
        os.replace(build, target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(build, ignore_errors=True)
    return str(target)


def _convert_gguf(gguf_path: str, cache_dir: str) -> str:
    src = Path(gguf_path)
    target = Path(cache_dir) / "models" / f"{src.stem}-{_digest(src.name, src.stat().st_size)}"
    if (target / "config.json").exists():
        return str(target)
    log.info("Converting %s into a Hugging Face directory at %s (once; about 20 s)", src.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # transformers refuses to save a model "quantized with gguf"; the weights are already dequantized.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _publish(model, tokenizer, target)


def _build_random(random_init: dict, tokenizer_source: str, cache_dir: str, dtype: str = "float32") -> str:
    """A randomly initialised model sharing a real tokenizer: fast tests of the real code paths (tiny), and
    throughput of a large model's shapes with nothing to download (built and saved in `dtype`: a 7B model is
    14 GB in bf16, 28 GB in fp32)."""
    spec = dict(random_init)
    model_type = spec.pop("model_type")
    seed = spec.pop("seed", 0)
    # fp32 keeps the digest (and cache directory) that models built before the dtype was part of it have.
    digest = _digest(model_type, seed, spec, tokenizer_source, *([] if dtype == "float32" else [dtype]))
    target = Path(cache_dir) / "models" / f"random-{model_type}-{digest}"
    if (target / "config.json").exists():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **ids, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return _publish(model, tokenizer, target)


def materialize(name_or_path: str, *, cache_dir: str, key: str = "model.name_or_path") -> str:
    """Turn a model reference into something `from_pretrained` accepts: a local directory or a Hub id."""
    path = paths.resolve(name_or_path, key=key)
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise SFTLabError(f"{key}={name_or_path!r}: GGUF file {path} does not exist.")
        return _convert_gguf(path, cache_dir)
    return path


def model_source(cfg: Any) -> str:
    """The directory (or Hub id) the base model loads from; what the adapter records as its base."""
    cache_dir = cfg.get("cache_dir") or default_cache_dir()
    if cfg.get("random_init"):
        tok = materialize(cfg.tokenizer_name_or_path, cache_dir=cache_dir, key="model.tokenizer_name_or_path")
        source = _build_random(dict(cfg.random_init), tok, cache_dir, cfg.get("dtype") or "float32")
    else:
        source = materialize(cfg.name_or_path, cache_dir=cache_dir)
    origin = base_origin(cfg)
    if origin is not None and not (Path(source) / ORIGIN_FILE).is_file():
        with contextlib.suppress(OSError):  # a read-only shared cache: the run's config still records it
            (Path(source) / ORIGIN_FILE).write_text(json.dumps(origin, indent=2), encoding="utf-8")
    return source


ORIGIN_FILE = "sftlab_origin.json"


def base_origin(cfg: Any) -> dict | None:
    """How sftlab built a base that exists only in a local cache (a converted GGUF, a random init), so an
    adapter trained on it can be loaded elsewhere; None for Hub ids and the user's own directories."""
    if cfg.get("random_init"):
        return {
            "kind": "random_init",
            "random_init": dict(cfg.random_init),
            "tokenizer": cfg.tokenizer_name_or_path,
            "dtype": cfg.get("dtype") or "float32",
            "rebuild": "sftlab: load_run(run_dir) / any sftlab command with run=",
        }
    ref = str(cfg.get("name_or_path") or "")
    if not ref.endswith(".gguf"):
        return None
    return {
        "kind": "gguf",
        "reference": ref,
        "package": ref.removeprefix("pkg://").split("/")[0] if ref.startswith("pkg://") else None,
        "file": ref.rsplit("/", 1)[-1],
        "conversion": "transformers from_pretrained(gguf_file=...) dequantized to float32, save_pretrained",
        "rebuild": "sftlab: load_run(run_dir) / any sftlab command with run=",
    }


def resolve_base(recorded: str, cfg: Any) -> str:
    """The base an adapter loads onto: the recorded directory, or, where this machine lacks it and it was a
    cache product (a converted GGUF, a random init), the same base rebuilt here from the run's model config
    into this machine's cache (`$SFTLAB_CACHE`, else ~/.cache/sftlab)."""
    if Path(recorded).is_dir() or base_origin(cfg) is None:
        return recorded
    local = cfg.copy()
    local.cache_dir = default_cache_dir()
    log.info("Base model %s is not on this machine: rebuilding it in %s", recorded, local.cache_dir)
    return model_source(local)


def _hub_kwargs(cfg: Any) -> dict:
    return {"trust_remote_code": bool(cfg.get("trust_remote_code", False)), "revision": cfg.get("revision")}


def _missing_weights(source: str, err: Exception) -> SFTLabError:
    return SFTLabError(
        f"model.name_or_path={source!r}: cannot load the model "
        f"({type(err).__name__}: {str(err).splitlines()[0]}). "
        "It is neither a local directory nor in the Hugging Face cache, and the Hub could not be reached. "
        f"On a connected machine run `hf download {source}` (and `hf auth login` for gated models), "
        "or set model.name_or_path to a local directory holding config.json and *.safetensors."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect: huggingface_hub itself retries with backoff for ~30 s before giving up."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_available(source: str, cfg: Any) -> None:
    """Fail in seconds, with one message, when the weights are neither local, cached nor reachable."""
    if Path(source).is_dir():
        return
    try:
        AutoConfig.from_pretrained(source, local_files_only=True, **_hub_kwargs(cfg))
        return
    except (OSError, ValueError) as err:
        if not hub_reachable():
            raise _missing_weights(source, err) from None
    try:
        AutoConfig.from_pretrained(source, **_hub_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise _missing_weights(source, err) from None


def estimate_parameters(config: Any) -> int:
    """Rough decoder-only parameter count from a config (GQA attention + gated MLP per layer, embeddings)."""
    h = getattr(config, "hidden_size", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    inter = getattr(config, "intermediate_size", None) or 4 * h
    vocab = getattr(config, "vocab_size", 0) or 0
    heads = getattr(config, "num_attention_heads", 1) or 1
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter) + 2 * vocab * h


CPU_PARAM_LIMIT = 3_000_000_000


def check_hardware(source: str, cfg: Any) -> None:
    """Refuse, in seconds, to start a multi-billion-parameter run on a CPU (it would take days)."""
    if torch.cuda.is_available() or cfg.get("allow_cpu"):
        return
    n = estimate_parameters(AutoConfig.from_pretrained(source, **_hub_kwargs(cfg)))
    if n > CPU_PARAM_LIMIT:
        raise SFTLabError(
            f"model.name_or_path={source!r} has about {n / 1e9:.1f}B parameters and no CUDA GPU is "
            "visible: training it on CPU would take days. Run on a GPU machine, pick a smaller model "
            "(model=smollm2_135m), or set model.allow_cpu=true to insist."
        )


def check_context_length(cfg: Any, max_length: int | None) -> None:
    """`data.max_length` beyond the model's trained context would train positions it never saw: refuse."""
    limit = cfg.get("context_length")
    if limit and max_length and max_length > limit:
        raise ConfigError(
            f"data.max_length={max_length} exceeds model.context_length={limit} of model {cfg.get('name')!r} "
            f"(conf/model/{cfg.get('name')}.yaml). Lower data.max_length, or raise model.context_length if "
            "the model was extended (e.g. rope scaling)."
        )


def load_tokenizer(cfg: Any, source: str | None = None) -> PreTrainedTokenizerBase:
    source = source or model_source(cfg)
    tok_source = source
    if cfg.get("tokenizer_name_or_path") and not cfg.get("random_init"):
        cache_dir = cfg.get("cache_dir") or default_cache_dir()
        tok_source = materialize(cfg.tokenizer_name_or_path, cache_dir=cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **_hub_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise _missing_weights(tok_source, err) from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so reusing EOS is safe; the EOS *label* is kept by
        # building labels from spans, never from `input_ids != pad`.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: Any, source: str | None = None, quantization_config: Any = None) -> PreTrainedModel:
    """Load the base model with the dtype and attention implementation from config."""
    source = source or model_source(cfg)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "attn_implementation": attention.implementation(cfg.get("attn_implementation")),
        # Pickle checkpoints can run code on load; only safetensors unless the config opts in.
        "use_safetensors": None if cfg.get("allow_pickle") else True,
        **_hub_kwargs(cfg),
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": _local_cuda_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _missing_weights(source, err) from None
    model.config.use_cache = False  # the KV cache only costs memory during training
    if quantization_config is not None:
        report_quantization(model)
        keep_4bit_trainable(model)
    return model


def _local_cuda_device() -> int:
    """The GPU of this process: a bitsandbytes model is quantized where it loads, before Lightning has set the
    rank's device, so every DDP rank would otherwise load onto (and fill) GPU 0 first."""
    rank = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID")
    if rank is None or torch.cuda.device_count() <= 1:
        return torch.cuda.current_device()
    return min(int(rank), torch.cuda.device_count() - 1)


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns layers changed.

    bitsandbytes 0.50 repacks a Linear4bit's weights on its first eval-mode, no-grad forward on a CPU with
    AVX512-BF16 (the base-model evaluation, every validation pass), and from then on uses a kernel that does
    not back-propagate to the layer's input: LoRA weights in all but the last layers silently get no gradient
    (tests/model/test_adapters.py checks this). Costs some CPU inference speed; no effect on GPUs.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bnb.nn.Linear4bit
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def report_quantization(model: PreTrainedModel) -> tuple[int, int]:
    """(quantized, still full-precision) linear layers, output head excluded; logs a warning for the latter.

    transformers' bitsandbytes integration only swaps layers whose type *is* `nn.Linear`, so subclasses such
    as Falcon's `FalconLinear` stay full precision: the run still trains, with LoRA-like memory.
    """
    head = model.get_output_embeddings()
    quantized, plain = 0, []
    for name, module in model.named_modules():
        if type(module).__module__.startswith("bitsandbytes"):  # bnb.nn.Linear4bit / Linear8bitLt
            quantized += 1
        elif isinstance(module, torch.nn.Linear) and module is not head:
            plain.append(name)
    if plain:
        kind = type(model.get_submodule(plain[0])).__name__
        log.warning(
            "Quantization left %d of %d linear layers in full precision (e.g. %s, a %s): this "
            "architecture's linear class is not swapped by transformers' bitsandbytes integration.",
            len(plain),
            len(plain) + quantized,
            plain[0],
            kind,
        )
    return quantized, len(plain)
