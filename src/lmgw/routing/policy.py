"""The routing interface: a policy picks one worker from a snapshot of candidates.

Policies are pure and synchronous: no I/O, no awaits. They see the candidate tuple (already
filtered to routable workers of the right model and role) and a :class:`RouteContext`, and may
keep their own state, updated through the ``on_*`` hooks that the pipeline calls (``on_finish``
from ``finally`` blocks). One instance serves one role (encode, prefill, decode or merged).

Every hook has a no-op default, so a policy written against an older interface keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..workers.worker import Worker
    from .kv_events import KVEvent

#: session keys longer than this are replaced by a digest (bounds session-table memory)
MAX_SESSION_KEY = 256


class RouteContext:
    """What a policy may look at for one request. Cheap to build: fields are filled lazily by
    the pipeline only when a policy declares it needs them (``needs_tokens``).

    - ``tokens``: the prompt's token ids exactly as the engine will see them (chat template
      rendered, then encoded), when the model has a gateway tokenizer whose parity passed.
    - ``text_key``: otherwise, the raw prompt bytes (the request's ``messages`` or ``prompt``
      JSON value as received): whole-conversation text, so prefix locality still works.
    - ``session_key``: the conversation/user key (see :func:`session_key_of`), or None.
    - ``scratch``: per-request memo for policies (block hashes, the decision): keyed by the
      policy object or a tuple naming what is stored; created on first use.
    """

    __slots__ = (
        "headers",
        "lora",
        "model",
        "request_id",
        "scratch",
        "session_key",
        "text_key",
        "tokens",
    )

    def __init__(
        self,
        model: str,
        request_id: str = "",
        session_key: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        tokens: Sequence[int] | None = None,
        text_key: bytes | None = None,
        lora: str | None = None,
    ) -> None:
        self.model = model
        self.request_id = request_id
        self.session_key = session_key
        self.headers = headers or []
        self.tokens = tokens
        self.text_key = text_key
        #: the LoRA adapter ``model`` names (None: a base model): engines cache an adapter's
        #: blocks apart from the base model's (vLLM keys every block by its adapter too)
        self.lora = lora
        self.scratch: dict[Any, Any] | None = None

    def fork(self) -> RouteContext:
        """The same request routed a second time (a hedge): the same keys, its own scratch,
        so that what a policy remembers of one dispatch (a queued prefill) is not the
        other's."""
        return RouteContext(
            self.model, self.request_id, self.session_key, self.headers, self.tokens,
            self.text_key, self.lora,
        )  # fmt: skip

    def memo(self) -> dict[Any, Any]:
        """The per-request scratch dict (created on first use)."""
        s = self.scratch
        if s is None:
            s = self.scratch = {}
        return s


class RouteInfo:
    """One routing decision, as a policy explains it (the ``x-lmgw-route`` header, traces)."""

    __slots__ = ("policy", "predicted_tokens", "prompt_tokens", "reason", "worker")

    def __init__(
        self,
        policy: str,
        worker: str,
        reason: str = "",
        predicted_tokens: int | None = None,
        prompt_tokens: int | None = None,
    ) -> None:
        self.policy = policy
        self.worker = worker
        #: why this worker: e.g. "cache", "least_load", "sticky", "ring", "spill", "no_prompt"
        self.reason = reason
        #: prompt tokens the policy expects the worker to have cached (cache-aware policies)
        self.predicted_tokens = predicted_tokens
        self.prompt_tokens = prompt_tokens

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}

    def header_value(self) -> bytes:
        """``policy=cache_aware; worker=w1; reason=cache; predicted=1024; prompt=1500``."""
        parts = [f"policy={self.policy}", f"worker={self.worker}"]
        if self.reason:
            parts.append(f"reason={self.reason}")
        if self.predicted_tokens is not None:
            parts.append(f"predicted={self.predicted_tokens}")
        if self.prompt_tokens is not None:
            parts.append(f"prompt={self.prompt_tokens}")
        return "; ".join(parts).encode()

    def __repr__(self) -> str:
        return f"RouteInfo({self.header_value().decode()})"


