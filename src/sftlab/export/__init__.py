"""Ship a merged model where people run it: GGUF for llama.cpp / Ollama, with a check that it computes what
the merged model computes."""

from sftlab.export.bundle import export_gguf
from sftlab.export.gguf import QUANTS, check_quant

__all__ = ["QUANTS", "check_quant", "export_gguf"]
