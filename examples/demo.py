"""`make demo`: a simulated disaggregated fleet behind the gateway, driven by the `openai` client.

Starts simulated workers as processes (default `3e2p4d`: 3 encoders, 2 prefill, 4 decode, vLLM
NIXL / EPD dialects, real KV and embedding bytes moving between them; the P/D workers spread
over two KV-transfer zones, so the gateway places each prefill/decode pair jointly) and the
gateway in this process, sends chat and completion requests (non-streamed and streamed, with
and without an image, a forced tool call, a JSON-schema answer) through the gateway with the
unmodified `openai` client, shows what came back and which stages ran, drops a resumable
stream's connection and picks the answer up again, loads a LoRA adapter on the whole fleet and
asks for it, then runs a short concurrent load and prints a latency summary and what a
cache_aware shadow policy predicted beside the active one. Exits 0 when every request
succeeded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import openai
import trio

from lmgw.config import StreamsConfig
from lmgw.fleetspec import parse_fleet_spec
from lmgw.gateway import Gateway
from lmgw.simulate import fleet_config
from lmgw.simulators.fleet import run_fleet

MODEL = "sim-llama-8b"
KV_BYTES_PER_TOKEN = 131072  # an 8B model's KV in bf16: what the P/D workers move
# a 1x1 PNG as a data URL: the encoder stage runs for requests that carry it
IMAGE = {
    "type": "image_url",
    "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlE"
        "QVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    },
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def drive(base_url: str, n_load: int, concurrency: int) -> bool:
    """All client-side work (blocking `openai` calls): runs in a worker thread."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="demo", max_retries=0)
    ok = True

    print("\n== models ==")
    print("  ", [m.id for m in client.models.list().data])

    print("\n== chat, non-streamed ==")
    messages = [
        {"role": "user", "content": "Explain disaggregated prefill and decode in one line."}
    ]
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    print(f"   {r.choices[0].message.content!r}")
    print(
        f"   finish={r.choices[0].finish_reason} usage={r.usage.model_dump(exclude_none=True)}"
        f" in {1000 * (time.perf_counter() - t0):.0f} ms"
    )

    print("\n== chat, streamed (tokens as they arrive) ==")
    t0 = time.perf_counter()
    ttft = None
    parts = []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(choice.delta.content)
                print(choice.delta.content, end="", flush=True)
    print(
        f"\n   TTFT {1000 * (ttft or 0):.1f} ms, total {1000 * (time.perf_counter() - t0):.0f} ms,"
        f" usage={usage.model_dump(exclude_none=True) if usage else None}"
    )
    if "".join(parts) != r.choices[0].message.content:
        print("   !! streamed text differs from the non-streamed text for the same prompt")
        ok = False

    print("\n== chat with an image (encoder stage first) ==")
    with_image = [
        {"role": "user", "content": [{"type": "text", "text": "Describe this image."}, IMAGE]}
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=with_image, max_tokens=16
    )
    r = raw.parse()
    print(f"   {r.choices[0].message.content!r}")
    print(f"   stages before decode (Server-Timing): {raw.headers.get('server-timing')}")
    print(f"   usage={r.usage.model_dump(exclude_none=True)}")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=4
    )
    print(f"   a text-only request skips the encoder: {raw.headers.get('server-timing')}")

    print("\n== completion, non-streamed ==")
    c = client.completions.create(
        model=MODEL, prompt="The gateway routes each request to", max_tokens=12
    )
    print(f"   {c.choices[0].text!r}  usage={c.usage.model_dump(exclude_none=True)}")

    print("\n== a completions batch, 2 samples each (one P/D pair per prompt and sample) ==")
    b = client.completions.create(
        model=MODEL, prompt=["Prefill is", "Decode is"], n=2, seed=1, max_tokens=6
    )
    for choice in b.choices:
        print(f"   [{choice.index}] {choice.text!r}")
    ok &= sorted(ch.index for ch in b.choices) == [0, 1, 2, 3]

    print("\n== tool call (the gateway parses the model's call text into tool_calls) ==")
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],
        tool_choice="required",
        max_tokens=64,
    )
    calls = r.choices[0].message.tool_calls or []
    for call in calls:
        print(f"   {call.function.name}({call.function.arguments})  id={call.id}")
    print(f"   finish={r.choices[0].finish_reason}")
    ok &= bool(calls) and calls[0].function.name == "get_weather"

    print("\n== structured output (response_format: json_schema) ==")
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "stages": {"type": "array", "items": {"enum": ["encode", "prefill", "decode"]}},
        },
        "required": ["summary", "stages"],
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=96,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    answer = json.loads(r.choices[0].message.content or "null")
    print(f"   {answer}")
    ok &= isinstance(answer, dict) and set(schema["required"]) <= answer.keys()

    ok &= resumable_answer(base_url, messages)
    ok &= lora_adapter(base_url, client, messages)
    ok &= batch(client)

    print("\n== an error, OpenAI-shaped ==")
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        ok = False
    except openai.NotFoundError as exc:
        print(f"   {type(exc).__name__} {exc.status_code}: {exc.body}")

    print(f"\n== load: {n_load} streamed chats, {concurrency} at a time ==")
    ttfts: list[float] = []
    e2es: list[float] = []
    cached = 0

    def one(i: int) -> None:
        nonlocal cached
        prompt = [
            {"role": "system", "content": "You are a concise assistant. " * 8},
            {"role": "user", "content": f"Question {i}: what is request {i % 5}?"},
        ]
        t = time.perf_counter()
        first = None
        s = client.chat.completions.create(
            model=MODEL,
            messages=prompt,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        for ch in s:
            if first is None and ch.choices and ch.choices[0].delta.content:
                first = time.perf_counter() - t
            if ch.usage and ch.usage.prompt_tokens_details:
                cached += ch.usage.prompt_tokens_details.cached_tokens or 0
        e2es.append(time.perf_counter() - t)
        ttfts.append(first or 0.0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n_load)))
    wall = time.perf_counter() - t0
    print(
        f"   {n_load} requests in {wall:.2f} s ({n_load / wall:.1f} req/s),"
        f" prefix-cache hits: {cached} tokens"
    )
    print(
        f"   TTFT ms  p50 {1000 * pct(ttfts, 0.5):7.1f}  p90 {1000 * pct(ttfts, 0.9):7.1f}"
        f"  p99 {1000 * pct(ttfts, 0.99):7.1f}"
    )
    print(
        f"   e2e  ms  p50 {1000 * pct(e2es, 0.5):7.1f}  p90 {1000 * pct(e2es, 0.9):7.1f}"
        f"  p99 {1000 * pct(e2es, 0.99):7.1f}  mean {1000 * statistics.mean(e2es):.1f}"
    )
    shadow_summary(base_url)
    return ok


