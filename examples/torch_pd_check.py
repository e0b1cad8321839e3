"""Check disaggregated serving with a real model: P -> D through lmgw, KV as tensor frames.

Starts three ``examples/torch_worker.py`` workers on one GPU (merged ``pd``, prefill ``p``,
decode ``d``; the same seeded random Llama in each) and two gateways in this process: one
serving the model merged, one split (the prefill's KV goes back through the gateway to the
decode worker). The same greedy chat requests go to both, and:

* the split answer must equal the merged one, text and token counts, for every prompt (the decode
  worker computes from the very KV tensors the merged worker keeps);
* a streamed split answer must equal the non-streamed one;
* each answer is also compared with ``transformers``' own ``generate`` on the same prompt ids
  (reported, not required: its kernels round differently from a cached step).

Prints a summary, writes JSON (``--out``), exits 1 on any required mismatch. Needs torch and
transformers (a GPU machine's image has both) and lmgw importable::

    PYTHONPATH=src python examples/torch_pd_check.py --device cuda --out /tmp/pd.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio

from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    ModelConfig,
    NativeConfig,
    RoutingConfig,
    ServerConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.simulators import model_files
from lmgw.text.service import load_model_texts

MODEL = "torch-llm"
HERE = Path(__file__).resolve().parent
SENTENCE = "Disaggregated serving splits prefill and decode across workers. "


def spawn_worker(role: str, tokenizer_dir: str, ns: argparse.Namespace) -> tuple[Any, str]:
    argv = [sys.executable, str(HERE / "torch_worker.py"), "--role", role,
            "--random-init", tokenizer_dir, "--served-model-name", MODEL,
            "--device", ns.device, "--dtype", ns.dtype, "--layers", str(ns.layers),
            "--hidden", str(ns.hidden), "--heads", str(ns.heads), "--seed", "0",
            "--bind", "tcp://127.0.0.1:0", "--control-bind", "auto",
            "--shm-threshold", str(ns.shm_threshold)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"worker {role} did not start (exit {proc.wait()})")
    return proc, "zmq+" + line.split()[1]


def gateway_config(
    flow: str, workers: list[tuple[str, str]], tokenizer_dir: str, shm_threshold: int
) -> GatewayConfig:
    return GatewayConfig(
        native=NativeConfig(shm_threshold_bytes=shm_threshold),
        server=ServerConfig(port=0),
        health=HealthConfig(native_heartbeat_interval_s=0.5, native_heartbeat_timeout_s=30.0),
        routing=RoutingConfig(policy="round_robin"),
        models=[ModelConfig(name=MODEL, flow=flow, tokenizer=tokenizer_dir)],
        workers=[WorkerConfig(url=u, role=r, id=f"{r}{i}") for i, (r, u) in enumerate(workers)],
    )


def post(url: str, body: dict[str, Any]) -> tuple[Any, float]:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{url}: {exc.code} {exc.read().decode(errors='replace')}") from None
    elapsed = time.perf_counter() - t0
    if body.get("stream"):
        text = ""
        for line in raw.decode().splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                for c in event.get("choices", ()):
                    text += c["delta"].get("content") or ""
        return text, elapsed
    return json.loads(raw), elapsed


def reference(prompt_ids: list[list[int]], tokenizer_dir: str, ns: argparse.Namespace) -> list[str]:
    """``transformers``' greedy ``generate`` on the same model and prompt ids."""
    import torch
    from tokenizers import Tokenizer

    sys.path.insert(0, str(HERE))
    from torch_worker import random_model

    ns.logit_scale, ns.seed = 8.0, 0
    model = random_model(tokenizer_dir, ns).to(ns.device, getattr(torch, ns.dtype)).eval()
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids], device=ns.device)
        with torch.inference_mode():
            y = model.generate(
                x, max_new_tokens=ns.max_tokens, min_new_tokens=ns.max_tokens, do_sample=False
            )
        out.append(tok.decode(y[0, len(ids) :].tolist()))
    return out


