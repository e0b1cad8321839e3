"""The LoRA adapters of a simulated vLLM worker (sans-IO): which adapter names it serves and from
which paths, with vLLM's rules and messages for loading and unloading them at run time
(``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``; vLLM's ``OpenAIServingModels``).

No weights exist: an adapter is a name the API accepts as ``model`` and lists in ``/v1/models``,
so a gateway's adapter-aware routing can be tested. Every path "loads" (vLLM would 404 a path
with no adapter in it). The adapters given at start (vLLM's ``--lora-modules``) come back on
:meth:`LoraAdapters.reset`, as after an engine restart; those loaded at run time do not.

Each adapter has a number, vLLM's ``lora_int_id`` (:meth:`LoraAdapters.lora_id`), which its KV
events carry as ``lora_id``: as in vLLM, start-up adapters are 1..k in ``--lora-modules`` order
and each run-time load takes the next number, never reused while the worker runs; an in-place
reload keeps its number (its blocks stay keyed by its name), and :meth:`LoraAdapters.reset`
numbers the start-up adapters 1..k again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

INVALID_USER_INPUT = "InvalidUserInput"
NOT_FOUND = "NotFoundError"


class LoraError(Exception):
    """A refused load or unload: the HTTP status, vLLM's message and its error ``type``."""

    def __init__(self, status: int, message: str, err_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


def parse_lora_module(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` (one ``--lora-modules`` item) as ``(name, path)``; ``ValueError`` if it is
    not of that form, so that a bad flag is a usage error rather than a worker without it."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules expects NAME=PATH items, got {spec!r}")
    return name, path


class LoraAdapters:
    """The adapters a worker serves, name -> path, in load order (``/v1/models`` lists them in
    that order, as vLLM does).

    Args:
        modules: the start-up adapters (``--lora-modules``); a repeated name is a
            ``ValueError``, as vLLM's start-up fails loading the second one.
    """

    def __init__(self, modules: Iterable[tuple[str, str]] = ()) -> None:
        self._startup: dict[str, str] = {}
        for name, path in modules:
            if name in self._startup:
                raise ValueError(f"LoRA adapter {name!r} is given twice in --lora-modules")
            self._startup[name] = path
        self._paths = dict(self._startup)
        self._ids: dict[str, int] = {}
        self._last_id = 0
        self._number_startup()

    def _number_startup(self) -> None:
        self._ids = {name: i for i, name in enumerate(self._startup, 1)}
        self._last_id = len(self._ids)

    def lora_id(self, name: str) -> int | None:
        """The adapter's number (vLLM's ``lora_int_id``, >= 1), or None if it is not loaded."""
        return self._ids.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._paths.items()))

    def __len__(self) -> int:
        return len(self._paths)

    def as_dict(self) -> dict[str, str]:
        return dict(self._paths)

    def load(self, name: str, path: str, *, inplace: bool = False) -> str:
        """Add ``name`` (or, with ``inplace``, repoint an existing one, keeping its place);
        vLLM's success text, or :class:`LoraError` with vLLM's 400s."""
        if not name or not path:
            raise LoraError(
                400, "Both 'lora_name' and 'lora_path' must be provided.", INVALID_USER_INPUT
            )
        if name in self._paths and not inplace:
            raise LoraError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
                INVALID_USER_INPUT,
            )
        self._paths[name] = path
        if name not in self._ids:
            self._last_id += 1
            self._ids[name] = self._last_id
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, name: str) -> str:
        """Remove ``name`` (a start-up adapter too, as vLLM allows); vLLM's success text, or
        :class:`LoraError` (400 without a name, 404 for a name not loaded)."""
        if not name:
            message = "'lora_name' needs to be provided to unload a LoRA adapter."
            raise LoraError(400, message, INVALID_USER_INPUT)
        if name not in self._paths:
            raise LoraError(404, f"The lora adapter '{name}' cannot be found.", NOT_FOUND)
        del self._paths[name]
        del self._ids[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def reset(self) -> None:
        """Back to the start-up adapters, as a restarted engine would have (run-time loads are
        gone, unloaded start-up adapters and their paths are back)."""
        self._paths = dict(self._startup)
        self._number_startup()


class LoraSlots:
    """vLLM's ``--max-loras``: at most ``max_loras`` adapters are active in the running batch
    (sans-IO; the worker does the waiting). An adapter's request joins it if active, else takes
    a free slot or evicts the least recently used active adapter with no running requests; with
    every slot busy it must wait, so a gateway sees vLLM's adapter contention.

    Args:
        max_loras: the slots (>= 1); None: unlimited (never waits nor evicts), still tracking
            which adapters run for vLLM's ``lora_requests_info``.
    """

    def __init__(self, max_loras: int | None) -> None:
        if max_loras is not None and max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        self.max_loras = max_loras
        self._active: OrderedDict[str, int] = OrderedDict()  # name -> running, LRU first
        self._waiting: dict[str, int] = {}

    def try_acquire(self, name: str) -> tuple[bool, str | None]:
        """Take a slot for one request of ``name``: ``(False, None)`` if it must wait, else
        ``(True, evicted)`` where ``evicted`` is the adapter swapped out, if any. Whether the
        adapter must be loaded (and cost its load time) is :meth:`needs_load` asked before."""
        if name in self._active:
            self._active[name] += 1
            self._active.move_to_end(name)
            return True, None
        evicted: str | None = None
        if self.max_loras is not None and len(self._active) >= self.max_loras:
            evicted = next((n for n, running in self._active.items() if running == 0), None)
            if evicted is None:
                return False, None
            del self._active[evicted]
        self._active[name] = 1
        return True, evicted

    def needs_load(self, name: str) -> bool:
        """Whether taking a slot for ``name`` would load it (it is not active)."""
        return name not in self._active

    def release(self, name: str) -> bool:
        """One request of ``name`` ended; True if its adapter became idle (a waiter may now
        evict it)."""
        running = self._active.get(name)
        if not running:
            return False
        self._active[name] = running - 1
        return running == 1

    def wait(self, name: str) -> None:
        """Count one request of ``name`` as waiting for a slot (vLLM's waiting adapters)."""
        self._waiting[name] = self._waiting.get(name, 0) + 1

    def unwait(self, name: str) -> None:
        left = self._waiting.get(name, 0) - 1
        if left > 0:
            self._waiting[name] = left
        else:
            self._waiting.pop(name, None)

    def active(self) -> dict[str, int]:
        """Active adapters -> running requests, least recently used first."""
        return dict(self._active)

    def running(self) -> list[str]:
        """Adapters with running requests (vLLM's ``running_lora_adapters``)."""
        return [n for n, count in self._active.items() if count > 0]

    def waiting(self) -> list[str]:
        """Adapters with requests waiting for a slot (vLLM's ``waiting_lora_adapters``)."""
        return list(self._waiting)

    def clear_idle(self) -> None:
        """Drop the idle adapters (a reset engine has none loaded); busy ones stay counted so
        their requests release correctly."""
        for name in [n for n, count in self._active.items() if count == 0]:
            del self._active[name]


__all__ = ["LoraAdapters", "LoraError", "LoraSlots", "parse_lora_module"]
