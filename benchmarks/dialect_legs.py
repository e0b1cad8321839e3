"""Building a P/D request's legs from the client's body: members copied as raw bytes vs the
fully decoded object re-encoded, for prompts of growing length.

Why: a vLLM P/D dialect edits a few top-level members of the client's body (the prefill leg:
``stream``, ``max_tokens``, ``kv_transfer_params``; the decode leg: ``kv_transfer_params``)
and leaves the prompt alone. Decoding the whole body to Python objects and encoding it again
for each leg costs time in proportion to the prompt; ``ClientBody.fields`` keeps each member's
value as its JSON bytes, so a leg re-encodes only what it sets. This times both ways for the
vllm-nixl legs (prefill request, reading P's answer, decode request) per request, in one run.

    .venv/bin/python benchmarks/dialect_legs.py [--quick]

Prints medians of 5 runs (µs per request) with the ratio, and writes
benchmarks/results/dialect_legs.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from lmgw.transport.dialects import ClientBody, HandOff, Peer, StageContext, StageRequest
from lmgw.transport.dialects._vllm import prefill_only
from lmgw.transport.dialects.base import leg_headers
from lmgw.transport.dialects.vllm_nixl import VllmNixl, remote_decode_params

REPEATS = 5
RESULTS = Path(__file__).parent / "results" / "dialect_legs.json"
CTX = StageContext(
    request_id="bench-1",
    path="/v1/chat/completions",
    headers=[(b"content-type", b"application/json")],
    prefill=Peer("10.0.0.1", 8100),
    decode=Peer("10.0.0.2", 8200),
)
ANSWER = (
    b'{"id":"x","choices":[],"kv_transfer_params":{"do_remote_prefill":true,'
    b'"do_remote_decode":false,"remote_engine_id":"e0","remote_block_ids":[1,2,3],'
    b'"remote_host":"10.0.0.1","remote_port":5600,"tp_size":1}}'
)


def chat_body(prompt_words: int) -> bytes:
    words = " ".join(f"word{i}" for i in range(prompt_words))
    return json.dumps(
        {
            "model": "bench-model",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": words},
            ],
            "max_tokens": 128,
            "temperature": 0.7,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


class _ByObjects(VllmNixl):
    """vllm-nixl as it was before ``ClientBody.fields``: the legs from the decoded object."""

    def prefill_request(self, body: ClientBody, ctx: StageContext) -> StageRequest:
        payload = prefill_only(body.obj, kv_transfer_params=remote_decode_params())
        headers = leg_headers(ctx.headers, ctx.request_id)
        return StageRequest(ctx.path, headers, msgspec.json.encode(payload), "prefill")

    def decode_request(
        self, body: ClientBody, handoff: HandOff | None, ctx: StageContext
    ) -> StageRequest:
        params = self._require(handoff).data
        payload = msgspec.json.encode({**body.obj, "kv_transfer_params": params})
        return StageRequest(ctx.path, leg_headers(ctx.headers, ctx.request_id), payload, "decode")


def _legs(dialect: VllmNixl) -> Callable[[bytes], None]:
    def legs(raw: bytes) -> None:
        body = ClientBody(raw)
        pre = dialect.prefill_request(body, CTX)
        dialect.decode_request(body, dialect.read_prefill(pre, 200, ANSWER), CTX)

    return legs


by_fields = _legs(VllmNixl())  # the dialect as it is: members as raw bytes
by_objects = _legs(_ByObjects())


def per_call_us(fn: Callable[[bytes], None], raw: bytes, budget_s: float) -> float:
    n = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget_s:
        for _ in range(20):
            fn(raw)
        n += 20
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    budget = 0.05 if args.quick else 0.3
    rows = []
    print(f"{'body':>10} {'fields µs':>10} {'objects µs':>11} {'ratio':>6}")
    for words in (16, 1000, 8000, 64000):
        raw = chat_body(words)
        assert json.loads(raw)  # (a valid body)
        # Warm both first, then alternate: large buffers come from mmap until glibc's
        # allocator raises its mmap threshold, so whichever ran first would pay for both.
        per_call_us(by_fields, raw, budget)
        per_call_us(by_objects, raw, budget)
        runs = [
            (per_call_us(by_fields, raw, budget), per_call_us(by_objects, raw, budget))
            for _ in range(REPEATS)
        ]
        fields = statistics.median(f for f, _ in runs)
        objects = statistics.median(o for _, o in runs)
        rows.append(
            {"body_bytes": len(raw), "fields_us": fields, "objects_us": objects,
             "ratio": fields / objects}
        )  # fmt: skip
        print(f"{len(raw):>10,} {fields:>10.2f} {objects:>11.2f} {fields / objects:>6.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"python": platform.python_version(), "repeats": REPEATS, "rows": rows}, indent=2
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
