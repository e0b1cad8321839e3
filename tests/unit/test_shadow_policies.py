"""Shadow policies (lmgw.routing.shadow): asked on live traffic beside the active policy, never
obeyed, each in its own counterfactual world.

Checked: the active policy routes exactly as it would alone (the shadow changes nothing); each
shadow is told about its own choices, so a cache-aware shadow learns the placement it would
have made and predicts hits in it (multi-turn chats: round_robin active, cache_aware shadow);
agreement counts; load skew of each policy's choices; a shadow that raises never breaks
routing; the gateway exports it all, and wraps every role but the encoders'.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_policies import Sim, cands, ctx_of, fleet, toks

from lmgw.config import ConfigError, GatewayConfig, RoutingConfig, config_from_mapping
from lmgw.routing.policy import Policy, RouteContext
from lmgw.routing.registry import make_policy
from lmgw.routing.shadow import Shadowed, ShadowMetrics, load_skew


def chats(rng: random.Random, users: int, turns: int) -> list[list[int]]:
    """Multi-turn conversations, interleaved: each turn's prompt extends the user's last."""
    history = {u: toks(rng, 200) for u in range(users)}
    out = []
    for _ in range(turns):
        for u in range(users):
            history[u] = history[u] + toks(rng, 40)
            out.append(list(history[u]))
    return out


def value(metric: Any, labels: tuple[str, ...]) -> float:
    return metric.values.get(labels, 0.0)


def test_the_active_policy_routes_as_alone_and_the_shadow_learns_its_own_world() -> None:
    prompts = chats(random.Random(1), users=6, turns=5)
    reg_a, _ = fleet(4)
    alone = Sim(make_policy("round_robin"), reg_a)
    plain = [alone.start(ctx_of(p, rid=f"r{i}")).id for i, p in enumerate(prompts)]

    reg_b, _ = fleet(4)
    m = ShadowMetrics()
    cache = make_policy("cache_aware")
    shadowed = Shadowed("pd", make_policy("round_robin"), [cache], m)
    sim = Sim(shadowed, reg_b)
    got = [sim.start(ctx_of(p, rid=f"r{i}")).id for i, p in enumerate(prompts)]
    assert got == plain  # the shadow changed nothing
    while sim.live:
        sim.finish(0)

    n = float(sum(len(p) for p in prompts))
    assert value(m.prompt, ("pd", "round_robin")) == value(m.prompt, ("pd", "cache_aware")) == n
    assert value(m.predicted, ("pd", "round_robin")) == 0  # round_robin predicts nothing
    # cache_aware in its own world: each user's later turns hit the worker it picked earlier
    predicted = value(m.predicted, ("pd", "cache_aware"))
    assert predicted > 0.5 * n
    agreed = value(m.decisions, ("pd", "cache_aware", "true"))
    disagreed = value(m.decisions, ("pd", "cache_aware", "false"))
    assert agreed + disagreed == len(prompts) and disagreed > 0
    # its index holds its own placements: users stick to one worker each
    by_user: dict[int, set[str]] = {}
    for i, worker_id in enumerate(shadowed.windows["cache_aware"]):
        by_user.setdefault(i % 6, set()).add(worker_id)
    assert sum(len(ws) == 1 for ws in by_user.values()) >= 4
    # round_robin is perfectly even over 30 choices on 4 workers: 8/7.5
    skews = dict(((role, name), v) for (role, name), v in m.skew.collect())
    assert skews[("pd", "round_robin")] == pytest.approx(8 / 7.5)
    assert skews[("pd", "cache_aware")] >= 1.0
    assert shadowed.name == "round_robin" and shadowed.needs_tokens  # the shadow needs tokens
    assert not shadowed.active.needs_tokens  # ... and the active policy is left as it was


def test_a_shadow_that_fails_never_breaks_routing(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Policy):
        name = "broken"

        def choose(self, candidates: Any, ctx: RouteContext) -> Any:
            raise RuntimeError("bug")

    reg, _ = fleet(3)
    m = ShadowMetrics()
    shadowed = Shadowed("pd", make_policy("round_robin"), [Broken()], m)
    sim = Sim(shadowed, reg)
    for i in range(5):
        sim.start(ctx_of(None, rid=f"r{i}"))
    while sim.live:
        sim.finish(0)
    assert sum(sim.sent.values()) == 5
    assert m.decisions.values == {}
    assert sum("shadow policy broken failed" in r.message for r in caplog.records) == 1


def test_load_skew() -> None:
    assert load_skew([]) is None
    assert load_skew(["a", "b", "a", "b"]) == 1.0
    assert load_skew(["a", "a", "a", "b"]) == 1.5
    assert load_skew(["a", "b", "a", "b"], workers=4) == 2.0  # two workers never chosen


def test_the_gateway_wraps_every_role_but_the_encoders_and_exports_the_metrics() -> None:
    from lmgw.gateway import Gateway

    cfg = config_from_mapping(
        {"routing": {"policy": "cache_aware", "shadow_policies": ["round_robin", "cache_aware"]}}
    )
    gw = Gateway(cfg)
    for role in ("pd", "p", "d"):
        p = gw.policies[role]
        assert isinstance(p, Shadowed) and [s.name for s in p.shadows] == ["round_robin"]
        assert p.statistics() == p.active.statistics()  # the active policy's own API
    assert not isinstance(gw.policies["e"], Shadowed)
    # an attribute of the active policy is set on it (a replica's hint sink)
    pd = gw.policies["pd"]
    assert hasattr(pd, "hint_sink")
    pd.hint_sink = print  # type: ignore[attr-defined]
    assert pd.active.hint_sink is print  # type: ignore[attr-defined]
    text = gw.metrics.render().decode()
    for name in ("lmgw_shadow_decisions_total", "lmgw_shadow_load_skew"):
        assert f"# TYPE {name}" in text
    assert not isinstance(Gateway(GatewayConfig()).policies["pd"], Shadowed)  # off by default
    with pytest.raises(ConfigError, match="named twice"):
        RoutingConfig(shadow_policies=["random", "random"])


def test_retries_ask_the_shadows_again_and_hooks_follow_the_last_choice() -> None:
    reg, ws = fleet(3)
    m = ShadowMetrics()

    class Recorder(Policy):
        name = "recorder"

        def __init__(self) -> None:
            self.events: list[tuple[str, str]] = []

        def choose(self, candidates: Any, ctx: RouteContext) -> Any:
            return candidates[-1]

        def on_dispatch(self, worker: Any, ctx: RouteContext) -> None:
            self.events.append(("dispatch", worker.id))

        def on_finish(self, worker: Any, ctx: RouteContext, ok: bool) -> None:
            self.events.append(("finish", worker.id))

    rec = Recorder()
    shadowed = Shadowed("pd", make_policy("round_robin"), [rec], m)
    ctx = ctx_of(None)
    shadowed.choose(cands(reg), ctx)
    shadowed.choose([w for w in cands(reg) if w is not ws[2]], ctx)  # a retry elsewhere
    shadowed.on_dispatch(ws[0], ctx)
    shadowed.on_finish(ws[0], ctx, True)
    assert rec.events == [("dispatch", "w1"), ("finish", "w1")]
