"""The mock model's log probabilities: deterministic, valid, and shaped as vLLM and SGLang
answer them. Sans-IO (no sockets, no clock), shared by the HTTP simulator (:mod:`.app`) and the
native worker's engine (:mod:`lmgw.worker.sim`), so both answer a request with the same floats.

Every position has a distribution over :data:`MAX_TOP_LOGPROBS` candidates, best first, drawn
from the position's seed material; the token that is there (sampled, or the prompt's own) is
put at a drawn rank among them (usually 1, now and then lower, sometimes outside the list).
Values are log(p) of stick-breaking probabilities, so they are strictly decreasing, each < 0,
and the whole list (with the token when it is outside it) sums to less than 1.

* Output position ``p`` of a completion: a function of the completion's key (itself a function
  of the prompt ids, the worker seed, the request ``seed`` and the choice index, like the text)
  and ``p``. A decode worker of a P/D pair gives the merged worker's values.
* Prompt position ``p >= 1``: a function of the worker seed, ``p`` and the tokens at ``p - 1``
  and ``p`` (position 0 has none, as in vLLM's ``prompt_logprobs`` and SGLang's
  ``input_token_logprobs``). A prefill worker gives the merged worker's values.

The shapes (module functions) are vLLM's (``choices[].logprobs`` of chat and completions,
``prompt_logprobs``) and SGLang's (``meta_info.*_token_logprobs`` ``[logprob, id, text]``
triples and ``*_top_logprobs``). Choices that differ from the servers on purpose are noted
where they are made.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_TOP_LOGPROBS = 20
"""Candidates per position: vLLM's default ``max_logprobs`` (more is refused, as vLLM does)."""
MIN_LOGPROB = -9999.0
"""vLLM clamps logprobs here (``-inf`` is not JSON); the simulator's never get this low."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position: the token there, its logprob and rank (1 = the most likely), and the
    :data:`MAX_TOP_LOGPROBS` most likely tokens as (id, logprob), best first. The token is in
    ``top`` exactly when ``rank <= MAX_TOP_LOGPROBS``."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


def _rank(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.7:
        return 1
    if r < 0.85:
        return 2
    if r < 0.93:
        return 3
    return rng.randint(4, MAX_TOP_LOGPROBS + 6)  # now and then outside the list


def draw(material: int, token_id: int, pool: Sequence[int]) -> TokenLogprob:
    """The distribution at one position: a pure function of ``material`` (an int), the token
    there and the candidate ``pool`` (at least :data:`MAX_TOP_LOGPROBS` + 1 distinct ids)."""
    rng = random.Random(material)
    rank = _rank(rng)
    probs: list[float] = []
    rest = 1.0
    for _ in range(MAX_TOP_LOGPROBS):
        # p[j+1] / p[j] = (1 - b[j]) * b[j+1] / b[j] <= 0.9: strictly decreasing
        p = rest * (0.5 + 0.4 * rng.random())
        probs.append(p)
        rest -= p
    others = [t for t in rng.sample(pool, MAX_TOP_LOGPROBS + 1) if t != token_id]
    if rank <= MAX_TOP_LOGPROBS:
        ids = [*others[: rank - 1], token_id, *others[rank - 1 : MAX_TOP_LOGPROBS - 1]]
        own = math.log(probs[rank - 1])
    else:
        ids = others[:MAX_TOP_LOGPROBS]
        own = math.log(rest * (0.05 + 0.45 * rng.random()))  # below the list, inside what is left
    top = tuple(zip(ids, map(math.log, probs), strict=True))
    return TokenLogprob(token_id, own, rank, top)


def output_material(key: int, position: int) -> int:
    """The seed material of output position ``position`` of the completion keyed ``key``."""
    return (key << 32) | (position & 0xFFFFFFFF)


def prompt_material(engine_seed: int, position: int, prev: int, token: int) -> int:
    """The seed material of prompt position ``position`` (>= 1)."""
    digest = hashlib.blake2b(
        struct.pack("<qqqq", engine_seed, position, prev, token), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


class LogprobSource:
    """The logprobs of one mock model (a tokenizer's output vocabulary is the candidate pool;
    ``text_of`` names a token as the servers do: its text decoded alone).

    Args:
        pool: candidate token ids (distinct; at least :data:`MAX_TOP_LOGPROBS` + 1).
        engine_seed: the worker's seed (prompt positions depend on it).
        text_of: a token id's text.
    """

    def __init__(self, pool: Sequence[int], engine_seed: int, text_of: Callable[[int], str]):
        self.pool = tuple(dict.fromkeys(pool))
        if len(self.pool) <= MAX_TOP_LOGPROBS:
            raise ValueError(f"a logprob pool needs more than {MAX_TOP_LOGPROBS} token ids")
        self.engine_seed = engine_seed
        self.text = functools.lru_cache(maxsize=4096)(text_of)

    def output(self, key: int, token_ids: Sequence[int], offset: int = 0) -> list[TokenLogprob]:
        """The output tokens' logprobs; ``offset``: the position of ``token_ids[0]`` in the
        completion (a continued answer keeps the uninterrupted one's values)."""
        pool = self.pool
        return [draw(output_material(key, offset + i), t, pool) for i, t in enumerate(token_ids)]

    def prompt(self, ids: Sequence[int], start: int = 0) -> list[TokenLogprob | None]:
        """Positions ``start..len(ids)-1`` of the prompt; position 0 is None."""
        seed, pool = self.engine_seed, self.pool
        return [
            None if p == 0 else draw(prompt_material(seed, p, ids[p - 1], ids[p]), ids[p], pool)
            for p in range(start, len(ids))
        ]


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


# -- vLLM's OpenAI shapes -----------------------------------------------------------------------


def _chat_top(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": clamp(logprob), "bytes": list(text.encode("utf-8"))}


def chat_entry(e: TokenLogprob, k: int, text: Callable[[int], str]) -> dict[str, Any]:
    """One ``choices[].logprobs.content[]`` entry with the ``k`` most likely tokens, best first
    (vLLM lists the sampled token first, then the best ones: the same set when it is among
    them; the simulator keeps the list sorted)."""
    out = _chat_top(text(e.token_id), e.logprob)
    out["top_logprobs"] = [_chat_top(text(t), lp) for t, lp in e.top[:k]]
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], k: int, text: Callable[[int], str]) -> Any:
    """A chat choice's ``logprobs`` object."""
    return {"content": [chat_entry(e, k, text) for e in entries]}