class Policy:
    """Base class for routing policies. Subclasses implement :meth:`choose`.

    Construction: the registry calls ``cls.from_config(routing_config)`` when the class has it,
    else ``cls()``; so a third-party policy needs neither.
    """

    #: registry name and metrics label
    name: str = "policy"
    #: True if ``choose`` needs the prompt: the pipeline then fills ``ctx.tokens`` (or, without
    #: a tokenizer, ``ctx.text_key``) before asking (it tokenizes only then)
    needs_tokens: bool = False
    #: True if the policy uses engine KV-cache events (the gateway subscribes only then)
    wants_kv_events: bool = False

    def choose(self, candidates: Sequence[Worker], ctx: RouteContext) -> Worker:
        """Pick one of ``candidates`` (never empty; only routable workers)."""
        raise NotImplementedError

    def on_dispatch(self, worker: Worker, ctx: RouteContext) -> None:
        """The request was sent to ``worker`` (the final choice: record affinity here)."""

    def on_first_token(self, worker: Worker, ctx: RouteContext) -> None:
        """The streamed answer from ``worker`` began: its prefill is over. Called only for
        streams (the first event relayed), and only when a policy overrides it; a request may
        end without it (no stream, an error), so release per-request state in ``on_finish``."""

    def on_finish(self, worker: Worker, ctx: RouteContext, ok: bool) -> None:
        """The request on ``worker`` ended (success, error or cancellation)."""

    def on_usage(
        self, worker: Worker, ctx: RouteContext, prompt_tokens: int, cached_tokens: int | None
    ) -> None:
        """The worker reported usage for the request: ``usage.prompt_tokens`` and
        ``usage.prompt_tokens_details.cached_tokens`` (None when it does not report it)."""

    def on_kv_event(self, worker: Worker, event: KVEvent) -> None:
        """An engine KV-cache event from ``worker`` (in the order the engine published them)."""

    def on_worker_removed(self, worker: Worker) -> None:
        """``worker`` left the fleet: forget any state about it."""

    def predicted_cached_tokens(
        self, worker: Worker, ctx: RouteContext | None = None
    ) -> int | None:
        """Prompt tokens the policy expected ``worker`` to have cached for ``ctx``'s request
        (for the precision audit); None when the policy makes no such prediction."""
        return None

    def predicted_cached_by_worker(
        self, candidates: Sequence[Worker], ctx: RouteContext
    ) -> Mapping[str, int]:
        """:meth:`predicted_cached_tokens` of every candidate at once, after ``choose`` for
        ``ctx``: worker id -> tokens, workers with none left out (joint P/D placement weighs
        every prefill worker). Override it when one call can be cheaper than one per worker."""
        out = {}
        for w in candidates:
            tokens = self.predicted_cached_tokens(w, ctx)
            if tokens:
                out[w.id] = tokens
        return out

    def route_info(self, ctx: RouteContext | None = None) -> RouteInfo | None:
        """The decision made for ``ctx`` (or the last one), when the policy records it."""
        return None

    def warm_target(self, ctx: RouteContext) -> Worker | None:
        """A worker that should also get ``ctx``'s prompt prefilled, in the background, so
        that a hot prefix has more than one holder to balance between (``cache_aware`` with
        ``routing.cache_aware_replicas``); None: none."""
        return None

    def statistics(self) -> dict[str, float]:
        """Numbers for metrics (index size, evictions, hit ratio...); empty by default."""
        return {}

    def decision_counts(self) -> dict[str, int] | None:
        """How many choices the policy made, by its reason (``cache``, ``no_match``,
        ``spill``...), for ``lmgw_routing_decisions_total``; None when it keeps no reasons
        (the pipeline's own count of choices is exported then)."""
        return None


def route_header(policy: Policy, worker: Worker, ctx: RouteContext) -> bytes:
    """The ``x-lmgw-route`` value for a dispatch: the decision left for this worker in the
    request's scratch (joint P/D placement), else the policy's own explanation when it keeps
    one for this request and worker, else just the policy and worker."""
    info = ctx.scratch.get(RouteInfo) if ctx.scratch is not None else None
    if info is None or info.worker != worker.id:
        info = policy.route_info(ctx)
    if info is None or info.worker != worker.id:
        info = RouteInfo(policy.name, worker.id)
    return info.header_value()


def session_key_of(header_value: bytes | str | None, user: object = None) -> str | None:
    """The session key the pipeline puts in ``RouteContext.session_key``: the session header's
    value (``routing.session_header``), else the OpenAI ``user`` field when it is a non-empty
    string, else None. Keys longer than ``MAX_SESSION_KEY`` become a fixed-size digest."""
    if isinstance(header_value, bytes):
        header_value = header_value.decode("utf-8", "replace")
    key = header_value.strip() if header_value else None
    if not key:
        key = user.strip() if isinstance(user, str) and user.strip() else None
    if key is not None and len(key) > MAX_SESSION_KEY:
        from .hashring import hash64

        key = f"h:{hash64(key):016x}:{len(key)}"
    return key