def resumable_answer(base_url: str, messages: list[dict]) -> bool:
    """A stream whose connection drops after a few events, picked up where it stopped
    (streams.resumable; the SDK's ``resumable=True`` does this by itself)."""
    print("\n== a resumable answer: the connection drops, the answer does not ==")
    host, port = base_url.removeprefix("http://").split(":")
    body = {"model": MODEL, "messages": messages, "max_tokens": 24, "stream": True}
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body),
        {"content-type": "application/json", "x-lmgw-resumable": "1"},
    )  # fmt: skip
    resp = conn.getresponse()
    token = resp.getheader("x-lmgw-stream-id")
    before, last = sse_text(resp, stop_after=4)
    conn.close()  # the client is gone; the generation is not
    print(f"   read {last + 1} events, then the connection closed: {before!r}")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", f"/v1/streams/{token}", headers={"last-event-id": str(last)})
    after, _ = sse_text(conn.getresponse())
    conn.close()
    print(f"   GET /v1/streams/{token} (Last-Event-ID: {last}) -> the rest: {after!r}")
    r = openai.OpenAI(base_url=base_url + "/v1", api_key="demo", max_retries=0)
    whole = r.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    same = before + after == whole.choices[0].message.content
    print(f"   the two pieces are the uninterrupted answer: {same}")
    return same


