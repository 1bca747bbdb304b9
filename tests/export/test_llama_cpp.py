"""The exported file run by llama.cpp itself (llama-cpp-python): same prompt tokens, same greedy answer."""

from __future__ import annotations

import importlib.util

import pytest

from sftlab.build import load_run
from sftlab.cli.merge import main
from sftlab.data.formats import split_prompt
from sftlab.data.tokenize import encode_prompt
from sftlab.export.verify import probe_conversations
from sftlab.model.generate import generate
from tests.conftest import make_adapter_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed: it has no wheel here and compiles llama.cpp from source "
        "(about 330 C/C++ files); on the shared 2-core machine the build ran over 75 minutes without "
        "finishing. `pip install llama-cpp-python` where a compiler and the time are at hand",
    ),
]


def test_llama_cpp_prompts_with_the_training_template_and_answers_as_the_merged_model(tmp_path):
    from llama_cpp import Llama

    run_dir, *_ = make_adapter_run(tmp_path / "run", ["model=smollm2_135m"], scale=0.01)
    main([f"run={run_dir}", "format=gguf", "quant=f16"])
    path = run_dir / "gguf-f16" / "run.f16.gguf"
    run = load_run(run_dir)
    history = split_prompt(probe_conversations(run.cfg.data)[0])[0]
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0)

    want_ids = encode_prompt(history, run.template, run.tokenizer)
    prompt_text = run.tokenizer.decode(want_ids)
    assert llm.tokenize(prompt_text.encode(), add_bos=False, special=True) == want_ids
    # the chat handler renders the file's tokenizer.chat_template (the training template) itself
    answer = llm.create_chat_completion(messages=history, temperature=0.0, max_tokens=16)
    want = generate(run.model, run.tokenizer, run.template, [history], max_new_tokens=16)[0]["text"]
    assert answer["choices"][0]["message"]["content"] == want
