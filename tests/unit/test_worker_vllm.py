"""The vLLM adapter's translation layer, with vLLM-shaped fakes (vLLM is not installed here).

Requests: our SamplingParams -> ``vllm.SamplingParams`` kwargs per stage (prefill forced to one
token with NIXL's hand-off request, hand-off in ``extra_args``), stage messages -> vLLM prompt
dicts (token ids, text, media tensors and uuids). Outputs: ``RequestOutput``s (DELTA and
CUMULATIVE) -> our deltas, usage with cached tokens, finish/stop reasons, logprobs and the
returned ``kv_transfer_params``. Stat-logger callbacks -> metrics. And the whole adapter
running with trio as a guest of an asyncio loop over a fake ``AsyncLLM``: streaming, prefill,
encode, and cancellation reaching the asyncio side (vLLM aborts a cancelled ``generate``).
"""

from __future__ import annotations

import asyncio
import collections.abc
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import trio
import zmq

from lmgw.protocol import (
    Delta,
    Encode,
    FailureCode,
    Finish,
    Generate,
    MediaItem,
    Prefill,
    PrefillDone,
    SamplingParams,
    StructuredOutput,
    TensorRef,
    Token,
    Usage,
)
from lmgw.transport.tensors import pack_tensors
from lmgw.transport.zmq import RpcChannel, RpcError
from lmgw.worker import EngineError, EngineRequest, WorkerServer
from lmgw.worker.vllm import (
    NIXL_PREFILL_PARAMS,
    AsyncioBridge,
    OutputTranslator,
    SchedulerGauges,
    VllmEngine,
    decode_tensor,
    prefill_result,
    prompt_input,
    sampling_kwargs,
    structured_kwargs,
)

# -- vLLM-shaped fakes (same attribute names as vLLM's classes) --------------------------------


class Logprob:
    def __init__(self, logprob: float, rank: int | None = 1, decoded_token: str | None = None):
        self.logprob = logprob
        self.rank = rank
        self.decoded_token = decoded_token


def position(sampled: int, rank: int, k: int, own: float = -5.0) -> dict[int, Logprob]:
    """One position of vLLM's logprobs: the sampled token first (with its rank), then the
    ``k`` best with ranks 1..k (ids 2000 + rank, logprob -0.1 * rank), as vLLM's
    ``append_logprobs_for_next_position`` builds it: the sampled token, when among them,
    keeps its first place and takes the value at its rank."""
    out = {sampled: Logprob(own, rank, "s")}
    for r in range(1, k + 1):
        tid = sampled if r == rank else 2000 + r
        out[tid] = Logprob(-0.1 * r, r, "x")
    return out


def expected(sampled: int, rank: int, k: int, own: float = -5.0) -> Token:
    ids = [sampled if r == rank else 2000 + r for r in range(1, k + 1)]
    value = -0.1 * rank if rank <= k else own
    return Token(sampled, value, rank, ids, [-0.1 * r for r in range(1, k + 1)])


class CompletionOutput:
    def __init__(
        self,
        text: str,
        token_ids: list[int],
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        logprobs: list[dict[int, Logprob]] | None = None,
    ) -> None:
        self.index = 0
        self.text = text
        self.token_ids = token_ids
        self.cumulative_logprob = None
        self.logprobs = logprobs
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason


