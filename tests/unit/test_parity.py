"""Parity probes and verdicts: what the probes exercise, the gateway side against transformers
standing in for a worker, and readable reasons for every kind of mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.simulators import model_files
from lmgw.text import (
    ChatTemplate,
    ChatTemplateError,
    ModelTokenizer,
    build_probes,
    compare_tokens,
    parse_tokenize_response,
    skipped,
    summarize,
)


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_files.ensure_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tok(sim_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(sim_dir)


@pytest.fixture(scope="module")
def template(sim_dir: Path, tok: ModelTokenizer) -> ChatTemplate:
    return ChatTemplate.load(sim_dir, special_tokens=tok.special_tokens_map)


def test_probes_exercise_what_breaks_parity(tok: ModelTokenizer) -> None:
    probes = {p.name: p for p in build_probes(tok)}
    assert list(probes) == ["chat", "chat-no-system", "text"]
    chat = probes["chat"].messages
    assert chat is not None
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert probes["chat-no-system"].messages == chat[1:]
    text = "".join(m["content"] for m in chat)
    for needle in (
        tok.eos_token,
        tok.bos_token,
        "é",
        "e\u0301",
        "日本語",
        "😀",
        "\u200d",
        "\r\n",
        "\t",
    ):
        assert needle in text
    assert "  leading" in text and "spaces  \n" in text
    assert probes["text"].add_special_tokens and not probes["chat"].add_special_tokens


def test_tokenize_bodies_have_vllms_shape() -> None:
    chat, _, text = build_probes()
    body = chat.tokenize_body("m")
    assert set(body) == {"model", "messages", "add_generation_prompt", "add_special_tokens"}
    assert body["add_generation_prompt"] is True and body["add_special_tokens"] is False
    assert json.loads(json.dumps(body)) == body  # plain JSON
    assert text.tokenize_body("m") == {
        "model": "m",
        "prompt": text.prompt,
        "add_special_tokens": True,
    }


def test_gateway_side_matches_transformers_as_the_worker(
    sim_dir: Path, tok: ModelTokenizer, template: ChatTemplate
) -> None:
    transformers = pytest.importorskip("transformers")
    worker = transformers.AutoTokenizer.from_pretrained(str(sim_dir))
    verdicts = []
    for probe in build_probes(tok):
        ours = probe.gateway_tokens(tok, template)
        if probe.messages is not None:
            theirs = worker.apply_chat_template(
                [dict(m) for m in probe.messages],
                add_generation_prompt=probe.add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        else:
            theirs = worker.encode(probe.prompt, add_special_tokens=probe.add_special_tokens)
        verdicts.append(compare_tokens(probe.name, ours, theirs))
    report = summarize(verdicts)
    assert report.safe, report.reason
    assert all(v.status == "match" for v in verdicts)


def test_a_template_refusing_system_turns_skips_that_probe(tok: ModelTokenizer) -> None:
    strict = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    chat, no_system, text = build_probes(tok)
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        chat.gateway_tokens(tok, strict)
    ids = no_system.gateway_tokens(tok, strict)
    verdicts = [
        skipped(chat.name, "System role not supported"),
        compare_tokens(no_system.name, ids, ids),
        compare_tokens(text.name, [1, 2], [1, 2]),
    ]
    report = summarize(verdicts)
    assert report.safe and "chat-no-system" in report.reason
    with pytest.raises(ValueError, match="needs a chat template"):
        chat.gateway_tokens(tok, None)


def test_mismatch_reason_names_position_windows_and_tokens(tok: ModelTokenizer) -> None:
    gateway = list(range(100, 120))
    worker = [*gateway[:10], 999, *gateway[11:]]
    v = compare_tokens("chat", gateway, worker, context=3, token_strs=tok.convert_ids_to_tokens)
    assert v.status == "mismatch" and not v.ok
    assert v.position == 10 and v.window_start == 7
    assert v.gateway_window == (107, 108, 109, 110, 111, 112, 113)
    assert v.worker_window == (107, 108, 109, 999, 111, 112, 113)
    assert "first difference at token 10" in v.reason and "gateway 20 tokens, worker 20" in v.reason
    assert repr(tok.convert_ids_to_tokens([110])[0]) in v.reason
    assert "999 " in v.reason


@pytest.mark.parametrize(
    ("gateway", "worker", "hint"),
    [
        ([5, 6, 7], [1, 5, 6, 7], "the worker adds a leading token"),
        ([1, 5, 6, 7], [5, 6, 7], "the gateway adds a leading token"),
        ([5, 6, 7], [5, 6, 7, 8, 9], "the worker has extra trailing tokens"),
        ([5, 6, 7, 8], [5, 6], "the gateway has extra trailing tokens"),
        ([5, 6, 7], [5, 9, 7], ""),
    ],
)
def test_hints_for_known_patterns(gateway: list[int], worker: list[int], hint: str) -> None:
    v = compare_tokens("p", gateway, worker)
    assert v.status == "mismatch"
    if hint:
        assert hint in v.reason
    else:
        assert "(the" not in v.reason


@settings(max_examples=80, deadline=None)
@given(
    a=st.lists(st.integers(0, 5), max_size=12),
    b=st.lists(st.integers(0, 5), max_size=12),
)
def test_first_difference_is_the_first_difference(a: list[int], b: list[int]) -> None:
    v = compare_tokens("p", a, b, context=2)
    if a == b:
        assert v.status == "match" and v.position is None
        return
    pos = v.position
    assert pos is not None and a[:pos] == b[:pos]
    assert pos == min(len(a), len(b)) or a[pos] != b[pos]
    assert v.gateway_window == tuple(a[max(0, pos - 2) : pos + 3])
    assert v.worker_window == tuple(b[max(0, pos - 2) : pos + 3])


def test_summary_rules() -> None:
    match = compare_tokens("a", [1], [1])
    bad = compare_tokens("b", [1], [2])
    skip = skipped("c", "template refused")
    assert summarize([match, skip]).safe
    report = summarize([match, bad, skip])
    assert not report.safe and report.reason == bad.reason and len(report.verdicts) == 3
    unverified = summarize([skip])
    assert not unverified.safe and "unverified" in unverified.reason
    assert not summarize([]).safe


def test_parse_tokenize_response() -> None:
    body = {"count": 3, "max_model_len": 32768, "tokens": [1, 2, 3], "token_strs": None}
    assert parse_tokenize_response(msgspec.json.encode(body)) == [1, 2, 3]
    assert parse_tokenize_response(body) == [1, 2, 3]
    assert parse_tokenize_response(b'{"tokens": []}') == []
    for bad in (b"nope", b'{"tokens": ["a"]}', b'{"count": 1}', {"tokens": 5}):
        with pytest.raises(ValueError, match="not a /tokenize response"):
            parse_tokenize_response(bad)
    with pytest.raises(ValueError, match="count=2"):
        parse_tokenize_response({"count": 2, "tokens": [1]})
