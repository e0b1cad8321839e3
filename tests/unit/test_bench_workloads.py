"""`lmgw bench` workloads: deterministic, seeded request generators (sans-IO)."""

from __future__ import annotations

import base64
import io
import math
import statistics
from itertools import islice
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lmgw.bench.workloads import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    Dataset,
    LengthDist,
    RequestShape,
    SplitMix,
    WorkloadError,
    build_workload,
    poisson_gaps,
    rng_for,
)

SHAPE = RequestShape(model="m")


def body(req) -> dict:
    return msgspec.json.decode(req.body)


def make(name: str, seed: int = 0, **kw):
    shape = kw.pop("shape", SHAPE)
    return build_workload(
        name,
        shape,
        input_len=kw.pop("input_len", LengthDist(32)),
        output_len=kw.pop("output_len", LengthDist(8)),
        seed=seed,
        **kw,
    )


@pytest.mark.parametrize("name", ["synthetic", "shared-prefix", "multimodal", "multi-turn"])
def test_same_seed_same_requests_other_seed_other_requests(name: str) -> None:
    kw = {"image_size": (16, 16)} if name == "multimodal" else {}
    a = [make(name, 7, **kw).session(i).first().body for i in range(20)]
    b = [make(name, 7, **kw).session(i).first().body for i in reversed(range(20))][::-1]
    c = [make(name, 8, **kw).session(i).first().body for i in range(20)]
    assert a == b  # session i depends on the seed and i, not on the order sessions are taken
    assert a != c
    assert len(set(a)) > 1


def test_synthetic_chat_body_streams_with_usage() -> None:
    shape = RequestShape(model="m", ignore_eos=True, extra={"temperature": 0})
    req = make("synthetic", shape=shape, input_len=LengthDist(50)).session(3).first()
    b = body(req)
    assert req.path == CHAT_PATH and req.stream and (req.session, req.turn) == (3, 0)
    assert b["model"] == "m" and b["max_tokens"] == 8 and b["ignore_eos"] is True
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert b["temperature"] == 0
    [msg] = b["messages"]
    assert msg["role"] == "user" and len(msg["content"].split()) == 50


def test_synthetic_completions_and_no_stream() -> None:
    shape = RequestShape(model="m", endpoint="completions", stream=False)
    req = make("synthetic", shape=shape).session(0).first()
    b = body(req)
    assert req.path == COMPLETIONS_PATH and not req.stream
    assert isinstance(b["prompt"], str) and "stream" not in b and "stream_options" not in b
    assert make("synthetic", shape=shape).session(0).next("x") is None


def test_length_distributions() -> None:
    rng = rng_for(1, "s")
    assert {LengthDist(10).sample(rng) for _ in range(50)} == {10}
    u = [LengthDist(100, "uniform", 0.2).sample(rng) for _ in range(2000)]
    assert min(u) >= 80 and max(u) <= 120 and abs(statistics.mean(u) - 100) < 3
    e = [LengthDist(100, "exponential").sample(rng) for _ in range(4000)]
    assert min(e) >= 1 and abs(statistics.mean(e) - 100) < 10
    n = [LengthDist(100, "normal", 0.1).sample(rng) for _ in range(2000)]
    assert abs(statistics.mean(n) - 100) < 2 and 7 < statistics.pstdev(n) < 13
    with pytest.raises(WorkloadError, match="unknown length distribution"):
        LengthDist(10, "zipf")
    with pytest.raises(WorkloadError, match="at least 1"):
        LengthDist(0)


def test_shared_prefix_uses_the_groups_prefixes() -> None:
    w = make("shared-prefix", prefix_len=40, prefix_groups=3)
    systems = [body(w.session(i).first())["messages"][0] for i in range(60)]
    assert {m["role"] for m in systems} == {"system"}
    prefixes = {m["content"] for m in systems}
    assert len(prefixes) == 3 and all(len(p.split()) == 40 for p in prefixes)
    users = {body(w.session(i).first())["messages"][1]["content"] for i in range(60)}
    assert len(users) == 60


def test_multi_turn_resends_the_history_with_the_answers() -> None:
    w = make("multi-turn", turns=3)
    s = w.session(5)
    first = s.first()
    assert first.needs_text and first.turn == 0
    second = s.next("ANSWER ONE")
    assert second is not None and second.turn == 1 and second.session == 5
    msgs = body(second)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0] == body(first)["messages"][0] and msgs[1]["content"] == "ANSWER ONE"
    third = s.next("ANSWER TWO")
    assert third is not None and not third.needs_text  # the last turn's answer is not needed
    assert [m["role"] for m in body(third)["messages"]] == ["user", "assistant"] * 2 + ["user"]
    assert s.next("ANSWER THREE") is None
    with pytest.raises(WorkloadError, match="--endpoint chat"):
        make("multi-turn", shape=RequestShape(model="m", endpoint="completions"))


