"""vLLM's pooling APIs, simulated: ``/v1/embeddings``, ``/v2/embed`` (Cohere), ``/pooling``,
``/classify``, ``/score`` (and ``/v1/score``), ``/rerank`` (and ``/v1/rerank``, ``/v2/rerank``).

Vectors are deterministic unit vectors derived from the input (its text, or its token ids), so
a test can compare exact values; scores are the two inputs' cosine similarity mapped to [0, 1]
(a text scored against itself gets 1.0). Shapes are vLLM's (``id`` prefixes, ``usage`` with
``prompt_tokens``, ``encoding_format`` float or base64, Matryoshka ``dimensions``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import msgspec

from lmgw.http.types import Request, Responder

from .apikit import (
    as_base64,
    bad,
    decode,
    inputs,
    new_id,
    now,
    pause,
    prefill_s,
    reply,
    similarity,
    texts,
    truncated,
    vector,
)

if TYPE_CHECKING:
    from .app import SimWorker


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: Any = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class CohereEmbedRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    texts: Any = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    truncate: str | None = None


class ClassifyRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: Any = None


class ScoreRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    text_1: Any = None
    text_2: Any = None


class RerankRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    query: str | None = None
    documents: Any = None
    top_n: int | None = None


_embedding = msgspec.json.Decoder(EmbeddingRequest)
_cohere = msgspec.json.Decoder(CohereEmbedRequest)
_classify = msgspec.json.Decoder(ClassifyRequest)
_score = msgspec.json.Decoder(ScoreRequest)
_rerank = msgspec.json.Decoder(RerankRequest)
LABELS = ("LABEL_0", "LABEL_1")


def _usage(tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def _listing(kind: str, model: str, data: list[Any], tokens: int) -> dict[str, Any]:
    """vLLM's envelope of a pooling answer: an ``object: list`` of ``data`` with usage."""
    return {
        "id": new_id(kind),
        "object": "list",
        "created": now(),
        "model": model,
        "data": data,
        "usage": _usage(tokens),
    }


async def embeddings(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    """``/v1/embeddings`` (object ``embedding``) and ``/pooling`` (object ``pooling``)."""
    req = decode(_embedding, request.body)
    model = sim._check_model(req.model)
    items = inputs(sim, req.input, "input")
    tokens = sum(len(ids) for _, ids in items)
    await pause(prefill_s(sim, tokens))
    pooling = request.path == "/pooling"
    data = []
    for i, (key, _) in enumerate(items):
        vec = truncated(vector(key), req.dimensions)
        value = as_base64(vec) if req.encoding_format == "base64" else vec
        if pooling:
            data.append({"index": i, "object": "pooling", "data": value})
        else:
            data.append({"index": i, "object": "embedding", "embedding": value})
    await reply(responder, _listing("pool" if pooling else "embd", model, data, tokens), rid)


async def cohere_embed(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    """``/v2/embed``: Cohere's request and answer shapes."""
    req = decode(_cohere, request.body)
    sim._check_model(req.model)
    given = texts(req.texts, "texts", allow_one=False)
    kinds = req.embedding_types or ["float"]
    for kind in kinds:
        if kind not in ("float", "base64"):
            raise bad(
                f"embedding_types: {kind!r} is not simulated (float, base64)", "embedding_types"
            )
    tok = sim.engine.tokenizer
    tokens = sum(len(tok.encode(t)) for t in given)
    await pause(prefill_s(sim, tokens))
    vectors = [vector(t.encode()) for t in given]
    embeddings: dict[str, Any] = {}
    for kind in kinds:
        embeddings[kind] = [as_base64(v) if kind == "base64" else v for v in vectors]
    body = {
        "id": new_id("embd"),
        "embeddings": embeddings,
        "texts": given,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}},
    }
    await reply(responder, body, rid)


async def classify(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    req = decode(_classify, request.body)
    model = sim._check_model(req.model)
    items = inputs(sim, req.input, "input")
    tokens = sum(len(ids) for _, ids in items)
    await pause(prefill_s(sim, tokens))
    data = []
    for i, (key, _) in enumerate(items):
        p1 = (vector(key, 2)[0] + 1.0) / 2.0
        probs = [1.0 - p1, p1]
        data.append(
            {"index": i, "label": LABELS[p1 > 0.5], "probs": probs, "num_classes": len(probs)}
        )
    await reply(responder, _listing("classify", model, data, tokens), rid)


async def score(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    """``/score``: ``text_1`` against each ``text_2`` (one to many, or pairwise lists)."""
    req = decode(_score, request.body)
    model = sim._check_model(req.model)
    left = texts(req.text_1, "text_1")
    right = texts(req.text_2, "text_2")
    if len(left) == 1:
        left = left * len(right)
    elif len(left) != len(right):
        raise bad("text_1 and text_2 must have the same length (or text_1 one text)", "text_2")
    tok = sim.engine.tokenizer
    tokens = sum(len(tok.encode(a)) + len(tok.encode(b)) for a, b in zip(left, right, strict=True))
    await pause(prefill_s(sim, tokens))
    data = [
        {"index": i, "object": "score", "score": similarity(a.encode(), b.encode())}
        for i, (a, b) in enumerate(zip(left, right, strict=True))
    ]
    await reply(responder, _listing("score", model, data, tokens), rid)


async def rerank(sim: SimWorker, request: Request, responder: Responder, rid: bytes) -> None:
    """``/rerank`` (Jina/Cohere style): documents by relevance to ``query``, best first."""
    req = decode(_rerank, request.body)
    model = sim._check_model(req.model)
    if req.query is None:
        raise bad("query is required", "query")
    docs = texts(req.documents, "documents", allow_one=False)
    if req.top_n is not None and req.top_n < 0:
        raise bad("top_n must be >= 0", "top_n")
    tok = sim.engine.tokenizer
    q = len(tok.encode(req.query))
    tokens = sum(q + len(tok.encode(d)) for d in docs)
    await pause(prefill_s(sim, tokens))
    results = [
        {
            "index": i,
            "document": {"text": d},
            "relevance_score": similarity(req.query.encode(), d.encode()),
        }
        for i, d in enumerate(docs)
    ]
    results.sort(key=lambda r: (-r["relevance_score"], r["index"]))
    if req.top_n:
        results = results[: req.top_n]
    body = {
        "id": new_id("rerank"),
        "model": model,
        "usage": {"total_tokens": tokens},
        "results": results,
    }
    await reply(responder, body, rid)


ROUTES = {
    "/v1/embeddings": embeddings,
    "/pooling": embeddings,
    "/v2/embed": cohere_embed,
    "/classify": classify,
    "/score": score,
    "/v1/score": score,
    "/rerank": rerank,
    "/v1/rerank": rerank,
    "/v2/rerank": rerank,
}
"""path -> handler (every one a POST)."""
