"""The ``[cache]`` section: which tiers the pool has, their budgets, and where Redis is.

Checked like the rest of the configuration (a bad value is a config error naming its key); the
messages never contain the Redis URL, which may hold a password.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import msgspec

__all__ = ["TIER_NAMES", "CacheConfig", "build_pool"]

TIER_NAMES = ("memory", "shm", "redis")
_SHM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")  # as lmgw.cache.shm checks it


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The distributed cache pool (docs/cache.md)."""

    # Tiers, fastest first, from memory (this process), shm (this host), redis (every host);
    # empty: no pool (the encoder cache stays an in-process set). E.g. ["memory", "redis"].
    tiers: list[str] = []
    # The memory tier's byte budget (payload + key + ~128 bytes per entry).
    memory_budget_bytes: int = 256 << 20
    # What this process's entries may take in shared memory (whole pages).
    shm_budget_bytes: int = 1 << 30
    # Processes (gateways, workers) with the same name on one host share the shm tier.
    shm_name: str = "lmgw-cache"
    # A tmpfs directory for the shm tier.
    shm_dir: str = "/dev/shm"
    # redis://[[user]:password@]host[:port][/db] of the redis tier (Redis >= 6.2).
    redis_url: str | None = None
    # Keys are `{redis_prefix}:cache:{key}`; separate deployments can share one Redis.
    redis_prefix: str = "lmgw"
    # Per Redis command (and connect); past it the tier is down until Redis answers again.
    redis_timeout_s: float = 1.0
    # Connections to Redis open at once.
    redis_max_connections: int = 16
    # Values above this many bytes are stored in Redis in chunks of this size.
    chunk_bytes: int = 1 << 20
    # Lifetime of an entry in every tier, 0: until evicted (configure Redis's maxmemory-policy).
    ttl_s: float = 3600.0
    # "through": a put writes every tier (others see it at once); "back": the first tier that
    # takes it, lower tiers get it when it is evicted.
    write: Literal["through", "back"] = "through"
    # Bigger values are refused.
    max_value_bytes: int = 1 << 30
    # The gateway's encoder-output cache uses the pool: a media item whose encoder output (or
    # the gateway's note that an encoder has it) is in the pool skips the E stage, across
    # gateway restarts and replicas when a shared tier holds it.
    encoder_outputs: bool = True

    def __post_init__(self) -> None:
        from ..config import ConfigError  # (no cycle: runs after lmgw.config is imported)

        def bad(key: str, reason: str) -> ConfigError:
            return ConfigError(reason, path=key)

        tiers = [t.strip().lower() for t in self.tiers]
        for t in tiers:
            if t not in TIER_NAMES:
                raise bad("tiers", f"{t!r} is not one of {', '.join(TIER_NAMES)}")
        if len(set(tiers)) != len(tiers):
            raise bad("tiers", "a tier is listed twice")
        msgspec.structs.force_setattr(self, "tiers", tiers)
        for key in ("memory_budget_bytes", "shm_budget_bytes", "max_value_bytes"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if not 1 <= self.chunk_bytes <= 64 << 20:
            raise bad("chunk_bytes", "must be between 1 and 64 MiB")
        if self.redis_max_connections < 1:
            raise bad("redis_max_connections", "must be >= 1")
        if not (self.redis_timeout_s > 0 and math.isfinite(self.redis_timeout_s)):
            raise bad("redis_timeout_s", "must be a positive finite number")
        if not (self.ttl_s >= 0 and math.isfinite(self.ttl_s)):
            raise bad("ttl_s", "must be a finite number >= 0")
        if not self.redis_prefix.strip():
            raise bad("redis_prefix", "must not be empty")
        if "redis" in tiers and self.redis_url is None:
            raise bad("redis_url", "the redis tier needs it")
        if self.redis_url is not None:
            from ..workers.discovery.resp import parse_redis_url

            try:
                parse_redis_url(self.redis_url)
            except ValueError as e:  # its messages never contain the password
                raise bad("redis_url", f"{e}") from None
        if not _SHM_NAME.fullmatch(self.shm_name):
            raise bad("shm_name", "letters, digits, '_', '.', '-' (at most 64)")


def build_pool(cfg: CacheConfig, *, producer: str = "", role: str = ""):  # type: ignore[no-untyped-def]
    """The pool ``cfg`` describes (None when it lists no tiers)."""
    if not cfg.tiers:
        return None
    from .api import CachePool
    from .tier import Tier

    tiers: list[Tier] = []
    for name in cfg.tiers:
        if name == "memory":
            from .memory import MemoryTier

            tiers.append(MemoryTier(cfg.memory_budget_bytes))
        elif name == "shm":
            from .shm import ShmTier

            tiers.append(ShmTier(cfg.shm_budget_bytes, cfg.shm_name, cfg.shm_dir))
        else:
            from .redis import RedisTier

            assert cfg.redis_url is not None
            tiers.append(
                RedisTier(
                    cfg.redis_url,
                    prefix=cfg.redis_prefix,
                    timeout_s=cfg.redis_timeout_s,
                    chunk_bytes=cfg.chunk_bytes,
                    max_connections=cfg.redis_max_connections,
                )
            )
    return CachePool(
        tiers,
        ttl_s=cfg.ttl_s,
        write=cfg.write,
        producer=producer,
        role=role,
        max_value_bytes=cfg.max_value_bytes,
    )
