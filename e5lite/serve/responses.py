"""The wire protocol's response bodies: what the OpenAI and TEI routes answer with, as pydantic models (they give
the OpenAPI document's schemas, ``routes.py``), built with ``model_construct`` from the rows the server already
checked; ``json_response`` writes one. The request bodies are ``protocol.py``'s, which re-exports these.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, RootModel
from starlette.responses import Response


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="base64 of little-endian float32 when asked for.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens embedded, prompt and special tokens included, after truncation.")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """OpenAI embeddings response."""

    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: Usage

    @classmethod
    def of(cls, rows: np.ndarray, *, model: str, tokens: int, encoding_format: str | None) -> EmbeddingResponse:
        # model_construct: the rows are ours and already right, and validating every float would cost time
        if encoding_format == "base64":
            data = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
        else:
            data = rows.tolist()
        return cls.model_construct(
            model=model,
            data=[Embedding.model_construct(index=i, embedding=e) for i, e in enumerate(data)],
            usage=Usage.model_construct(prompt_tokens=tokens, total_tokens=tokens),
        )


class EmbedResponse(RootModel[list[list[float]]]):
    """TEI embed response: one embedding per input."""

    @classmethod
    def of(cls, rows: np.ndarray) -> EmbedResponse:
        return cls.model_construct(rows.tolist())


class EmbedAllResponse(RootModel[list[list[list[float]]]]):
    """TEI embed_all response: per input, the last hidden state of each of its tokens."""

    @classmethod
    def of(cls, states: list[np.ndarray]) -> EmbedAllResponse:
        return cls.model_construct([s.tolist() for s in states])


class SimilarityResponse(RootModel[list[float]]):
    """TEI similarity response: the cosine of source_sentence with each sentence, in order."""


class SimpleToken(BaseModel):
    id: int
    text: str = Field(description="The special token's string, or the slice of the (prompted) input.")
    special: bool
    start: int | None = Field(description="UTF-8 byte offset in the prompted input; null for a special token.")
    stop: int | None


class TokenizeResponse(RootModel[list[list[SimpleToken]]]):
    """TEI tokenize response: per input, its tokens."""


class DecodeResponse(RootModel[list[str]]):
    """TEI decode response: per id list, its text."""


class Health(BaseModel):
    status: Literal["ok"]


class Info(BaseModel):
    """``GET /info``: the model, the engine and the server's settings (as TEI's /info, with e5lite's own)."""

    model_id: str = Field(description="--served-model-name, else the model's folder name.")
    model_dir: str
    dim: int
    max_input_length: int
    pooling: str
    dtype: str
    weights: str
    devices: list[str]
    attention_impl: str | None
    prompts: dict[str, str]
    default_prompt_name: str | None
    default_prompt: str | None = Field(description="What a request naming no prompt gets put before its texts.")
    api_key_required: bool
    cors_allow_origin: list[str]
    payload_limit: int
    max_client_batch_size: int
    max_batch_tokens: int
    max_wait_ms: float
    max_queue: int
    max_queue_tokens: int
    max_queue_wait_ms: float
    shutdown_timeout: float
    auto_truncate: bool
    long_inputs: Literal["truncate", "chunk"]
    chunk_overlap: int
    version: str


def json_response(body: BaseModel, status: int = 200, headers: dict | None = None) -> Response:
    return Response(body.model_dump_json(), status_code=status, media_type="application/json", headers=headers)
