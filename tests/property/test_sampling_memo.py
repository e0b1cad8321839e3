"""``sampling_params`` answers a body of scalar settings from its memo: the memo must give
exactly what building it gives (or the same 400), whatever the keys, values and their types."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.errors import GatewayError
from lmgw.pipeline import native
from lmgw.pipeline.native import _sampling_params, sampling_params

KEYS = [
    "model", "messages", "user", "stream", "n", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
    "min_tokens", "logprobs", "top_logprobs", "prompt_logprobs", "repetition_penalty", "min_p",
    "response_format", "guided_regex", "logit_bias", "tool_choice", "echo",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.5]),
    st.sampled_from(["", "x", "\n", "required", "auto", "16"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["type", "1", "x"]), scalars, max_size=2),
)
bodies = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)


def _outcome(fn: Any, endpoint: str, body: dict[str, Any]) -> Any:
    try:
        return ("ok", fn(endpoint, body))
    except GatewayError as exc:
        return ("error", exc.status, str(exc), exc.param)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["chat", "completions"]), st.lists(bodies, min_size=1, max_size=6))
def test_the_memo_answers_as_building_does(endpoint: str, batch: list[dict[str, Any]]) -> None:
    native._memo.clear()
    for body in batch * 2:  # each body again: from the memo where it was kept
        assert _outcome(sampling_params, endpoint, body) == _outcome(
            _sampling_params, endpoint, body
        )


@pytest.mark.parametrize(
    "value", [1, 1.0, True], ids=["int", "float", "bool"]
)  # equal as dict keys, not as settings
def test_equal_values_of_other_types_are_not_confused(value: Any) -> None:
    native._memo.clear()
    for first in (1, 1.0, True):  # (the first that is valid is kept)
        _outcome(sampling_params, "chat", {"max_tokens": first, "temperature": first})
    assert _outcome(sampling_params, "chat", {"max_tokens": value, "temperature": value}) == (
        _outcome(_sampling_params, "chat", {"max_tokens": value, "temperature": value})
    )


def test_the_keys_left_out_of_the_memo_key_never_reach_extra() -> None:
    assert native._UNREAD <= native._NOT_SAMPLING


def test_the_memo_stays_bounded() -> None:
    native._memo.clear()
    for i in range(native._MEMO_SIZE * 3):
        sampling_params("chat", {"max_tokens": i + 1})
    assert 0 < len(native._memo) <= native._MEMO_SIZE
    assert sampling_params("chat", {"max_tokens": 7}).max_tokens == 7
