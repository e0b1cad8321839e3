"""A Finish that carries the output itself (capability ``finish_output``) gives the client
exactly what the same output as a Delta before a plain Finish gives: whole answers and
streams, chat and completions, with and without logprobs."""

from __future__ import annotations

import pytest

from lmgw.pipeline.native import WholeAnswer, finish_output
from lmgw.protocol.messages import Delta, Finish, Token, Usage
from lmgw.transport.openai_synth import OpenAISynth

USAGE = Usage(12, 3, 4)
LOGPROBS = [Token(5, -0.5, 1, [5, 6], [-0.5, -1.5]), Token(6, -0.25, 2, [7, 6], [-0.1, -0.25])]


def _synth(kind: str, logprobs: bool) -> OpenAISynth:
    return OpenAISynth(
        kind, "r1", "m", 7, logprobs=logprobs, token_text=lambda t: f"<{t}>", include_usage=True
    )


def _cases() -> list[tuple[str, bool, Delta]]:
    out = []
    for kind in ("chat", "completion"):
        out.append((kind, False, Delta("r1", 0, "Hello, world", [5, 6, 7])))
        out.append((kind, True, Delta("r1", 0, "ab", [5, 6], LOGPROBS)))
        out.append((kind, False, Delta("r1", 0, "", [])))  # (nothing came out)
    return out


@pytest.mark.parametrize(("kind", "logprobs", "delta"), _cases())
def test_a_whole_answer_is_the_same_either_way(kind: str, logprobs: bool, delta: Delta) -> None:
    two = WholeAnswer()
    if delta.text or delta.token_ids:  # (a worker sends no empty Delta)
        two.add(delta)
    plain = Finish("r1", 1, "length", None, USAGE)
    folded = Finish(
        "r1", 0, "length", None, USAGE, text=delta.text, token_ids=delta.token_ids,
        logprobs=delta.logprobs,
    )  # fmt: skip
    want = two.body(plain, _synth(kind, logprobs))
    assert WholeAnswer().body(folded, _synth(kind, logprobs)) == want


@pytest.mark.parametrize(("kind", "logprobs", "delta"), _cases()[:2])
def test_a_stream_finish_with_output_gives_its_event_first(
    kind: str, logprobs: bool, delta: Delta
) -> None:
    a, b = _synth(kind, logprobs), _synth(kind, logprobs)
    finish = Finish("r1", 1, "stop", None, USAGE)
    want = a.delta(delta.text, delta.token_ids, delta.logprobs) + a.finish("stop", None, 12, 3, 4)
    folded = Finish(
        "r1", 0, "stop", None, USAGE, text=delta.text, token_ids=delta.token_ids,
        logprobs=delta.logprobs,
    )  # fmt: skip
    assert finish_output(b, folded) + b.finish("stop", None, 12, 3, 4) == want
    assert finish_output(_synth(kind, logprobs), finish) == b""


def test_output_in_both_a_delta_and_the_finish_is_joined() -> None:
    """A peer may send part of a whole answer as a Delta and the rest in its Finish."""
    first, rest = (
        Delta("r1", 0, "Hello, ", [5, 6], LOGPROBS[:1]),
        Delta("r1", 1, "world", [7], LOGPROBS[1:]),
    )
    two = WholeAnswer()
    two.add(first)
    two.add(rest)
    want = two.body(Finish("r1", 2, "stop", None, USAGE), _synth("chat", True))
    got = WholeAnswer()
    got.add(first)
    folded = Finish(
        "r1", 1, "stop", None, USAGE, text="world", token_ids=[7], logprobs=LOGPROBS[1:]
    )
    assert got.body(folded, _synth("chat", True)) == want