def completion_top(e: TokenLogprob, k: int, text: Callable[[int], str]) -> dict[str, float]:
    """The ``k`` most likely tokens and the chosen one (OpenAI's ``logprobs: k``): vLLM's
    ``k + 1`` entries at most, the best first and the chosen token last when it is not among
    them (vLLM puts it first; a JSON object's order carries no meaning)."""
    out = {text(t): clamp(lp) for t, lp in e.top[:k]}
    out.setdefault(text(e.token_id), clamp(e.logprob))
    return out


def completion_logprobs(
    entries: Sequence[TokenLogprob], k: int, text: Callable[[int], str], text_offset: int = 0
) -> dict[str, Any]:
    """A completion choice's ``logprobs`` object; offsets count from ``text_offset`` by each
    token's text, as vLLM's ``_create_completion_logprobs``."""
    offsets, tokens = [], []
    for e in entries:
        name = text(e.token_id)
        offsets.append(text_offset)
        tokens.append(name)
        text_offset += len(name)
    return {
        "text_offset": offsets,
        "token_logprobs": [clamp(e.logprob) for e in entries],
        "tokens": tokens,
        "top_logprobs": [completion_top(e, k, text) for e in entries],
    }


def prompt_logprobs(
    entries: Sequence[TokenLogprob | None], k: int, text: Callable[[int], str]
) -> list[Any]:
    """vLLM's ``prompt_logprobs``: per position None (the first) or ``{id: {logprob, rank,
    decoded_token}}`` for the prompt's token and the ``k`` most likely (token ids as JSON keys;
    the prompt's token first, as vLLM's dict)."""
    out: list[Any] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        d = {str(e.token_id): _vllm_logprob(e.logprob, e.rank, text(e.token_id))}
        for rank, (t, lp) in enumerate(e.top[:k], 1):
            d.setdefault(str(t), _vllm_logprob(lp, rank, text(t)))
        out.append(d)
    return out


def _vllm_logprob(logprob: float, rank: int, decoded: str) -> dict[str, Any]:
    return {"logprob": clamp(logprob), "rank": rank, "decoded_token": decoded}


# -- SGLang's native shapes ---------------------------------------------------------------------


def sglang_tokens(
    entries: Sequence[TokenLogprob | None],
    ids: Sequence[int],
    text: Callable[[int], str] | None,
) -> list[list[Any]]:
    """``input_token_logprobs`` / ``output_token_logprobs``: ``[logprob, id, text]`` per
    position (logprob null where none, text null unless ``return_text_in_logprobs``)."""
    return [
        [None if e is None else e.logprob, t, None if text is None else text(t)]
        for e, t in zip(entries, ids, strict=True)
    ]


def sglang_top(
    entries: Sequence[TokenLogprob | None], k: int, text: Callable[[int], str] | None
) -> list[Any]:
    """``input_top_logprobs`` / ``output_top_logprobs``: the ``k`` best ``[logprob, id, text]``
    per position (null where the position has none), as ``torch.topk`` orders them."""
    return [
        None if e is None else [[lp, t, None if text is None else text(t)] for t, lp in e.top[:k]]
        for e in entries
    ]
