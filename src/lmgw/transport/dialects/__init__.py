"""Engine dialects: sans-IO builders of each stage's HTTP request and readers of its result.

``get_dialect("vllm-nixl")`` gives the dialect a worker group is configured with; the
pipeline runs the legs (see :mod:`.base` for the contract, ``docs/protocols.md`` for the wire).
"""

from __future__ import annotations

from typing import Any

from .base import (
    BodyError,
    ClientBody,
    Dialect,
    HandOff,
    HandOffError,
    Peer,
    PeerError,
    StageContext,
    StageError,
    StageRequest,
)
from .openai import OpenAIPassThrough
from .sglang_bootstrap import SglangBootstrap
from .vllm_epd import MediaItem, VllmEpd, find_media
from .vllm_lmcache import VllmLmcache
from .vllm_nixl import VllmNixl
from .vllm_p2pnccl import VllmP2pNccl

DIALECTS: dict[str, type[Dialect]] = {
    d.name: d
    for d in (VllmNixl, VllmP2pNccl, VllmLmcache, VllmEpd, SglangBootstrap, OpenAIPassThrough)
}


def get_dialect(name: str, **options: Any) -> Dialect:
    """A dialect instance by name; ``options`` go to its constructor (e.g. ``push=True``)."""
    try:
        cls = DIALECTS[name]
    except KeyError:
        raise ValueError(
            f"unknown dialect {name!r}; known dialects: {', '.join(sorted(DIALECTS))}"
        ) from None
    return cls(**options)


__all__ = [
    "DIALECTS",
    "BodyError",
    "ClientBody",
    "Dialect",
    "HandOff",
    "HandOffError",
    "MediaItem",
    "Peer",
    "PeerError",
    "StageContext",
    "StageError",
    "StageRequest",
    "find_media",
    "get_dialect",
]
