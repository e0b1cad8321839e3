"""``lmgw.aio``: the in-process gateway for asyncio programs (trio on a dedicated thread).

``async with lmgw.aio.Gateway(workers=[...]) as gw: await gw.chat(...)``; see
:mod:`lmgw.sdk.aio` for how the bridge works and ``docs/sdk.md`` for the guide. The HTTP
:class:`lmgw.Client` needs no bridge: it is anyio code and runs on asyncio directly.
"""

from __future__ import annotations

from .sdk.aio import Gateway

__all__ = ["Gateway"]
