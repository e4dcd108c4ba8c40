"""A RAG run served: each chat answer gets the run's reference evidence, as ``chat --rag`` does."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from fedtune.data.tokenize import build_generation_input
from fedtune.errors import FedtuneError
from fedtune.inference import load_run
from fedtune.rag.chat import chat_retrieval
from fedtune.serve import build_app
from fedtune.serve.models import load_catalogue
from helpers import finished_tiny_run

QUESTION = [{"role": "user", "content": "What is a prime number?"}]


def test_rag_run_answers_with_the_evidence_chat_rag_would_use(tmp_path) -> None:
    # Prepare: fedtune's own answer to the question with the evidence `chat --rag` puts before it
    run, cfg = finished_tiny_run(tmp_path, config="configs/rag-tiny.toml")
    loaded = load_run(run.path)
    sent, used = chat_retrieval(cfg, loaded.tokenizer).augment(QUESTION)  # type: ignore[arg-type]
    ids = build_generation_input(sent, loaded.tokenizer, cfg.data.template, cfg.data.max_source_length)
    plain = build_generation_input(QUESTION, loaded.tokenizer, cfg.data.template, cfg.data.max_source_length)  # type: ignore[arg-type]
    out = loaded.model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0
    )  # type: ignore[union-attr]
    expected = loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    # Execute
    with TestClient(build_app([run.path])) as client:
        body = client.post(
            "/v1/chat/completions", json={"model": run.path.name, "messages": QUESTION, "max_tokens": 6}
        ).json()
    # Assert
    assert used and len(ids) > len(plain)  # there was evidence, and it lengthened the prompt
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"]["content"] == expected


def test_a_rag_run_with_nothing_to_retrieve_from_is_refused_by_name(tmp_path) -> None:
    run, _ = finished_tiny_run(tmp_path, "rag.k_reference=0", config="configs/rag-tiny.toml")
    with pytest.raises(FedtuneError, match=f"{run.path.name}: a RAG run the server cannot retrieve for"):
        load_catalogue([run.path])
