"""The price of continuing a constrained answer on another worker: replaying its partial text
through the constraint's grammar (``lmgw.grammar.resume.resume_grammar``).

Why: the replay runs only when a stream breaks (nothing is parsed on the hot path), but then it
sits between the break and the first token of the continuation, so it must stay small next to
a prefill (milliseconds). Measured per partial answer size, side by side with decoding the same
bytes as JSON with msgspec (the least any look at the text can cost) and with building the
constraint's grammar alone.

Scenarios: a pydantic-style schema (nested objects, arrays, enums, optional fields) whose answer
is cut at 25%, 50% and 100% of 1, 8 and 64 KiB documents; a regex; a choice list.

With ``--xgrammar`` (when ``import xgrammar`` works), each continuation grammar is also compiled
by xgrammar (vLLM's default backend) and must accept the rest of the answer.

    .venv/bin/python benchmarks/structured_resume.py [--quick] [--xgrammar]

Prints medians of 5 runs and writes benchmarks/results/structured_resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from lmgw.grammar.resume import constraint_grammars, resume_grammar
from lmgw.protocol import StructuredOutput

REPEATS = 5
RESULTS = Path(__file__).parent / "results" / "structured_resume.json"

SCHEMA: dict[str, Any] = {
    "$defs": {
        "Item": {
            "type": "object",
            "properties": {
                "sku": {"type": "string"},
                "qty": {"type": "integer", "minimum": 0},
                "price": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "kind": {"enum": ["book", "tool", "food"]},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["sku", "qty", "price", "tags", "kind"],
        }
    },
    "type": "object",
    "properties": {
        "order": {"type": "string"},
        "paid": {"type": "boolean"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
    },
    "required": ["order", "paid", "items"],
}
WORDS = ("alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "tau", "phi", "rho")


def document(size: int, seed: int) -> str:
    """A schema-valid answer of about ``size`` bytes, with the spacing engines write."""
    rng = random.Random(seed)
    items = []
    text = ""
    while len(text) < size:
        item: dict[str, Any] = {
            "sku": "-".join(rng.choices(WORDS, k=2)),
            "qty": rng.randrange(100),
            "price": round(rng.random() * 100, 2),
            "tags": rng.choices(WORDS, k=rng.randrange(4)),
            "kind": rng.choice(["book", "tool", "food"]),
        }
        if rng.random() < 0.5:
            item["note"] = rng.choice([None, " ".join(rng.choices(WORDS, k=5))])
        items.append(item)
        text = json.dumps({"order": "A-1", "paid": True, "items": items}, indent=None)
    return text


def median_us(fn: Callable[[], Any], inner: int) -> float:
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(runs)


def xgrammar_check(c: StructuredOutput, prefix: str, rest: str) -> bool | None:
    try:
        import torch  # noqa: F401 - xgrammar imports it; its compiler never uses it
    except ImportError:  # the tests' stand-in (make test installs xgrammar without torch)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "xgrammar_stub"))
    try:
        import xgrammar as xg  # optional
        from xgrammar.testing import _is_grammar_accept_string
    except Exception:
        return None
    return bool(_is_grammar_accept_string(xg.Grammar.from_ebnf(resume_grammar(c, prefix)), rest))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller documents, fewer loops")
    ap.add_argument("--xgrammar", action="store_true", help="also compile with xgrammar")
    args = ap.parse_args()
    sizes = [1024, 8192] if args.quick else [1024, 8192, 65536]
    json_c = StructuredOutput("json", SCHEMA)
    rows = []
    build = median_us(lambda: constraint_grammars(json_c), 20)
    print(f"schema grammar build: {build:.0f} µs")
    for size in sizes:
        doc = document(size, size)
        for share in (0.25, 0.5, 1.0):
            cut = int(len(doc) * share) - (1 if share == 1.0 else 0)
            prefix, rest = doc[:cut], doc[cut:]
            inner = max(1, 200_000 // max(cut, 1))
            replay = median_us(lambda p=prefix: resume_grammar(json_c, p), inner)
            raw = doc.encode()
            decode = median_us(lambda d=raw: msgspec.json.decode(d), inner * 10)
            ok = xgrammar_check(json_c, prefix, rest) if args.xgrammar else None
            rows.append({"kind": "json", "bytes": cut, "replay_us": replay, "decode_us": decode,
                         "ratio": replay / decode, "us_per_kib": replay / (cut / 1024),
                         "xgrammar_accepts_rest": ok})  # fmt: skip
    regex = StructuredOutput("regex", r"(?:[a-z]{4,8} ){20,40}[0-9]{3}-[0-9]{4}")
    rtext = " ".join(random.Random(1).choices(["abcd", "efghij", "klmnopqr"], k=30)) + " 555-1234"
    choice = StructuredOutput("choice", [f"option {i}: " + " ".join(WORDS) for i in range(50)])
    for name, c, text in (("regex", regex, rtext), ("choice", choice, choice.spec[17])):
        prefix, rest = text[: len(text) // 2], text[len(text) // 2 :]
        replay = median_us(lambda c=c, p=prefix: resume_grammar(c, p), 50)
        quoted = msgspec.json.encode(text)
        decode = median_us(lambda q=quoted: msgspec.json.decode(q), 500)
        ok = xgrammar_check(c, prefix, rest) if args.xgrammar else None
        rows.append({"kind": name, "bytes": len(prefix), "replay_us": replay,
                     "decode_us": decode, "ratio": replay / decode,
                     "us_per_kib": replay / (len(prefix) / 1024),
                     "xgrammar_accepts_rest": ok})  # fmt: skip
    print(f"{'kind':<7}{'prefix B':>10}{'replay µs':>11}{'µs/KiB':>9}{'decode µs':>11}"
          f"{'ratio':>8}  xgrammar")  # fmt: skip
    for r in rows:
        xg = {None: "-", True: "accepts", False: "REJECTS"}[r["xgrammar_accepts_rest"]]
        print(f"{r['kind']:<7}{r['bytes']:>10}{r['replay_us']:>11.0f}{r['us_per_kib']:>9.0f}"
              f"{r['decode_us']:>11.1f}{r['ratio']:>7.0f}x  {xg}")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform()},
        "schema_grammar_build_us": build, "rows": rows,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {RESULTS}")
    return 1 if any(r["xgrammar_accepts_rest"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
