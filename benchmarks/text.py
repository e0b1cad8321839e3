"""Tokenization and the event loop: tokens/s inline vs off-loop, the loop stall each causes, the
thread hop's break-even, and what the segment (prefix) cache saves.

Why: `ModelTokenizer.encode_async` encodes short texts inline and sends long ones to a worker
thread through `encode_batch_fast` (which releases the GIL; `encode` does not), and caches the
ids of long stretches between special tokens. This script checks those choices on the
sim-model tokenizer (`simulators/model_files.py`, built locally, ~1.9k-token vocabulary):

1. tokens/s for 1k, 8k and 32k-token prompts: `encode` inline vs `encode_async` off-loop;
2. the event-loop stall while a prompt is tokenized: the longest gap between two ticks of a
   ticker task. Two tickers: "busy" (`await trio.lowlevel.checkpoint()` in a loop: the loop is
   never idle, the worst case on a shared 2-core box, where the OS may preempt it for a 4 ms
   tick) and "idle" (`await trio.sleep(0.0005)`: a mostly idle gateway; its gap includes the
   0.5 ms sleep). Target: <= 5 ms off-loop;
3. the thread hop's break-even: loop time of short texts inline vs wall time off-loop;
4. the segment cache: a chat whose long system turn every request shares, encoded with the cache
   off, cold (first request) and warm; also with 256 extra special tokens to split on (as
   Llama-3's reserved tokens), which is what the split costs;
5. a shared document and a new question in one user turn (RAG): one stretch, so a whole-stretch
   cache never hits it; with the cache cutting long stretches into chunks (the default) only
   the chunk holding the question is encoded; side by side with chunking off;
6. short turns (session 23): every request's prompt, in order, for chats of short turns, with
   the cache off, caching only stretches of 1024 characters or more (the default until session
   23) and caching every stretch (the default now): conversations whose history grows by a
   user and an assistant turn per request, 8 of them interleaved; a short system turn every
   request shares and a new user turn; and no sharing at all (the cost of splitting);
7. rendering the chat template (session 23): µs per request's render for the same multi-turn
   chats and a short shared system turn, with lmgw's sandbox (a plain dict's ``message.role``
   looked up as an item at once) and with jinja's own ``getattr`` (the attribute first, an
   AttributeError caught, then the item), alternating, the same text from both; and (session
   25) by shape, the default (``lmgw.text.template_shapes``: each shape learned once, then
   joined around the contents), the same text again. Section 6 gained (session 25) the
   segment cache with and without encoding plain ASCII stretches by pre-token
   (``lmgw.text.word_ids``).

    .venv/bin/python benchmarks/text.py [--quick]

Prints medians of 5 runs side by side and writes benchmarks/results/text.json. The "noise"
column is the CPU that other processes used during the stall runs (cores), read from /proc/stat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from tokenizers import AddedToken, Tokenizer

from lmgw.simulators import model_files
from lmgw.text import ChatTemplate, ModelTokenizer

REPEATS = 5
SIZES = (1024, 8192, 32768)
HOP_SIZES = (256, 1024, 4096, 16384)
PREFIX_SIZES = (1024, 8192, 32768)
STALL_TARGET_MS = 5.0
IDLE_TICK_S = 0.0005
RESULTS = Path(__file__).parent / "results" / "text.json"


def make_text(tok: ModelTokenizer, n_tokens: int, seed: int) -> str:
    """Prose-like text of about ``n_tokens`` tokens (words, numbers, punctuation, newlines)."""
    rng = random.Random(seed)
    words = model_files._WORDS
    out: list[str] = []
    while True:
        for _ in range(2000):
            r = rng.random()
            if r < 0.08:
                out.append(str(rng.randint(0, 99999)))
            elif r < 0.12:
                out.append(
                    "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in "abc")
                )
            else:
                out.append(rng.choice(words))
            if rng.random() < 0.1:
                out[-1] += rng.choice(".,;:!?")
            if rng.random() < 0.02:
                out[-1] += "\n"
        text = " ".join(out)
        if tok.count_tokens(text, add_special_tokens=False) >= n_tokens:
            break
    lo, hi = 0, len(text)  # trim to about n_tokens by bisection on the length
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if tok.count_tokens(text[:mid], add_special_tokens=False) >= n_tokens:
            hi = mid
        else:
            lo = mid
    return text[:hi]


def timed(fn: Callable[[], object], n: int) -> float:
    """Median seconds per call over ``n`` calls."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def timed_async(fn: Callable[[], Awaitable[object]], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