def lora_adapter(base_url: str, client: openai.OpenAI, messages: list[dict]) -> bool:
    """A LoRA adapter loaded on the whole fleet with vLLM's own call (the gateway fans it out
    to every prefill and decode worker), asked for by name, then unloaded everywhere."""
    import urllib.request

    print("\n== a LoRA adapter, loaded on every worker with one call, then a canary ==")

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(
            base_url + path, json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)

    out = post("/v1/load_lora_adapter", {"lora_name": "demo-lora", "lora_path": "/adapters/demo"})
    print(f"   POST /v1/load_lora_adapter -> loaded on {len(out['loaded'])} workers:"
          f" {[w.rsplit(':', 1)[1] for w in out['loaded']]}")  # fmt: skip
    r = client.chat.completions.create(model="demo-lora", messages=messages, max_tokens=8)
    print(f"   model={r.model!r}: {r.choices[0].message.content!r}")
    # a canary: clients keep asking for "demo-chat"; one request in four goes to the adapter
    route = {"targets": [{"model": MODEL, "weight": 3}, {"model": "demo-lora", "weight": 1}]}
    req = urllib.request.Request(
        base_url + "/admin/model_routes/demo-chat", json.dumps(route).encode(),
        {"content-type": "application/json"}, method="PUT",
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        shares = {t["model"]: t["share"] for t in json.load(resp)["targets"]}
    print(f"   PUT /admin/model_routes/demo-chat -> shares {shares}")
    served = [
        client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=4).model
        for _ in range(8)
    ]
    split = {m: served.count(m) for m in sorted(set(served))}
    print(f"   8 requests for 'demo-chat' were served by {split}")
    gone = post("/v1/unload_lora_adapter", {"lora_name": "demo-lora"})
    print(f"   POST /v1/unload_lora_adapter -> unloaded from {len(gone['unloaded'])} workers")
    canary_ok = split == {MODEL: 6, "demo-lora": 2}
    return r.model == "demo-lora" and canary_ok and not out["failed"] and not gone["failed"]


