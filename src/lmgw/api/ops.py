"""Operational endpoints: ``/health`` and ``/metrics``."""

from __future__ import annotations

import msgspec

from ..config import FLOW_ROLES, ROLE_NAMES
from ..http.types import Request, Responder


class OpsAPI:
    def __init__(self, gateway) -> None:
        self.gw = gateway

    def health_report(self) -> tuple[bool, dict]:
        """Per model, routable workers per role the model's flow needs."""
        gw = self.gw
        models: dict[str, dict] = {}
        ok = True
        for name in sorted(gw.served_models() | gw.configured_models()):
            flow = gw.flow_of(name)
            found = {r: gw.registry.candidates(name, r) for r in FLOW_ROLES[flow]}
            # a panic set (every worker ejected, routed to anyway) is not a routable worker
            roles = {ROLE_NAMES[r]: 0 if c.panic else len(c) for r, c in found.items()}
            ready = all(roles.values())
            ok &= ready
            models[name] = {"flow": flow, "ready": ready, "routable_workers": roles}
            panic = [ROLE_NAMES[r] for r, c in found.items() if c.panic]
            if panic:
                models[name]["panic"] = panic
        if not models:
            ok = False
        workers = {w.id: w.state.value for w in gw.registry}
        return ok, {"status": "ok" if ok else "unavailable", "models": models, "workers": workers}

    async def health(self, req: Request, responder: Responder) -> None:
        ok, report = self.health_report()
        await responder.send_full(
            200 if ok else 503,
            [(b"content-type", b"application/json")],
            msgspec.json.encode(report),
        )

    async def metrics(self, req: Request, responder: Responder) -> None:
        body = self.gw.metrics.render()
        await responder.send_full(
            200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")], body
        )