async def check(ns: argparse.Namespace, tokenizer_dir: str, urls: dict[str, str]) -> dict:
    shm = ns.shm_threshold
    gw_merged = Gateway(gateway_config("pd", [("pd", urls["pd"])], tokenizer_dir, shm))
    split_workers = [("p", urls["p"]), ("d", urls["d"])]
    gw_split = Gateway(gateway_config("p/d", split_workers, tokenizer_dir, shm))
    text = load_model_texts([ModelConfig(name=MODEL, tokenizer=tokenizer_dir)])[MODEL]
    lengths = [1, 3, 10, 30, 100, 300][: ns.prompts]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            merged = f"http://127.0.0.1:{await nursery.start(gw_merged.run)}"
            split = f"http://127.0.0.1:{await nursery.start(gw_split.run)}"
        await trio.sleep(1.0)  # the channels register
        rows = []
        for n in lengths:
            messages = [{"role": "user", "content": SENTENCE * n}]
            body = {"model": MODEL, "messages": messages, "max_tokens": ns.max_tokens,
                    "temperature": 0}  # fmt: skip
            ids = await text.chat_ids({"messages": messages})
            row: dict[str, Any] = {"sentences": n, "prompt_tokens": len(ids), "ids": ids}
            for name, url in (("merged", merged), ("split", split)):
                times = []
                for _ in range(ns.repeats):
                    answer, elapsed = await trio.to_thread.run_sync(post, url, body)
                    times.append(elapsed)
                row[name] = answer["choices"][0]["message"]["content"]
                row[name + "_usage"] = answer["usage"]
                row[name + "_s"] = statistics.median(times)
            streamed, _ = await trio.to_thread.run_sync(post, split, {**body, "stream": True})
            row["split_streamed"] = streamed
            rows.append(row)
        handoff = dict(gw_split.metrics.handoff_bytes.values)
        by_shm = all(w.channel.session.shm for w in gw_split.registry)
        by_kind: dict[str, float] = {}
        for (kind, _via), nbytes in handoff.items():
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
        nursery.cancel_scope.cancel()
    return {
        "rows": rows,
        "handoff_bytes": by_kind,
        "handoff_bytes_by_path": {f"{kind} {via}": v for (kind, via), v in handoff.items()},
        "shared_memory": by_shm,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shm-threshold",
        type=int,
        default=16 << 20,
        help="native.shm_threshold_bytes (0: the KV goes as frames through the gateway)",
    )
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    tokenizer_dir = str(model_files.default_model_dir())
    procs = []
    try:
        urls = {}
        for role in ("pd", "p", "d"):
            proc, urls[role] = spawn_worker(role, tokenizer_dir, ns)
            procs.append(proc)
        result = trio.run(check, ns, tokenizer_dir, urls)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    refs = reference([row["ids"] for row in result["rows"]], tokenizer_dir, ns)
    failures = []
    print(f"{'prompt tokens':>13} {'merged == split':>15} {'stream':>6} {'== HF generate':>14} "
          f"{'merged s':>9} {'split s':>8}")  # fmt: skip
    for row, ref in zip(result["rows"], refs, strict=True):
        counts = [(u["prompt_tokens"], u["completion_tokens"])
                  for u in (row["merged_usage"], row["split_usage"])]  # fmt: skip
        same = row["merged"] == row["split"] and counts[0] == counts[1]
        streamed = row["split_streamed"] == row["split"]
        row["hf_generate_equal"] = row["merged"] == ref
        row.pop("ids")
        if not same:
            failures.append(f"{row['prompt_tokens']} tokens: merged {row['merged']!r} split "
                            f"{row['split']!r}")  # fmt: skip
        if not streamed:
            failures.append(f"{row['prompt_tokens']} tokens: streamed {row['split_streamed']!r}")
        if not row["merged"]:
            failures.append(f"{row['prompt_tokens']} tokens: empty answer")
        cells = [row["prompt_tokens"], same, streamed, row["hf_generate_equal"]]
        print(" ".join(f"{c!s:>{w}}" for c, w in zip(cells, (13, 15, 6, 14), strict=True)),
              f"{row['merged_s']:>9.3f} {row['split_s']:>8.3f}")  # fmt: skip
    print("hand-off bytes through the gateway:", result["handoff_bytes"],
          f"(shared memory from {ns.shm_threshold} bytes)" if result["shared_memory"]
          else "(as frames)")  # fmt: skip
    kv = result["handoff_bytes"].get("kv", 0)
    per_token = kv / max(1, sum(r["prompt_tokens"] - 1 for r in result["rows"]) * (ns.repeats + 1))
    print(f"KV per prompt token: {per_token:.0f} bytes (layers x 2 x kv heads x head dim x size)")
    result.update(
        device=ns.device, dtype=ns.dtype, layers=ns.layers, hidden=ns.hidden,
        failures=failures, kv_bytes_per_token=per_token,
    )  # fmt: skip
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=1))
    for f in failures:
        print("FAIL", f)
    print("OK" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