class RequestOutput:
    def __init__(
        self,
        outputs: list[CompletionOutput],
        *,
        finished: bool = False,
        prompt_token_ids: list[int] | None = None,
        num_cached_tokens: int | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
        request_id: str = "r",
        prompt_logprobs: list[dict[int, Logprob] | None] | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = None
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.num_cached_tokens = num_cached_tokens
        self.kv_transfer_params = kv_transfer_params


class RequestOutputKind:
    CUMULATIVE = "kind:cumulative"
    DELTA = "kind:delta"
    FINAL_ONLY = "kind:final"


class FakeSamplingParams:
    """Like vLLM's (a msgspec Struct): known fields only, others are a TypeError."""

    __struct_fields__ = (
        "n",
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "logprobs",
        "prompt_logprobs",
        "repetition_penalty",
        "output_kind",
        "extra_args",
    )

    def __init__(self, **kw: Any) -> None:
        unknown = set(kw) - set(self.__struct_fields__)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        if kw.get("max_tokens") is not None and kw["max_tokens"] < 1:
            raise ValueError("max_tokens must be at least 1")
        self.__dict__.update(dict.fromkeys(self.__struct_fields__), **kw)


class SchedulerStats:
    def __init__(self, running: int, waiting: int, usage: float, queries: int, hits: int) -> None:
        self.num_running_reqs = running
        self.num_waiting_reqs = waiting
        self.kv_cache_usage = usage

        class PrefixCacheStats:
            pass

        self.prefix_cache_stats = PrefixCacheStats()
        self.prefix_cache_stats.queries = queries  # type: ignore[attr-defined]
        self.prefix_cache_stats.hits = hits  # type: ignore[attr-defined]


class IterationStats:
    def __init__(self, prompt: int, generation: int) -> None:
        self.num_prompt_tokens = prompt
        self.num_generation_tokens = generation


# -- requests ---------------------------------------------------------------------------------


def test_sampling_kwargs_generate() -> None:
    params = SamplingParams(
        max_tokens=64,
        temperature=0.7,
        top_p=0.9,
        min_tokens=2,
        seed=5,
        stop=["\n\n"],
        stop_token_ids=[7],
        ignore_eos=True,
        logprobs=1,
        extra={
            "repetition_penalty": 1.1,
            "my_processor_arg": 3,
            "n": 4,
            "extra_args": {"x": 1},
        },
    )
    kw = sampling_kwargs(
        params,
        kv_transfer_params={"do_remote_prefill": True},
        known_fields=FakeSamplingParams.__struct_fields__,
    )
    assert kw == {
        "n": 1,  # n>1 is not served: the extra "n" is ignored
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "min_tokens": 2,
        "seed": 5,
        "logprobs": 1,
        "stop": ["\n\n"],
        "stop_token_ids": [7],
        "ignore_eos": True,
        "repetition_penalty": 1.1,  # a known field passes through
        "output_kind": "DELTA",
        "extra_args": {
            "x": 1,
            "my_processor_arg": 3,  # unknown fields ride in extra_args
            "kv_transfer_params": {"do_remote_prefill": True},
        },
    }
    assert sampling_kwargs(SamplingParams()) == {"n": 1, "output_kind": "DELTA"}
    # without a field list everything is a field (vLLM then rejects what it does not know)
    assert sampling_kwargs(SamplingParams(extra={"foo": 1}))["foo"] == 1


def test_sampling_kwargs_prefill_and_encode() -> None:
    params = SamplingParams(max_tokens=100, min_tokens=10, temperature=0.0)
    kw = sampling_kwargs(params, stage="prefill")
    assert kw["max_tokens"] == 1 and "min_tokens" not in kw
    assert kw["output_kind"] == "FINAL_ONLY" and kw["temperature"] == 0.0
    assert kw["extra_args"] == {"kv_transfer_params": NIXL_PREFILL_PARAMS}
    assert kw["extra_args"]["kv_transfer_params"] is not NIXL_PREFILL_PARAMS  # a copy
    mine = {"do_remote_decode": True, "custom": [1, 2]}
    kw = sampling_kwargs(params, stage="prefill", kv_transfer_params=mine)
    assert kw["extra_args"]["kv_transfer_params"] == mine  # the gateway's, verbatim
    kw = sampling_kwargs(SamplingParams(), stage="encode")
    assert kw == {"n": 1, "max_tokens": 1, "output_kind": "FINAL_ONLY"}
    # the prompt's logprobs: asked of the client-facing leg only (a hand-off carries none)
    asked = SamplingParams(logprobs=2, prompt_logprobs=3)
    assert sampling_kwargs(asked)["prompt_logprobs"] == 3
    kw = sampling_kwargs(asked, stage="prefill")
    assert "prompt_logprobs" not in kw and kw["logprobs"] == 2
    with pytest.raises(ValueError):
        sampling_kwargs(params, stage="decode")


def _tensor(arr: np.ndarray) -> tuple[TensorRef, Any]:
    (ref,), (frame,) = pack_tensors([arr])
    return ref, frame


def test_prompt_input_shapes() -> None:
    gen = Generate("r", "m", prompt="hello", prompt_token_ids=[1, 2, 3])
    assert prompt_input(EngineRequest(gen)) == {"prompt_token_ids": [1, 2, 3]}
    assert prompt_input(EngineRequest(Generate("r", "m", prompt="hi"))) == {"prompt": "hi"}

    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    ref, data = _tensor(image)
    msg = Prefill(
        "r",
        "m",
        prompt_token_ids=[5, 6],
        media=[MediaItem("image", hash="h1", tensor=0), MediaItem("image", hash="h2")],
        tensors=[ref],
    )
    out = prompt_input(EngineRequest(msg, (data,)))
    assert out["prompt_token_ids"] == [5, 6]
    first, second = out["multi_modal_data"]["image"]
    np.testing.assert_array_equal(first, image)
    assert second is None  # named by hash only: its encoder output is cached
    assert out["multi_modal_uuids"] == {"image": ["h1", "h2"]}

    enc = Encode("r", "m", [MediaItem("audio", tensor=0)], tensors=[ref])
    out = prompt_input(EngineRequest(enc, (data,)), text="<audio>")
    assert out["prompt"] == "<audio>" and "multi_modal_uuids" not in out
    assert out["multi_modal_data"]["audio"].shape == (2, 3, 3)

    url_only = Generate("r", "m", prompt="x", media=[MediaItem("image", url="https://a/b.png")])
    with pytest.raises(EngineError) as info:
        prompt_input(EngineRequest(url_only))
    assert info.value.code is FailureCode.UNSUPPORTED
    with pytest.raises(EngineError) as info:
        decode_tensor(b"\x00not a header", b"1234")
    assert info.value.code is FailureCode.BAD_REQUEST
    with pytest.raises(EngineError):  # 3 bytes cannot be a (2, 2) uint8 array
        decode_tensor(_tensor(np.zeros((2, 2), np.uint8))[0].header, b"123")


# -- outputs ----------------------------------------------------------------------------------


def _delta_outputs() -> list[RequestOutput]:
    prompt = [11, 12, 13, 14]
    return [
        RequestOutput([CompletionOutput("Hel", [1])], prompt_token_ids=prompt),
        RequestOutput([CompletionOutput("", [])], prompt_token_ids=prompt),  # nothing new
        RequestOutput([CompletionOutput("lo", [2, 3])], prompt_token_ids=prompt),
        RequestOutput(
            [CompletionOutput(" world", [4], finish_reason="stop", stop_reason=99)],
            finished=True,
            prompt_token_ids=prompt,
            num_cached_tokens=2,
            kv_transfer_params={"remote_block_ids": [1]},
        ),
    ]


def _cumulative(outputs: list[RequestOutput]) -> list[RequestOutput]:
    text, ids, out = "", [], []
    for o in outputs:
        c = o.outputs[0]
        text, ids = text + c.text, ids + c.token_ids
        cum = CompletionOutput(text, list(ids), c.finish_reason, c.stop_reason)
        out.append(
            RequestOutput(
                [cum],
                finished=o.finished,
                prompt_token_ids=o.prompt_token_ids,
                num_cached_tokens=o.num_cached_tokens,
                kv_transfer_params=o.kv_transfer_params,
            )
        )
    return out


@pytest.mark.parametrize("cumulative", [False, True])
def test_output_translator(cumulative: bool) -> None:
    outputs = _delta_outputs()
    if cumulative:
        outputs = _cumulative(outputs)
    tr = OutputTranslator(cumulative=cumulative)
    deltas = [tr.feed(o) for o in outputs]
    assert deltas[1] is None
    got = [d for d in deltas if d is not None]
    assert "".join(d.text for d in got) == "Hello world"
    assert [t for d in got for t in d.token_ids] == [1, 2, 3, 4]
    assert all(d.finish_reason is None for d in got[:-1])
    last = got[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", 99)
    assert last.usage == Usage(prompt_tokens=4, completion_tokens=4, cached_tokens=2)
    assert last.kv_transfer_params == {"remote_block_ids": [1]}


def test_output_translator_edge_cases() -> None:
    lps = [{5: Logprob(-0.5), 6: Logprob(-2.0)}, {7: Logprob(-0.1)}]
    tr = OutputTranslator()
    d = tr.feed(RequestOutput([CompletionOutput("ab", [5, 7], logprobs=lps)]))
    assert d is not None and d.logprobs == [Token(5, -0.5, 1), Token(7, -0.1, 1)]
    # finished without a reason (e.g. aborted inside the engine): still a finish
    d = tr.feed(RequestOutput([CompletionOutput("", [])], finished=True))
    assert d is not None and d.finish_reason == "stop" and d.usage is not None
    assert d.usage.completion_tokens == 2 and d.usage.cached_tokens == 0
    d = OutputTranslator().feed(RequestOutput([], finished=True))
    assert d is not None and d.finish_reason == "stop"
    d = OutputTranslator().feed(RequestOutput([CompletionOutput("", [], "length")], finished=True))
    assert d is not None and d.finish_reason == "length"


@pytest.mark.parametrize("cumulative", [False, True])
def test_output_translator_alternatives_and_prompt_logprobs(cumulative: bool) -> None:
    """vLLM's dicts -> Token entries: the sampled token's logprob and rank, the k best by rank
    whether the sampled token is first, among them or outside them; the prompt's entries
    (position 0 None) once, with the finishing delta, whatever output kind brought them."""
    k = 3
    prompt = [50, 51, 52]
    plps = [None, position(51, 2, 1, -0.7), position(52, 9, 1, -6.0)]
    steps = [(1000, 1), (1001, 3), (1002, 7)]  # ranks: first, among the best, outside
    outs, lps = [], []
    for i, (tid, rank) in enumerate(steps):
        lps.append(position(tid, rank, k))
        last = i == len(steps) - 1
        comp = CompletionOutput("x", [tid], "stop" if last else None, logprobs=[lps[-1]])
        outs.append(RequestOutput([comp], finished=last, prompt_token_ids=prompt,
                                  prompt_logprobs=plps if i == 0 else None))  # fmt: skip
    if cumulative:  # everything so far, the prompt's logprobs again each time (older engines)
        outs = [
            RequestOutput(
                [
                    CompletionOutput(
                        "x" * (i + 1),
                        [t for t, _ in steps[: i + 1]],
                        o.outputs[0].finish_reason,
                        logprobs=lps[: i + 1],
                    )
                ],
                finished=o.finished,
                prompt_token_ids=prompt,
                prompt_logprobs=plps,
            )
            for i, o in enumerate(outs)
        ]
    tr = OutputTranslator(cumulative=cumulative, top_logprobs=k, prompt_top=1)
    got = [tr.feed(o) for o in outs]
    assert all(d is not None for d in got)
    tokens = [t for d in got for t in d.logprobs]  # type: ignore[union-attr]
    assert tokens == [expected(tid, rank, k) for tid, rank in steps]
    assert tokens[1].top_ids == [2001, 2002, 1001]  # the sampled token at its rank
    assert tokens[2].top_ids == [2001, 2002, 2003] and tokens[2].rank == 7
    assert [d.prompt_logprobs for d in got[:-1]] == [None, None]  # type: ignore[union-attr]
    assert got[-1].prompt_logprobs == [  # type: ignore[union-attr]
        None,
        Token(51, -0.7, 2, [2001], [-0.1]),
        Token(52, -6.0, 9, [2001], [-0.1]),
    ]
    # k = 0: the sampled token alone (with its rank); no prompt logprobs asked: none
    d = OutputTranslator().feed(RequestOutput([CompletionOutput("x", [1000],
                                                                logprobs=[lps[0]])]))  # fmt: skip
    assert d is not None and d.logprobs == [Token(1000, -0.1, 1)] and d.prompt_logprobs is None


def test_output_translator_without_ranks_and_flat_logprobs() -> None:
    """Bare floats (no rank): the best by logprob; vLLM's list-like ``FlatLogprobs`` (slices,
    iteration) reads as a list; a dict without the sampled token gives no entry."""

    class Flat(collections.abc.Sequence):
        def __init__(self, items: list[Any]) -> None:
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: Any) -> Any:
            return Flat(self.items[i]) if isinstance(i, slice) else self.items[i]

    raw = Flat([{5: -3.0, 1: -0.2, 2: -0.9}, {6: -0.1, 1: -0.5}, {9: -1.0}])
    tr = OutputTranslator(cumulative=True, top_logprobs=2)
    d = tr.feed(RequestOutput([CompletionOutput("ab", [5, 6], logprobs=raw[:2])]))
    assert d is not None and d.logprobs == [
        Token(5, -3.0, None, [1, 2], [-0.2, -0.9]),
        Token(6, -0.1, None, [6, 1], [-0.1, -0.5]),
    ]
    d = tr.feed(RequestOutput([CompletionOutput("abc", [5, 6, 7], logprobs=raw)]))
    assert d is not None and d.token_ids == [7] and d.logprobs == []  # 7 is not in its dict


def test_prefill_result() -> None:
    final = RequestOutput(
        [CompletionOutput("x", [42], finish_reason="length")],
        finished=True,
        prompt_token_ids=list(range(40)),
        num_cached_tokens=16,
        kv_transfer_params={"do_remote_prefill": True, "remote_block_ids": [3, 4]},
    )
    res = prefill_result(final)
    assert res.kv_transfer_params == {"do_remote_prefill": True, "remote_block_ids": [3, 4]}
    assert res.usage == Usage(40, 1, 16) and res.first_token_ids == [42]
    empty = prefill_result(RequestOutput([], finished=True))
    assert empty.kv_transfer_params is None and empty.first_token_ids == []


def test_scheduler_gauges() -> None:
    gauges = SchedulerGauges()
    gauges.record(SchedulerStats(3, 2, 0.25, 100, 40), IterationStats(50, 7))
    gauges.record(SchedulerStats(1, 0, 0.5, 10, 10), IterationStats(0, 3), "mm stats", 0)
    gauges.record(None, None)
    v = gauges.values
    assert v["vllm:num_requests_running"] == 1 and v["vllm:num_requests_waiting"] == 0
    assert v["vllm:kv_cache_usage_perc"] == 0.5
    assert v["vllm:prefix_cache_queries_total"] == 110 and v["vllm:prefix_cache_hits_total"] == 50
    assert v["vllm:prompt_tokens_total"] == 50 and v["vllm:generation_tokens_total"] == 10


# -- the adapter over a fake AsyncLLM, trio as asyncio's guest ---------------------------------


class FakeTokenizer:
    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        kinds = "".join(f"<{p['type']}>" for p in messages[0]["content"])
        return f"USER:{kinds}ASSISTANT:"


class FakeAsyncLLM:
    """``generate(prompt, sampling_params, request_id)`` yields DELTA outputs on asyncio; a
    cancelled generate aborts, as vLLM's does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], FakeSamplingParams]] = []
        self.aborted: list[str] = []
        self.cancelled: list[str] = []

    async def generate(
        self, prompt: dict[str, Any], sampling_params: FakeSamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        self.calls.append((request_id, prompt, sampling_params))
        ids = prompt.get("prompt_token_ids") or [1, 2, 3]
        sp = sampling_params
        try:
            if sp.output_kind == RequestOutputKind.FINAL_ONLY:
                await asyncio.sleep(0)
                params = (sp.extra_args or {}).get("kv_transfer_params")
                yield RequestOutput(
                    [CompletionOutput("A", [100], finish_reason="length")],
                    finished=True,
                    prompt_token_ids=ids,
                    kv_transfer_params=params and {"remote_block_ids": [9], **params},
                )
                return
            if prompt.get("prompt") == "too long":
                raise ValueError("The decoder prompt is longer than the maximum model length")
            n = sp.max_tokens or 5
            for i in range(n):
                await asyncio.sleep(0.001 if n > 100 else 0)
                last = i == n - 1
                lps = None if sp.logprobs is None else [position(1000 + i, i % 4 + 1, sp.logprobs)]
                plps = None
                if i == 0 and sp.prompt_logprobs is not None:  # once, on the first output
                    k = sp.prompt_logprobs
                    plps = [None] + [position(t, p % 3 + 1, k) for p, t in enumerate(ids) if p]
                yield RequestOutput(
                    [CompletionOutput(f"t{i} ", [1000 + i], "length" if last else None,
                                      logprobs=lps)],
                    finished=last,
                    prompt_token_ids=ids,
                    num_cached_tokens=1,
                    prompt_logprobs=plps,
                )  # fmt: skip
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            await self.abort(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        await asyncio.sleep(0)
        self.aborted.append(request_id)

    async def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()


def run_guest(trio_main: Any) -> Any:
    """Run ``trio_main(bridge)`` as a trio guest of a fresh asyncio loop; return its result."""

    async def host() -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        bridge = AsyncioBridge(loop, buffer=4)
        trio.lowlevel.start_guest_run(
            trio_main,
            bridge,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done.set_result,
            host_uses_signal_set_wakeup_fd=True,
        )
        return (await asyncio.wait_for(done, 30)).unwrap()

    return asyncio.run(host())


def make_engine(llm: FakeAsyncLLM, bridge: AsyncioBridge, role: str = "pd") -> VllmEngine:
    return VllmEngine(
        llm,
        role=role,
        models=["m"],
        bridge=bridge,
        sampling_params_cls=FakeSamplingParams,
        output_kinds=RequestOutputKind,
    )


def test_engine_stages_under_trio_guest_mode() -> None:
    llm = FakeAsyncLLM()

    async def main(bridge: AsyncioBridge) -> dict[str, Any]:
        engine = make_engine(llm, bridge)
        out: dict[str, Any] = {}
        gen = Generate("g", "m", prompt_token_ids=[1, 2], params=SamplingParams(max_tokens=20))
        deltas = [d async for d in engine.generate(EngineRequest(gen))]
        out["text"] = "".join(d.text for d in deltas)
        out["last"] = deltas[-1]
        out["prefill"] = await engine.prefill(
            EngineRequest(Prefill("p", "m", prompt="x", params=SamplingParams(max_tokens=50)))
        )
        ref, data = _tensor(np.zeros((2, 2, 3), np.uint8))
        enc = Encode("e", "m", [MediaItem("image", hash="h", tensor=0)], tensors=[ref])
        out["encode"] = await engine.encode(EngineRequest(enc, (data,)))
        with pytest.raises(EngineError) as info:  # an encoder needs the media itself
            await engine.encode(EngineRequest(Encode("e2", "m", [MediaItem("image", hash="h")])))
        out["no_tensor"] = info.value.code
        with pytest.raises(EngineError) as info:
            bad = Generate("b", "m", prompt="x", params=SamplingParams(max_tokens=0))
            async for _ in engine.generate(EngineRequest(bad)):
                pass
        out["bad"] = info.value.code
        with pytest.raises(EngineError, match="maximum model length") as info:
            async for _ in engine.generate(EngineRequest(Generate("tl", "m", prompt="too long"))):
                pass
        out["too_long"] = info.value.code
        # cancelling the trio side cancels vLLM's generate, which aborts the request
        with trio.move_on_after(0.05):
            long = Generate("long", "m", prompt="x", params=SamplingParams(max_tokens=100_000))
            async for _ in engine.generate(EngineRequest(long)):
                pass
        await engine.abort("long")
        for _ in range(100):
            if "long" in llm.cancelled:
                break
            await trio.sleep(0.01)
        return out

    out = run_guest(main)
    assert out["text"] == "".join(f"t{i} " for i in range(20))
    assert out["last"].finish_reason == "length"
    assert out["last"].usage == Usage(2, 20, 1)
    pre = out["prefill"]
    assert pre.kv_transfer_params == {"remote_block_ids": [9], **NIXL_PREFILL_PARAMS}
    assert pre.first_token_ids == [100]
    assert out["encode"].mm_hashes == ["h"]
    assert out["no_tensor"] is FailureCode.BAD_REQUEST
    assert out["bad"] is out["too_long"] is FailureCode.BAD_REQUEST
    assert llm.cancelled == ["long"] and llm.aborted.count("long") == 2
    calls = {rid: (prompt, sp) for rid, prompt, sp in llm.calls}
    assert calls["g"][1].output_kind == RequestOutputKind.DELTA
    assert calls["p"][1].max_tokens == 1 and calls["p"][1].output_kind == "kind:final"
    e_prompt = calls["e"][0]
    assert e_prompt["prompt"] == "USER:<image>ASSISTANT:"
    assert e_prompt["multi_modal_data"]["image"].shape == (2, 2, 3)
    assert e_prompt["multi_modal_uuids"] == {"image": ["h"]}


def test_capabilities_name_top_logprobs_where_the_role_generates() -> None:
    bridge = AsyncioBridge(asyncio.new_event_loop())
    try:
        for role, has in (("pd", True), ("d", True), ("p", False), ("e", False)):
            caps = make_engine(FakeAsyncLLM(), bridge, role).capabilities
            assert ("top_logprobs" in caps) is has and ("logprobs" in caps) is has, role
    finally:
        bridge.loop.close()


def test_worker_server_sends_alternatives_and_prompt_logprobs() -> None:
    """Over the wire from vLLM's shapes: streamed Deltas carry each token's entry with its
    alternatives; a whole answer's Finish all of them and the prompt's logprobs."""
    llm = FakeAsyncLLM()
    ctx = zmq.Context()
    params = SamplingParams(max_tokens=6, logprobs=2, prompt_logprobs=1)

    async def main(bridge: AsyncioBridge) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    WorkerServer(make_engine(llm, bridge), ctx=ctx, control_bind=None).run
                )
                chan = await nursery.start(RpcChannel(server.endpoint, ctx=ctx).run)
                session = await chan.wait_ready()
                out["caps"] = session.capabilities
                for stream in (True, False):
                    msg = Generate(f"s{stream}", "m", prompt_token_ids=[7, 8, 9], params=params,
                                   stream=stream)  # fmt: skip
                    async with chan.stream(msg) as events:
                        out[stream] = [e async for e in events]
                nursery.cancel_scope.cancel()
        return out

    try:
        out = run_guest(main)
    finally:
        ctx.destroy(linger=0)
    assert "top_logprobs" in out["caps"]
    want = [expected(1000 + i, i % 4 + 1, 2) for i in range(6)]
    prompt = [None, expected(8, 2, 1), expected(9, 3, 1)]
    *deltas, finish = out[True]
    assert [t for d in deltas for t in d.logprobs] == want and len(deltas) == 6
    assert isinstance(finish, Finish) and finish.prompt_logprobs == prompt
    (finish,) = out[False]  # a whole answer: all of it in the Finish (finish_output)
    assert finish.logprobs == want and finish.prompt_logprobs == prompt
    assert finish.token_ids == [1000 + i for i in range(6)]
    assert llm.calls[-1][2].prompt_logprobs == 1 and llm.calls[-1][2].logprobs == 2


def test_worker_server_serves_the_vllm_adapter() -> None:
    """The whole path: RpcChannel -> WorkerServer -> VllmEngine -> (fake) AsyncLLM on asyncio,
    with trio as the guest; a client that stops reading aborts the request in the engine."""
    llm = FakeAsyncLLM()
    ctx = zmq.Context()

    async def main(bridge: AsyncioBridge) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    WorkerServer(make_engine(llm, bridge), ctx=ctx, control_bind=None).run
                )
                chan = await nursery.start(RpcChannel(server.endpoint, ctx=ctx).run)
                await chan.wait_ready()
                text = []
                msg = Generate("s", "m", prompt="x", params=SamplingParams(max_tokens=8))
                async with chan.stream(msg) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            text.append(event.text)
                        else:
                            assert isinstance(event, Finish)
                            out["finish"] = event
                out["text"] = "".join(text)
                out["prefill"] = await chan.call(Prefill("p", "m", prompt="x"))
                ref, data = _tensor(np.ones((4, 4, 3), np.uint8))
                enc = Encode("e", "m", [MediaItem("image", hash="h", tensor=0)], tensors=[ref])
                with pytest.raises(RpcError) as info:  # roles are the server's business
                    await chan.call(enc, payload=[data])
                out["encode"] = info.value.code
                long = Generate("long", "m", prompt="x", params=SamplingParams(max_tokens=10**6))
                async with chan.stream(long) as events:
                    async for _ in events:
                        break  # leaving the stream sends Abort
                while "long" not in llm.aborted:
                    await trio.sleep(0.01)
                with pytest.raises(RpcError) as info:
                    await chan.call(Generate("v", "nope", prompt="x"))
                out["wrong_model"] = info.value.code
                out["metrics"] = await chan.metrics()
                nursery.cancel_scope.cancel()
        return out

    try:
        out = run_guest(main)
    finally:
        ctx.destroy(linger=0)
    assert out["text"] == "".join(f"t{i} " for i in range(8))
    assert out["finish"].usage == Usage(3, 8, 1) and out["finish"].seq == 8
    assert isinstance(out["prefill"], PrefillDone) and out["prefill"].first_token_ids == [100]
    assert out["encode"] is FailureCode.UNSUPPORTED
    assert "long" in llm.cancelled
    assert out["wrong_model"] is FailureCode.BAD_REQUEST
    assert out["metrics"]["vllm:num_requests_running"] == 0
    assert math.isfinite(out["metrics"]["lmgw_worker_requests_total"])


# -- structured outputs -------------------------------------------------------------------------


class FakeStructuredOutputsParams:
    """vLLM's ``StructuredOutputsParams`` (a dataclass): its field names, nothing else."""

    FIELDS = ("json", "regex", "choice", "grammar", "json_object", "disable_fallback",
              "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
              "structural_tag")  # fmt: skip

    def __init__(self, **kw: Any) -> None:
        unknown = set(kw) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        self.__dict__.update(dict.fromkeys(self.FIELDS), **kw)


class FakeNewSamplingParams(FakeSamplingParams):
    __struct_fields__ = (*FakeSamplingParams.__struct_fields__, "structured_outputs")


class FakeOldSamplingParams(FakeSamplingParams):
    __struct_fields__ = (*FakeSamplingParams.__struct_fields__, "guided_decoding")


def test_structured_kwargs_name_the_one_constraint_and_its_options() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert structured_kwargs(StructuredOutput("json", schema)) == {"json": schema}
    assert structured_kwargs(StructuredOutput("json_object")) == {"json_object": True}
    got = structured_kwargs(
        StructuredOutput("choice", ["yes", "no"], {"disable_any_whitespace": True})
    )
    assert got == {"choice": ["yes", "no"], "disable_any_whitespace": True}
    params = SamplingParams(max_tokens=5, structured=StructuredOutput("regex", "[a-z]+"))
    assert sampling_kwargs(params)["structured_outputs"] == {"regex": "[a-z]+"}
    # a hand-off leg emits one token that nobody reads: no grammar to compile there
    assert "structured_outputs" not in sampling_kwargs(params, stage="prefill")


@pytest.mark.parametrize(
    ("sp_cls", "field"),
    [(FakeNewSamplingParams, "structured_outputs"), (FakeOldSamplingParams, "guided_decoding")],
)
def test_engine_passes_the_constraint_under_the_field_its_vllm_has(
    sp_cls: type, field: str
) -> None:
    llm = FakeAsyncLLM()
    schema = {"type": "object"}

    async def main(bridge: AsyncioBridge) -> tuple[frozenset[str], list[str]]:
        engine = VllmEngine(
            llm, role="pd", models=["m"], bridge=bridge, sampling_params_cls=sp_cls,
            output_kinds=RequestOutputKind, structured_params_cls=FakeStructuredOutputsParams,
        )  # fmt: skip
        params = SamplingParams(max_tokens=2, structured=StructuredOutput("json", schema))
        gen = Generate("g", "m", prompt_token_ids=[1, 2], params=params)
        texts = [d.text async for d in engine.generate(EngineRequest(gen))]
        return engine.capabilities, texts

    caps, texts = run_guest(main)
    assert "structured_outputs" in caps and texts
    ((_, _, sp),) = llm.calls
    constraint = getattr(sp, field)
    assert isinstance(constraint, FakeStructuredOutputsParams)
    assert constraint.json == schema and constraint.regex is None


def test_an_engine_without_the_class_does_not_claim_the_capability() -> None:
    bridge = AsyncioBridge(asyncio.new_event_loop())
    try:
        caps = make_engine(FakeAsyncLLM(), bridge).capabilities
        assert "structured_outputs" not in caps and "top_logprobs" in caps
    finally:
        bridge.loop.close()


def test_cache_salt_goes_into_the_prompt_not_the_sampling_params() -> None:
    """vLLM isolates prefix caches per ``cache_salt``, a field of the prompt: left among the
    sampling extras it would land in extra_args, and tenants would share cached prefixes."""
    params = SamplingParams(max_tokens=3, extra={"cache_salt": "tenant-a", "min_p": 0.1})
    gen = Generate("g", "m", prompt_token_ids=[1, 2], params=params)
    prompt = prompt_input(EngineRequest(gen))
    assert prompt == {"prompt_token_ids": [1, 2], "cache_salt": "tenant-a"}
    kw = sampling_kwargs(params, known_fields=FakeSamplingParams.__struct_fields__)
    assert "cache_salt" not in kw and "cache_salt" not in kw.get("extra_args", {})
    assert "cache_salt" not in prompt_input(EngineRequest(Generate("h", "m", prompt="x")))