def batch(client: openai.OpenAI) -> bool:
    """OpenAI's Batch API on the gateway: a file of requests run on the fleet in the
    background (at a low admission priority), the answers read from the output file."""
    print("\n== a batch: a JSONL file of requests, run on the fleet ==")
    lines = [
        json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "max_tokens": 6,
                             "messages": [{"role": "user", "content": f"Question {i}?"}]}})
        for i in range(4)
    ]  # fmt: skip
    f = client.files.create(file=("questions.jsonl", "\n".join(lines).encode()), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while b.status not in ("completed", "failed", "cancelled", "expired"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        b = client.batches.retrieve(b.id)
    counts = b.request_counts
    print(f"   {b.id}: {b.status}, {counts.completed}/{counts.total} answered" if counts else b)
    if b.output_file_id is None:
        return False
    first = json.loads(client.files.content(b.output_file_id).text.splitlines()[0])
    text = first["response"]["body"]["choices"][0]["message"]["content"]
    print(f"   {first['custom_id']}: {text!r} (output file {b.output_file_id})")
    return b.status == "completed" and counts is not None and counts.completed == 4


def sse_text(resp: http.client.HTTPResponse, stop_after: int = 0) -> tuple[str, int]:
    """Content of an SSE answer (stopping after ``stop_after`` events if set), and the last
    event id read."""
    text, last, n = [], -1, 0
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("id: "):
            last = int(line[4:])
        elif line.startswith("data: {"):
            for c in json.loads(line[6:]).get("choices", []):
                text.append(c.get("delta", {}).get("content") or "")
            n += 1
            if stop_after and n >= stop_after:
                break
    return "".join(text), last


def shadow_summary(base_url: str) -> None:
    """What a cache_aware shadow predicted next to the active policy (routing.shadow_policies)."""
    import urllib.request

    text = urllib.request.urlopen(base_url + "/metrics", timeout=10).read().decode()
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for line in text.splitlines():
        for metric in ("predicted_cached_tokens_total", "prompt_tokens_total", "load_skew"):
            if line.startswith(f"lmgw_shadow_{metric}{{"):
                labels, value = line[line.index("{") + 1 :].split("} ")
                fields = dict(kv.split("=") for kv in labels.split(","))
                key = (fields["role"].strip('"'), fields["policy"].strip('"'))
                rows.setdefault(key, {})[metric] = float(value)
    if not rows:
        return
    print("\n== shadow policies: what each policy predicts on this traffic (never obeyed) ==")
    for (role, policy), r in sorted(rows.items()):
        prompt = r.get("prompt_tokens_total") or 0.0
        predicted = r.get("predicted_cached_tokens_total", 0.0)
        hits = f"{100 * predicted / prompt:5.1f}%" if prompt and predicted else "    - "
        print(
            f"   {role:<2} {policy:<12} predicted prefix-cache hits {hits}"
            f"  load skew {r.get('load_skew', 0.0):.2f}"
        )


async def main(args: argparse.Namespace) -> int:
    spec = parse_fleet_spec(args.workers)
    counts = {role: n for role, n in spec.counts().items() if n}
    async with trio.open_nursery() as nursery:
        print(f"starting simulated workers {spec} (flow {spec.flow}, speed x{args.speed:g}) ...")
        # generating workers take LoRA adapters at run time (vLLM's runtime adapter API); the
        # P/D workers sit in --zones KV-transfer zones and model moving KV between them
        role_args = {role: ["--enable-lora"] for role in counts if role != "e"}
        for role in ("p", "d"):
            if args.zones and role in role_args:
                role_args[role] += ["--kv-bytes-per-token", str(KV_BYTES_PER_TOKEN)]
        fleet = await nursery.start(
            lambda task_status: run_fleet(
                counts,
                model=MODEL,
                speed=args.speed,
                role_args=role_args,
                zones=args.zones,
                task_status=task_status,
            )
        )
        gw_args = argparse.Namespace(
            host="127.0.0.1", port=0, model=MODEL, dialect=args.dialect,
            shadow_policies=["cache_aware"],  # asked beside the active policy, never obeyed
            zones=args.zones, kv_bytes_per_token=KV_BYTES_PER_TOKEN,
        )  # fmt: skip
        config = fleet_config(fleet, spec, gw_args)
        config = msgspec.structs.replace(config, streams=StreamsConfig(resumable=True))
        gateway = Gateway(config)
        t0 = time.perf_counter()
        await nursery.start(gateway.run)
        print(
            f"gateway on {gateway.url}"
            f" (ready in {1000 * (time.perf_counter() - t0):.0f} ms) in front of:"
        )
        for m in fleet.members:
            print(f"   {m.role:<2} {m.url}" + (f"  zone {m.zone}" if m.zone else ""))
        ok = await trio.to_thread.run_sync(drive, gateway.url, args.requests, args.concurrency)
        served = {
            w.id.rsplit(":", 1)[1] + f"({w.role})": w.total_requests for w in gateway.registry
        }
        print(f"\nrequests per worker (port(role): count): {served}")
        if gateway.planner is not None:  # what it would ask an autoscaler for, per pool
            targets = config.planner
            print(
                f"\nplanner (p90 targets: TTFT {targets.ttft_slo_s:g} s, between tokens"
                f" {targets.itl_slo_s:g} s; a fall waits {targets.scale_down_delay_s:g} s):"
            )
            for plan in gateway.planner.evaluate(time.monotonic()).values():
                capacity = "-" if plan.capacity is None else plan.capacity
                print(
                    f"   {plan.role:<2} {plan.workers} worker(s), {plan.desired} recommended"
                    f" ({plan.status}; load {plan.load:.1f}, capacity {capacity} per worker)"
                )
        if args.zones and "p" in counts:
            pairs = gateway.metrics.placements.values
            same = sum(v for (_, zones), v in pairs.items() if zones == "same_zone")
            cross = sum(v for (_, zones), v in pairs.items() if zones == "cross_zone")
            print(
                f"P/D pairs placed jointly (prefill + decode in one KV-transfer zone where it"
                f" pays): {same:.0f} within a zone, {cross:.0f} across zones"
            )
        nursery.cancel_scope.cancel()
    print("demo", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="3e2p4d", help="fleet spec, e.g. 3e2p4d, 2p2d, 2pd")
    ap.add_argument("--dialect", default=None, help="default: vLLM's for the flow (nixl / epd)")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--zones", type=int, default=2, help="KV-transfer zones of the P/D workers")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    sys.exit(trio.run(main, ap.parse_args()))