def test_multimodal_sends_png_data_urls() -> None:
    w = make("multimodal", images=2, image_size=(24, 16))
    content = body(w.session(0).first())["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url", "image_url", "text"]
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "PNG" and img.size == (24, 16)
    urls = {
        c["image_url"]["url"]
        for i in range(100)
        for c in body(w.session(i).first())["messages"][0]["content"][:2]
    }
    assert 1 < len(urls) <= 32  # drawn from the pool


def test_dataset_lines_pick_their_endpoint_and_get_model_and_usage(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}\n'
        "\n"
        '{"prompt": "once", "model": "other", "stream": false}\n'
        '{"prompt": "twice", "stream": true, "stream_options": {"continuous_usage_stats": true}}\n'
    )
    d = Dataset(str(path), model="m", extra={"seed": 1})
    assert len(d) == 3
    reqs = [d.session(i).first() for i in range(4)]
    assert [r.path for r in reqs] == [CHAT_PATH, COMPLETIONS_PATH, COMPLETIONS_PATH, CHAT_PATH]
    b0, b1, b2 = (body(r) for r in reqs[:3])
    assert b0["model"] == "m" and b0["stream_options"] == {"include_usage": True}
    assert b0["seed"] == 1 and reqs[0].stream
    assert b1["model"] == "other" and b1["stream"] is False and not reqs[1].stream
    assert "stream_options" not in b1
    assert b2["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert reqs[3].body == reqs[0].body  # the file again from the top


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "has no requests"),
        ("{nope\n", "line 1: not JSON"),
        ('{"messages": [], "model": "m"}\n[1]\n', "line 2: expected a JSON object"),
        ('{"input": "x"}\n', "line 1: a request body needs 'messages'"),
        ('{"prompt": "x"}\n', "no 'model' in the body and no --model"),
    ],
)
def test_dataset_errors_name_the_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(WorkloadError, match=needle):
        Dataset(str(path), model=None)
    with pytest.raises(WorkloadError, match="cannot read"):
        Dataset(str(tmp_path / "missing.jsonl"), model="m")


@settings(max_examples=30, deadline=None)
@given(rate=st.floats(0.5, 5000.0), seed=st.integers(0, 2**32))
def test_poisson_arrivals_have_the_asked_rate(rate: float, seed: int) -> None:
    n = 4000
    gaps = list(islice(poisson_gaps(rate, rng_for(seed, "arrivals")), n))
    assert all(g > 0 for g in gaps)
    mean = statistics.fmean(gaps)
    # the mean of n exponential gaps has sd (1/rate)/sqrt(n): 8% is five of them
    assert abs(mean * rate - 1) < 0.08
    # exponential: the standard deviation equals the mean
    assert abs(statistics.pstdev(gaps) / mean - 1) < 0.15
    # and the arrivals in a window number rate x window
    horizon = sum(gaps) / 2
    t, count = 0.0, 0
    for g in gaps:
        t += g
        if t > horizon:
            break
        count += 1
    assert abs(count - rate * horizon) < 6 * math.sqrt(rate * horizon) + 1


def test_poisson_arrivals_are_reproducible_and_checked() -> None:
    a = list(islice(poisson_gaps(10, rng_for(3, "arrivals")), 10))
    assert a == list(islice(poisson_gaps(10, rng_for(3, "arrivals")), 10))
    assert a != list(islice(poisson_gaps(10, rng_for(4, "arrivals")), 10))
    with pytest.raises(WorkloadError):
        next(poisson_gaps(0, rng_for(3, "arrivals")))


def test_splitmix_is_a_full_random() -> None:
    r = SplitMix(42)
    xs = [r.random() for _ in range(20000)]
    assert min(xs) >= 0 and max(xs) < 1 and abs(statistics.fmean(xs) - 0.5) < 0.01
    assert {r.randrange(5) for _ in range(200)} == set(range(5))
    assert r.getrandbits(100) < 2**100
    state = r.getstate()
    x = r.random()
    r.setstate(state)
    assert r.random() == x
    assert [SplitMix(7).random() for _ in range(2)] == [SplitMix(7).random()] * 2
