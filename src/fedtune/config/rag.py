"""The ``rag`` section: retrieval in training and inference (FF-RAG), see docs/rag.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_DECLINE = "The retrieved documents do not contain the answer."
DeclineMode = Literal["replace", "pair"]


class RagConfig(BaseModel):
    """``rag``: each example's question retrieves from the client's case base and the reference base."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="put retrieved passages in every training and evaluation source")
    reference: str | None = Field(
        None,
        description="the shared authoritative knowledge base: a folder `fedtune kb build` wrote, or "
        "documents indexed once into the fedtune cache: 'wiki' (the offline Wikipedia summaries), "
        "'wiki:CATEGORY[,...]', a JSONL/CSV/Parquet file with a 'text' field or a text/Markdown folder; "
        "unset: none",
    )
    k_case: int = Field(
        2, ge=0, description="passages from the client's own case base (its training records; 0: none)"
    )
    k_reference: int = Field(2, ge=0, description="passages from the reference base (0: none)")
    mode: Literal["bm25", "dense", "hybrid"] = Field(
        "hybrid", description="retrieval: bm25 (lexical), dense (embeddings) or hybrid (both, fused by rank)"
    )
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model (name or folder) for case bases and queries; a reference "
        "base built with another is refused",
    )
    max_passage_tokens: int = Field(
        96, gt=0, description="each passage is cut to this many tokens before it goes into the source"
    )
    decline_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dual task: share of training examples whose answer-holding passages are removed and "
        "whose target becomes rag.decline_text (the model learns to say when the evidence lacks the answer)",
    )
    decline_mode: DeclineMode = Field(
        "replace",
        description="replace: a decline example takes the place of its answer example; pair: it is added "
        "beside it (the same question with and without the answer in its evidence)",
    )
    decline_text: str = Field(DEFAULT_DECLINE, min_length=1, description="the target of a decline example")
    instruction: str | None = Field(
        None,
        min_length=1,
        description="a line put between the evidence and the question in training and inference, e.g. "
        "'Answer from the evidence. If it does not hold the answer, reply: {decline_text}' "
        "({decline_text} is replaced by rag.decline_text); unset: none",
    )
    answer_overlap: float = Field(
        0.7,
        gt=0,
        le=1,
        description="a passage holds the answer when it contains this share of the answer's words",
    )
    share_case_base: bool = Field(
        False,
        description="let the server fan a query out to this client's case base (only passages and ranks of "
        "its top k go back); off: such queries are refused",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RagConfig:
        if self.enabled and self.k_case == 0 and (self.reference is None or self.k_reference == 0):
            raise ValueError("rag.enabled needs rag.k_case > 0, or rag.reference with rag.k_reference > 0")
        return self