class Noise:
    """CPU used by other processes (cores) while a block runs: total busy minus our own."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def __enter__(self) -> Noise:
        self._t, self._busy, self._own = time.perf_counter(), _busy_jiffies(), os.times()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        hz = os.sysconf("SC_CLK_TCK")
        busy = (_busy_jiffies() - self._busy) / hz
        now = os.times()
        own = (now.user - self._own.user) + (now.system - self._own.system)
        if wall > 0:
            self.samples.append(max(0.0, busy - own) / wall)


async def max_stall(work: Callable[[], object], *, busy: bool) -> tuple[float, float]:
    """(longest gap between two ticks of a ticker task, wall time of ``work``) while it runs."""
    gaps: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            if busy:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(IDLE_TICK_S)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.005)  # let the ticker settle
        gaps.clear()
        t0 = time.perf_counter()
        result = work()
        if isinstance(result, Awaitable):
            await result
        wall = time.perf_counter() - t0
        await trio.sleep(IDLE_TICK_S * 2)  # the tick that ends the last gap
        done.set()
    return max(gaps), wall


async def stall_stats(work: Callable[[], object], n: int, noise: Noise) -> dict[str, float]:
    out: dict[str, float] = {}
    for busy in (True, False):
        with noise:
            runs = [await max_stall(work, busy=busy) for _ in range(n)]
        kind = "busy" if busy else "idle"
        out[f"{kind}_ms"] = statistics.median(s for s, _ in runs) * 1e3
        out[f"{kind}_max_ms"] = max(s for s, _ in runs) * 1e3
    return out


def with_reserved_tokens(folder: Path, n: int) -> ModelTokenizer:
    """The sim-model tokenizer plus ``n`` extra special tokens (like Llama-3's reserved ones)."""
    base = ModelTokenizer.load(folder)
    raw = Tokenizer.from_str(base.backend.to_str())
    raw.add_special_tokens(
        [
            AddedToken(f"<|reserved_special_token_{i}|>", special=True, normalized=False)
            for i in range(n)
        ]
    )
    return ModelTokenizer(raw, special_tokens_map=base.special_tokens_map)


async def run(args: argparse.Namespace) -> dict:
    folder = model_files.ensure_model_dir(Path(tempfile.gettempdir()) / "lmgw-bench-models")
    tok = ModelTokenizer.load(folder, offload_threshold_chars=0, offload_threads=1)
    template = ChatTemplate.load(folder, special_tokens=tok.special_tokens_map)
    n = 2 if args.quick else REPEATS
    noise = Noise()
    texts = {size: make_text(tok, size, seed=size) for size in SIZES}
    for size, text in texts.items():  # both paths must give the same ids
        assert tok.encode(text) == await tok.encode_async(text), size

    # 1. throughput and 2. stall (plain prose: add_special_tokens=True, so no segment cache)
    rows = []
    for text in texts.values():
        n_tok = tok.count_tokens(text)
        inline = timed(lambda text=text: tok.encode(text), n)
        off = await timed_async(lambda text=text: tok.encode_async(text), n)
        stall_in = await stall_stats(lambda text=text: tok.encode(text), n, noise)
        stall_off = await stall_stats(lambda text=text: tok.encode_async(text), n, noise)
        rows.append(
            {
                "tokens": n_tok,
                "chars": len(text),
                "inline_tokens_per_s": n_tok / inline,
                "offloop_tokens_per_s": n_tok / off,
                "stall_inline": stall_in,
                "stall_offloop": stall_off,
            }
        )

    # 3. the thread hop's break-even
    hop_rows = []
    base = texts[SIZES[-1]]
    for chars in HOP_SIZES:
        text = base[:chars]
        inline = timed(lambda text=text: tok.encode(text), n * 20)
        off = await timed_async(lambda text=text: tok.encode_async(text), n * 20)
        hop_rows.append(
            {
                "chars": chars,
                "tokens": tok.count_tokens(text),
                "inline_ms": inline * 1e3,
                "offloop_wall_ms": off * 1e3,
            }
        )

    # 4. the segment cache on a shared system turn
    prefix_rows = []
    reserved = with_reserved_tokens(folder, 256)
    for size in PREFIX_SIZES:
        system = make_text(tok, size, seed=size + 1)
        questions = [make_text(tok, 100, seed=s) for s in range(n * 4 + 1)]
        prompts = [
            template.render(
                [{"role": "system", "content": system}, {"role": "user", "content": q}],
                add_generation_prompt=True,
            )
            for q in questions
        ]
        plain = ModelTokenizer.load(folder, prefix_cache_chars=0)
        cached = ModelTokenizer.load(folder)
        whole = [plain.encode(p, add_special_tokens=False) for p in prompts]
        t0 = time.perf_counter()
        assert cached.encode(prompts[0], add_special_tokens=False) == whole[0]
        cold = time.perf_counter() - t0
        off = timed(lambda p=prompts[0], t=plain: t.encode(p, add_special_tokens=False), n * 4)
        rest = iter(prompts[1:])  # a new question each time: only the system turn is shared
        warm = timed(lambda t=cached, it=rest: t.encode(next(it), add_special_tokens=False), n * 4)
        assert [cached.encode(p, add_special_tokens=False) for p in prompts] == whole
        for p in prompts:
            reserved.encode(p, add_special_tokens=False)  # fill its cache
        warm_reserved = timed(
            lambda p=prompts[0]: reserved.encode(p, add_special_tokens=False), n * 4
        )
        prefix_rows.append(
            {
                "system_tokens": size,
                "prompt_tokens": len(whole[0]),
                "cache_off_ms": off * 1e3,
                "cold_ms": cold * 1e3,
                "warm_ms": warm * 1e3,
                "warm_256_specials_ms": warm_reserved * 1e3,
                "speedup_warm": off / warm,
            }
        )
    # 5. a shared document and a new question in one stretch (RAG), chunks on and off
    rag_rows = []
    for size in PREFIX_SIZES[:2]:
        doc = make_text(tok, size, seed=size + 7)
        questions = [make_text(tok, 40, seed=1000 + s) for s in range(n * 4 + 1)]
        prompts = [
            template.render(
                [{"role": "user", "content": f"Document: {doc}\n\nQuestion: {q}"}],
                add_generation_prompt=True,
            )
            for q in questions
        ]
        plain = ModelTokenizer.load(folder, prefix_cache_chars=0)
        whole = [plain.encode(p, add_special_tokens=False) for p in prompts]
        row: dict[str, float] = {"doc_tokens": size, "prompt_tokens": len(whole[0])}
        for label, chunk in (("chunks", None), ("whole_stretches", 0)):
            kw = {} if chunk is None else {"prefix_cache_chunk_chars": chunk}
            cached = ModelTokenizer.load(folder, **kw)
            assert cached.encode(prompts[0], add_special_tokens=False) == whole[0]
            rest = iter(prompts[1:])
            row[f"{label}_ms"] = 1e3 * timed(
                lambda t=cached, it=rest: t.encode(next(it), add_special_tokens=False), n * 4
            )
            assert [cached.encode(p, add_special_tokens=False) for p in prompts] == whole
        row["speedup"] = row["whole_stretches_ms"] / row["chunks_ms"]
        rag_rows.append(row)
    turns_rows = short_turns(tok, template, folder, n)
    render_rows = renders(tok, template, n)
    return {
        "rows": rows,
        "hop": hop_rows,
        "prefix": prefix_rows,
        "rag": rag_rows,
        "short_turns": turns_rows,
        "render": render_rows,
        "repeats": n,
        "noise_cores": {
            "median": statistics.median(noise.samples),
            "max": max(noise.samples),
        },
    }


SHORT_TURN_CONFIGS = (  # label: ModelTokenizer.load options
    ("cache_off", {"prefix_cache_chars": 0}),
    ("min_1024", {"prefix_cache_min_chars": 1024, "word_ids": False}),
    ("no_word_ids", {"word_ids": False}),
    ("default", {}),
)


def short_turns(tok: ModelTokenizer, template: ChatTemplate, folder: Path, n: int) -> list[dict]:
    """Section 6: µs per request's prompt, each workload under each SHORT_TURN_CONFIGS entry
    (a fresh tokenizer per run: the first requests are cold, as after a start)."""
    system = {"role": "system", "content": "You are a concise assistant for an engineering team."}

    def render(messages: list[dict]) -> str:
        return template.render(messages, add_generation_prompt=True)

    seed = iter(range(10_000, 100_000))
    conversations: list[list[dict]] = [[system] for _ in range(8)]
    multi_turn = []
    for _ in range(12):  # 12 rounds of 8 interleaved conversations
        for history in conversations:
            history.append({"role": "user", "content": make_text(tok, 50, next(seed))})
            multi_turn.append(render(history))
            history.append({"role": "assistant", "content": make_text(tok, 60, next(seed))})
    shared = [
        render([system, {"role": "user", "content": make_text(tok, 30, next(seed))}])
        for _ in range(96)
    ]
    unshared = [
        render(
            [
                {"role": "system", "content": make_text(tok, 15, next(seed))},
                {"role": "user", "content": make_text(tok, 30, next(seed))},
            ]
        )
        for _ in range(96)
    ]
    plain = ModelTokenizer.load(folder, prefix_cache_chars=0)
    rows = []
    for name, prompts in (
        ("multi-turn", multi_turn),
        ("shared system", shared),
        ("nothing shared", unshared),
    ):
        want = [plain.encode(p, add_special_tokens=False) for p in prompts]
        row: dict[str, Any] = {
            "workload": name,
            "prompts": len(prompts),
            "mean_chars": sum(map(len, prompts)) / len(prompts),
        }
        for label, options in SHORT_TURN_CONFIGS:
            runs = []
            for _ in range(n):
                t = ModelTokenizer.load(folder, **options)
                t0 = time.perf_counter()
                got = [t.encode(p, add_special_tokens=False) for p in prompts]
                runs.append((time.perf_counter() - t0) / len(prompts))
                assert got == want, (name, label)
            row[f"{label}_us"] = statistics.median(runs) * 1e6
        row["default_vs_min_1024"] = row["default_us"] / row["min_1024_us"]
        row["word_ids_ratio"] = row["default_us"] / row["no_word_ids_us"]
        rows.append(row)
    return rows


def renders(tok: ModelTokenizer, template: ChatTemplate, n: int) -> list[dict]:
    """Section 7: µs per render, lmgw's sandbox vs jinja's getattr, alternating."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from lmgw.text import chat_template

    sandbox = chat_template._Sandbox
    fast = sandbox.getattr
    system = {"role": "system", "content": "You are a concise assistant for an engineering team."}
    seed = iter(range(200_000, 300_000))
    multi_turn: list[list[dict]] = []
    history = [system]
    for turn in range(8 * 12):
        if turn % 12 == 0:
            history = [system]
        history = [*history, {"role": "user", "content": make_text(tok, 50, next(seed))}]
        multi_turn.append(history)
        history = [*history, {"role": "assistant", "content": make_text(tok, 60, next(seed))}]
    shared = [[system, {"role": "user", "content": make_text(tok, 30, next(seed))}]] * 96
    tools = [  # an agent's first turn: six tools, the same in every request
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": make_text(tok, 20, next(seed)),
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string", "description": "the query"}},
                    "required": ["q"],
                },
            },
        }
        for i in range(6)
    ]
    first_turns = [[system, {"role": "user", "content": make_text(tok, 30, next(seed))}]
                   for _ in range(96)]  # fmt: skip
    rows = []
    for name, conversations, with_tools in (
        ("multi-turn", multi_turn, None),
        ("shared system", shared, None),
        ("+ six tools", first_turns, tools),
    ):
        mean_messages = statistics.mean(map(len, conversations))
        row: dict[str, Any] = {"workload": name, "messages": mean_messages}
        texts = {}
        full = template._render  # (jinja every time: render() takes plain chats by shape)
        for label, getattr_ in (("jinja", ImmutableSandboxedEnvironment.getattr), ("lmgw", fast)):
            sandbox.getattr = getattr_  # type: ignore[method-assign]
            try:
                runs = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    out = [
                        full(c, add_generation_prompt=True, tools=with_tools) for c in conversations
                    ]
                    runs.append((time.perf_counter() - t0) / len(conversations))
                texts[label] = out
            finally:
                sandbox.getattr = fast  # type: ignore[method-assign]
            row[f"{label}_us"] = statistics.median(runs) * 1e6
        runs = []
        for _ in range(n):  # by shape (the default): learned once per shape, then joined
            t0 = time.perf_counter()
            out = [
                template.render(c, add_generation_prompt=True, tools=with_tools)
                for c in conversations
            ]
            runs.append((time.perf_counter() - t0) / len(conversations))
        texts["shapes"] = out
        row["shapes_us"] = statistics.median(runs) * 1e6
        assert texts["jinja"] == texts["lmgw"] == texts["shapes"], name
        row["ratio"] = row["lmgw_us"] / row["jinja_us"]
        row["shapes_ratio"] = row["shapes_us"] / row["lmgw_us"]
        rows.append(row)
    return rows


def report(res: dict) -> None:
    py = platform.python_version()
    print(f"tokenization, sim-model tokenizer, median of {res['repeats']} runs, python {py}")
    print(
        f"{'tokens':>7} {'inline tok/s':>13} {'off-loop tok/s':>15} | stall ms (max):"
        f" {'inline busy':>13} {'off-loop busy':>14} {'inline idle':>13} {'off-loop idle':>14}"
    )
    for r in res["rows"]:
        si, so = r["stall_inline"], r["stall_offloop"]
        print(
            f"{r['tokens']:>7} {r['inline_tokens_per_s']:>13,.0f}"
            f" {r['offloop_tokens_per_s']:>15,.0f} | {'':>14}"
            f" {si['busy_ms']:>6.2f} ({si['busy_max_ms']:>5.1f})"
            f" {so['busy_ms']:>6.2f} ({so['busy_max_ms']:>5.1f})"
            f" {si['idle_ms']:>6.2f} ({si['idle_max_ms']:>5.1f})"
            f" {so['idle_ms']:>6.2f} ({so['idle_max_ms']:>5.1f})"
        )
    big = res["rows"][-1]["stall_offloop"]
    met = lambda v: "met" if v <= STALL_TARGET_MS else "MISSED"  # noqa: E731
    print(
        f"stall target <= {STALL_TARGET_MS} ms off-loop, {res['rows'][-1]['tokens']} tokens: "
        f"idle ticker {met(big['idle_max_ms'])} (max {big['idle_max_ms']:.2f} ms), busy ticker "
        f"{met(big['busy_ms'])} (median {big['busy_ms']:.2f} ms, max {big['busy_max_ms']:.2f} ms);"
        f" other load: {res['noise_cores']['median']:.2f} cores median,"
        f" {res['noise_cores']['max']:.2f} max"
    )
    print()
    print("thread hop: inline (loop time) vs off-loop (wall time)")
    print(f"{'chars':>7} {'tokens':>7} {'inline ms':>10} {'off-loop ms':>12}")
    for r in res["hop"]:
        print(
            f"{r['chars']:>7} {r['tokens']:>7} {r['inline_ms']:>10.3f}"
            f" {r['offloop_wall_ms']:>12.3f}"
        )
    print()
    print("segment cache: a shared system turn + a new 100-token question per request")
    print(
        f"{'system tok':>10} {'prompt tok':>10} {'cache off ms':>13} {'cold ms':>8} {'warm ms':>8}"
        f" {'warm, 256 specials':>19} {'speedup':>8}"
    )
    for r in res["prefix"]:
        print(
            f"{r['system_tokens']:>10} {r['prompt_tokens']:>10} {r['cache_off_ms']:>13.3f}"
            f" {r['cold_ms']:>8.3f} {r['warm_ms']:>8.3f} {r['warm_256_specials_ms']:>19.3f}"
            f" {r['speedup_warm']:>7.1f}x"
        )
    print()
    print("segment cache, RAG: a shared document + a new 40-token question in one user turn")
    print(
        f"{'doc tok':>8} {'prompt tok':>10} {'chunks ms':>10} {'whole stretches ms':>19}"
        f" {'ratio':>6}"
    )
    for r in res["rag"]:
        print(
            f"{r['doc_tokens']:>8} {r['prompt_tokens']:>10} {r['chunks_ms']:>10.3f}"
            f" {r['whole_stretches_ms']:>19.3f} {r['speedup']:>5.1f}x"
        )
    print()
    print("segment cache, short turns: µs per request's prompt (every request, cold ones too)")
    print(
        f"{'workload':<15} {'prompts':>7} {'chars':>6} {'cache off':>10} {'>=1024 only':>12}"
        f" {'every stretch':>14} {'+ word ids':>11} {'ratio':>6} {'words':>6}"
    )
    for r in res["short_turns"]:
        print(
            f"{r['workload']:<15} {r['prompts']:>7} {r['mean_chars']:>6.0f}"
            f" {r['cache_off_us']:>10.1f} {r['min_1024_us']:>12.1f} {r['no_word_ids_us']:>14.1f}"
            f" {r['default_us']:>11.1f} {r['default_vs_min_1024']:>5.2f}x"
            f" {r['word_ids_ratio']:>5.2f}x"
        )
    print("  (ratio: every stretch + word ids vs >=1024 only; words: with vs without word ids)")
    print()
    print("chat template render: µs per request, jinja's getattr vs lmgw's sandbox vs by shape")
    print(
        f"{'workload':<15} {'messages':>8} {'jinja':>8} {'lmgw':>8} {'ratio':>6} {'shapes':>8}"
        f" {'ratio':>6}"
    )
    for r in res["render"]:
        print(
            f"{r['workload']:<15} {r['messages']:>8.1f} {r['jinja_us']:>8.1f}"
            f" {r['lmgw_us']:>8.1f} {r['ratio']:>5.2f}x {r['shapes_us']:>8.1f}"
            f" {r['shapes_ratio']:>5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    args = parser.parse_args()
    res = trio.run(run, args)
    report(res)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "stall_target_ms": STALL_TARGET_MS,
        "idle_tick_s": IDLE_TICK_S,
        "tokenizer": "sim-model (simulators/model_files.py)",
    }
    RESULTS.write_text(json.dumps({"benchmark": "text", "meta": meta, **res}, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
