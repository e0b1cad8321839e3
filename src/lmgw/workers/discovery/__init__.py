"""Discovery backends: sources of workers besides the static ``[[workers]]``.

Each backend computes the workers its source wants and hands them to the gateway's
``sync_workers(source, workers)`` (sources ``file:<path>``, ``redis`` and ``k8s:<namespace>``);
the gateway adds the new ones and drains, then removes once idle, the ones that are gone. A
backend never touches the workers of another source or the static ones.

``await nursery.start(run_discovery, gateway, cfg.discovery)`` runs every configured backend as a
child of its own nursery and reports started once each has done its first sync, so the gateway
starts with the discovered fleet. (The vLLM P2P NCCL listener, ``workers/p2p_discovery.py``, is
started by the gateway itself: it is pushed to, not polling.)
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import trio

from ...config import DiscoveryConfig
from .sink import FleetSink

if TYPE_CHECKING:
    from .kubernetes import K8sMetrics

__all__ = ["FleetSink", "configured", "run_discovery"]


def configured(cfg: DiscoveryConfig) -> bool:
    """Whether any backend that :func:`run_discovery` runs is configured."""
    return cfg.file is not None or cfg.redis_url is not None or bool(cfg.k8s_selectors)


async def run_discovery(
    gateway: FleetSink,
    cfg: DiscoveryConfig,
    *,
    k8s_metrics: K8sMetrics | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the configured backends until cancelled; started after each one's first sync.

    Raises ConfigError at start-up for a discovery file that is missing or invalid (see
    ``file.py``), or a Kubernetes setup that cannot work (no API server, an unreadable token
    or CA file, a selector the API server rejects: ``kubernetes.py``); an unreachable Redis or
    API server is not an error.
    """
    async with trio.open_nursery() as nursery:
        if cfg.file is not None:
            from .file import run_file_discovery

            await nursery.start(
                partial(
                    run_file_discovery,
                    gateway,
                    cfg.file,
                    interval_s=cfg.file_interval_s,
                    missing_ok=cfg.file_missing_ok,
                )
            )
        if cfg.redis_url is not None:
            from .redis import run_redis_discovery

            await nursery.start(
                partial(
                    run_redis_discovery,
                    gateway,
                    cfg.redis_url,
                    prefix=cfg.redis_prefix,
                    interval_s=cfg.redis_interval_s,
                    timeout_s=cfg.redis_timeout_s,
                    reconnect_grace_s=cfg.redis_reconnect_grace_s,
                )
            )
        if cfg.k8s_selectors:
            from .kubernetes import run_k8s_discovery

            await nursery.start(partial(run_k8s_discovery, gateway, cfg, k8s_metrics))
        task_status.started()
