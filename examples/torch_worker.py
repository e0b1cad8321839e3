"""A native lmgw worker around a PyTorch causal language model (Hugging Face ``transformers``).

An example of writing an :class:`lmgw.worker.Engine` for an engine that has no side channel
between workers: its prefill role sends the prompt's KV back to the gateway as tensor frames
(``PrefillResult.payload``), and the gateway hands them to the decode worker
(``EngineRequest.kv_arrays()``; docs/native-protocol.md, "Hand-offs through the gateway").
vLLM workers do not need this (``python -m lmgw.worker --engine vllm``: NIXL moves their KV).

::

    python examples/torch_worker.py --role p --model PATH --device cuda --dtype bfloat16
    python examples/torch_worker.py --role d --random-init TOKENIZER_DIR --layers 4 --seed 0

In front of them, ``lmgw serve --config lmgw.toml`` with (the gateway renders and tokenizes
for native workers, so it needs the model's tokenizer folder)::

    [[models]]
    name = "torch-llm"          # --served-model-name
    flow = "p/d"
    tokenizer = "PATH"          # the model folder

    [[workers]]
    url = "zmq+tcp://127.0.0.1:7001"   # the p worker's --bind
    role = "p"

    [[workers]]
    url = "zmq+tcp://127.0.0.1:7002"   # the d worker's
    role = "d"

``--random-init DIR`` builds a small Llama with seeded random weights and the vocabulary of
the tokenizer in DIR (every process with the same flags holds the same model), so the
disaggregated flow can be checked end to end on a GPU without downloading a model
(``examples/torch_pd_check.py``). One request runs on the model at a time (no batching), in a
worker thread, so heartbeats are answered while it computes.

Both the merged and the split roles compute a prompt the same way (the prompt less its last
token, then one step on the last token), so a P -> D answer is bitwise the merged one's:
the decode worker gets the very tensors the merged worker would have kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio
from tokenizers import Tokenizer

from lmgw.protocol import FailureCode, Usage
from lmgw.worker import (
    EncodeResult,
    Engine,
    EngineError,
    EngineRequest,
    GenerateOutput,
    PrefillResult,
)
from lmgw.worker.cli import build_parser, serve, server_from_args

log = logging.getLogger("torch_worker")

WIRE_VIEWS = {torch.bfloat16: torch.int16}
"""dtypes numpy lacks travel as a same-size integer view (lossless); the hand-off names them."""


class TorchEngine(Engine):
    """Roles ``pd``, ``p`` and ``d`` over one causal LM; greedy or seeded temperature
    sampling, ``max_tokens``, end of sequence and stop token ids."""

    def __init__(self, model: Any, tokenizer: Tokenizer, role: str, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.role = role
        self.models = (name,)
        self.device = next(model.parameters()).device
        self.eos = model.config.eos_token_id
        self._lock = trio.Lock()  # one forward at a time: no batching in this example
        self.running = 0
        self.waiting = 0

    @property
    def capabilities(self) -> frozenset[str]:
        caps = super().capabilities
        return caps | {"kv_tensors"} if self.role == "d" else caps

    # -- the model, in a worker thread ---------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:  # not abandoned on cancel: the cache is never used by two threads
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            self.running -= 1
            self._lock.release()

    @torch.inference_mode()
    def _prompt_cache(self, ids: list[int]) -> Any:
        """The KV cache of ``ids`` less its last token (the decode step computes that one)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        if len(ids) > 1:
            x = torch.tensor([ids[:-1]], device=self.device)
            self.model(input_ids=x, past_key_values=cache, use_cache=True)
        return cache

    @torch.inference_mode()
    def _step(self, cache: Any, token: int) -> torch.Tensor:
        x = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=x, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float()

    def _kv_payload(self, cache: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
        keys, values = _cache_tensors(cache)
        k, v = torch.stack(keys), torch.stack(values)  # [layers, batch, heads, tokens, dim]
        wire = WIRE_VIEWS.get(k.dtype)
        meta = {"dtype": str(k.dtype).removeprefix("torch."), "shape": list(k.shape)}
        if wire is not None:
            k, v = k.view(wire), v.view(wire)
        return meta, [k.contiguous().cpu().numpy(), v.contiguous().cpu().numpy()]

    def _cache_from(self, meta: dict[str, Any], arrays: list[np.ndarray]) -> Any:
        from transformers import DynamicCache

        if len(arrays) != 2:
            raise EngineError(FailureCode.BAD_REQUEST, f"expected K and V, got {len(arrays)}")
        dtype = getattr(torch, str(meta.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise EngineError(FailureCode.BAD_REQUEST, f"unknown KV dtype {meta.get('dtype')!r}")
        k, v = (torch.from_numpy(np.array(a)).to(self.device) for a in arrays)
        if dtype in WIRE_VIEWS:
            k, v = k.view(dtype), v.view(dtype)
        if list(k.shape) != meta.get("shape") or k.shape != v.shape:
            raise EngineError(FailureCode.BAD_REQUEST, "the KV's shape is not the one announced")
        cache = DynamicCache()
        for layer in range(k.shape[0]):
            cache.update(k[layer], v[layer], layer)
        return cache

    # -- the Engine interface ------------------------------------------------------------------
    async def prefill(self, req: EngineRequest[Any]) -> PrefillResult:
        ids = _prompt_ids(req)
        cache = await self._run(self._prompt_cache, ids)
        meta, payload = await self._run(self._kv_payload, cache)
        params = {**(req.msg.kv_transfer_params or {}), "torch_kv": meta}
        return PrefillResult(params, Usage(prompt_tokens=len(ids)), [], payload)

    async def generate(self, req: EngineRequest[Any]) -> AsyncIterator[GenerateOutput]:  # type: ignore[override]
        msg = req.msg
        ids = _prompt_ids(req)
        p = msg.params
        if self.role == "d":
            meta = (msg.kv_transfer_params or {}).get("torch_kv")
            arrays = req.kv_arrays()
            if meta is None or not arrays:
                raise EngineError(
                    FailureCode.BAD_REQUEST, "a decode worker needs the prefill's KV tensors"
                )
            cache = await self._run(self._cache_from, meta, arrays)
            if meta["shape"][3] != len(ids) - 1:
                raise EngineError(FailureCode.BAD_REQUEST, "the KV is not this prompt's")
        else:
            cache = await self._run(self._prompt_cache, ids)
        generator = None
        if p.temperature and p.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(p.seed)
        limit = p.max_tokens if p.max_tokens is not None else 256
        stops = set(p.stop_token_ids) | ({self.eos} if self.eos is not None else set())
        out: list[int] = []
        text = ""
        token = ids[-1]
        finish = "length"
        while len(out) < limit:
            logits = await self._run(self._step, cache, token)
            token = _pick(logits, p.temperature, generator)
            out.append(token)
            if token in stops and not p.ignore_eos:
                finish = "stop"
                yield GenerateOutput(token_ids=[token])
                break
            full = self.tokenizer.decode(out)
            delta, text = full[len(text) :], full
            yield GenerateOutput(text=delta, token_ids=[token])
        yield GenerateOutput(
            finish_reason=finish,
            usage=Usage(len(ids), len(out), len(ids) - 1 if self.role == "d" else 0),
        )

    async def encode(self, req: EngineRequest[Any]) -> EncodeResult:
        raise EngineError(FailureCode.UNSUPPORTED, "this example has no encoder")

    async def abort(self, request_id: str) -> None:
        await trio.lowlevel.checkpoint()  # the server cancelled its task: nothing else is held

    def metrics(self) -> dict[str, float]:
        return {
            "vllm:num_requests_running": float(self.running),
            "vllm:num_requests_waiting": float(self.waiting),
        }


def _prompt_ids(req: EngineRequest[Any]) -> list[int]:
    ids = req.msg.prompt_token_ids
    if not ids:
        raise EngineError(FailureCode.BAD_REQUEST, "this worker takes prompt_token_ids")
    return list(ids)


def _pick(logits: torch.Tensor, temperature: float | None, generator: Any) -> int:
    if not temperature:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values of a DynamicCache (transformers 5: ``layers``; 4: lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [layer.keys for layer in layers], [layer.values for layer in layers]
    return list(cache.key_cache), list(cache.value_cache)


def random_model(tokenizer_dir: str, ns: argparse.Namespace) -> Any:
    """A small Llama with seeded random weights and the vocabulary of ``tokenizer_dir``. The
    output layer is scaled so the next token is decisive: greedy text then depends on the
    computation, not on rounding between two near-equal logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=ns.hidden,
        intermediate_size=ns.hidden * 4,
        num_hidden_layers=ns.layers,
        num_attention_heads=ns.heads,
        num_key_value_heads=max(1, ns.heads // 2),
        max_position_embeddings=8192,
        eos_token_id=None,
    )
    torch.manual_seed(ns.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(ns.logit_scale)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sim=False)
    parser.prog = "python examples/torch_worker.py"
    group = parser.add_argument_group("PyTorch model")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face model folder (weights and tokenizer)")
    source.add_argument("--random-init", metavar="TOKENIZER_DIR", help="a seeded random Llama")
    group.add_argument("--served-model-name", default="torch-llm")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    group.add_argument("--layers", type=int, default=4)
    group.add_argument("--hidden", type=int, default=512)
    group.add_argument("--heads", type=int, default=8)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--logit-scale", type=float, default=8.0)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr)
    warnings.filterwarnings("ignore", ".*past_key_values.*deprecated", FutureWarning)
    if ns.role not in ("pd", "p", "d"):
        parser.error("--role must be pd, p or d (this example has no encoder)")
    dtype = getattr(torch, ns.dtype)
    # the same inputs give the same logits on every worker and every run: a split answer must
    # equal the merged one even where two logits nearly tie (cuBLAS picks kernels by workspace)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if ns.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ns.model, torch_dtype=dtype)
        tokenizer_file = Path(ns.model) / "tokenizer.json"
    else:
        model = random_model(ns.random_init, ns)
        tokenizer_file = Path(ns.random_init) / "tokenizer.json"
    model = model.to(device=ns.device, dtype=dtype).eval()
    engine = TorchEngine(
        model, Tokenizer.from_file(str(tokenizer_file)), ns.role, ns.served_model_name
    )
    trio.run(serve, server_from_args(ns, engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
