"""Joint P/D placement (lmgw.routing.placement), sans-IO: the pair cost, the decode load bound,
the prefill queue and the learned speed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.routing.placement import Placement, zoned
from lmgw.routing.policy import RouteContext
from lmgw.workers.worker import Worker

GB = 1e9


def worker(wid: str, role: str, zone: str | None, in_flight: int = 0) -> Worker:
    w = Worker(wid, f"http://{wid}:1", role)
    w.zone = zone
    w.in_flight = in_flight
    return w


def placement(**kw) -> Placement:
    args = dict(same_zone_gbps=100.0, cross_zone_gbps=10.0, prefill_tokens_per_s=10_000.0,
                bounded_load_factor=1.25, kv_bytes_per_token=lambda model: 100_000)  # fmt: skip
    return Placement(**{**args, **kw})


def test_a_pair_stays_in_its_zone_when_prefill_costs_are_equal() -> None:
    pa, pb = worker("pa", "p", "a"), worker("pb", "p", "b")
    da, db = worker("da", "d", "a"), worker("db", "d", "b")
    pl = placement()
    for preferred in (pa, pb):
        pair = pl.choose("m", [pa, pb], [da, db], 4000, {}, preferred)
        assert pair.prefill is preferred  # the prefill policy's choice wins the tie
        assert pair.decode.zone == pair.prefill.zone
        assert pair.transfer_s == 4000 * 100_000 / (100 * GB)
    assert pl.pairs == {"same": 2, "cross": 0}


def test_a_cache_hit_worth_more_than_the_transfer_wins_and_brings_its_zone() -> None:
    pa, pb = worker("pa", "p", "a"), worker("pb", "p", "b")
    da, db = worker("da", "d", "a"), worker("db", "d", "b")
    pl = placement()
    hits = {"pb": 3000}  # 0.3 s of prefill saved on pb
    pair = pl.choose("m", [pa, pb], [da, db], 4000, hits, pa)
    assert (pair.prefill, pair.decode) == (pb, db)
    # a small hit is not worth a cross-zone move, nor a queue: the pair is the other zone's
    hits = {"pb": 3000}
    pl.queued["pb"] = 8000
    pair = pl.choose("m", [pa, pb], [da, db], 4000, hits, pb)
    assert (pair.prefill, pair.decode) == (pa, da)


def test_the_kv_transfer_decides_when_only_one_zone_has_a_free_decoder() -> None:
    pa = worker("pa", "p", "a")
    da, db = worker("da", "d", "a", in_flight=9), worker("db", "d", "b", in_flight=0)
    pl = placement()
    pair = pl.choose("m", [pa], [da, db], 2000, {}, pa)
    # da is above 1.25x the mean decode load: the pair pays the cross-zone transfer
    assert pair.decode is db and pair.transfer_s == 2000 * 100_000 / (10 * GB)


def test_equal_decoders_of_a_zone_share_the_pairs() -> None:
    pa = worker("pa", "p", "a")
    ds = [worker(f"d{i}", "d", "a") for i in range(3)]
    pl = placement()
    chosen = {pl.choose("m", [pa], ds, 100, {}, pa).decode.id for _ in range(6)}
    assert chosen == {"d0", "d1", "d2"}


def test_zoned_means_more_than_one_zone() -> None:
    assert not zoned([worker("p", "p", None)], [worker("d", "d", None)])
    assert not zoned([worker("p", "p", "a")], [worker("d", "d", "a")])
    assert zoned([worker("p", "p", "a")], [worker("d", "d", None)])


def test_the_prefill_speed_is_learned_from_timed_legs() -> None:
    pa, da = worker("pa", "p", "a"), worker("da", "d", "b")
    pl = placement()
    for _ in range(60):
        ctx = RouteContext("m")
        pair = pl.choose("m", [pa], [da], 5000, {}, pa)
        pl.dispatched(ctx, pair, 5000, 0)
        pl.prefill_done(ctx, "m", 0.1, ok=True)  # 50k tokens/s
    assert 45_000 < pl.speed["m"] < 50_000
    ctx = RouteContext("m")
    pl.dispatched(ctx, pair, 50, 0)
    pl.prefill_done(ctx, "m", 10.0, ok=True)  # too small a leg to time
    pl.prefill_done(ctx, "m", 10.0, ok=True)  # a second report of one leg is ignored
    assert pl.speed["m"] > 45_000 and pl.queued == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 9000)),
                max_size=40))  # fmt: skip
def test_queued_tokens_return_to_zero_after_any_mix_of_endings(ops) -> None:
    """Each request: dispatched; then its prefill ends (ok or not) and/or the request ends,
    in any order, any number of times: the queue holds exactly the unfinished prefills."""
    ps = [worker(f"p{i}", "p", "a" if i else "b") for i in range(3)]
    ds = [worker("d", "d", "a")]
    pl = placement()
    live: list[RouteContext] = []
    for who, how, tokens in ops:
        ctx = RouteContext("m")
        pair = pl.choose("m", ps, ds, tokens, {}, ps[who])
        pl.dispatched(ctx, pair, tokens, 0)
        live.append(ctx)
        if how == 1:
            pl.prefill_done(ctx, "m", 0.5, ok=True)
        elif how == 2:
            pl.prefill_done(ctx, "m", 0.5, ok=False)
            pl.release(ctx)
        assert all(v > 0 for v in pl.queued.values())
    for ctx in live:
        pl.release(ctx)
        pl.release(ctx)
    assert pl.queued == {}


def test_a_continuations_prefill_is_picked_near_its_decode_worker() -> None:
    """A broken P/D stream continues on another decode worker, chosen first: its prefill is
    picked among the prefill workers of that worker's zone (the policy decides among them)."""
    from lmgw.config import GatewayConfig, RoutingConfig, WorkerConfig
    from lmgw.gateway import Gateway
    from lmgw.workers.worker import WorkerState

    fleet = [("p", "a"), ("p", "b"), ("d", "a"), ("d", "b")]
    workers = [
        WorkerConfig(url=f"http://10.0.0.{i}:8000", role=role, id=f"{role}{i}", zone=zone)
        for i, (role, zone) in enumerate(fleet)
    ]
    for placement in ("joint", "independent"):
        gw = Gateway(GatewayConfig(routing=RoutingConfig(placement=placement), workers=workers))
        for w in list(gw.registry):
            gw.registry.set_state(w, WorkerState.HEALTHY, "test")
        db = gw.registry.get("d3")
        picked = {gw.pipeline.pick("m", "p", RouteContext("m"), near=db).id for _ in range(8)}
        assert picked == ({"p1"} if placement == "joint" else {"p0", "p1"})


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 6), st.integers(0, 5000)),
             min_size=1, max_size=6),
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 6)), min_size=1, max_size=6),
    st.integers(1, 6000),
    st.sampled_from([(100.0, 10.0), (100.0, 100.0), (10.0, 100.0)]),
)  # fmt: skip
def test_the_chosen_pair_costs_what_the_cheapest_of_all_pairs_costs(ps, ds, tokens, gbps) -> None:
    """Against brute force over every (prefill, eligible decode) pair: the O(P + zones) search
    finds a pair of the least cost, and its decode worker is an eligible one."""
    prefills = [worker(f"p{i}", "p", z, n) for i, (z, n, _) in enumerate(ps)]
    decodes = [worker(f"d{i}", "d", z, n) for i, (z, n) in enumerate(ds)]
    hits = {f"p{i}": h for i, (_, _, h) in enumerate(ps)}
    pl = placement(same_zone_gbps=gbps[0], cross_zone_gbps=gbps[1])
    pair = pl.choose("m", prefills, decodes, tokens, hits, prefills[0])
    total = sum(d.in_flight for d in decodes)
    bound = -(-1.25 * (total + 1) // len(decodes))
    eligible = [d for d in decodes if d.in_flight < bound] or decodes
    assert pair.decode in eligible

    def cost(p: Worker, d: Worker) -> float:
        transfer = tokens * 100_000 / ((gbps[0] if p.zone == d.zone else gbps[1]) * GB)
        return max(0, tokens - hits[p.id]) / 10_000.0 + transfer

    best = min(cost(p, d) for p in prefills for d in eligible)
    assert abs(cost(pair.prefill, pair.decode) - best) < 1e-9


def test_cache_aware_predicts_every_worker_at_once_as_one_by_one() -> None:
    """``predicted_cached_by_worker`` (one call, the matched workers only) agrees with
    ``predicted_cached_tokens`` asked of each worker, also after a worker left."""
    from lmgw.config import RoutingConfig
    from lmgw.routing.lora_affinity import LoraAffine
    from lmgw.routing.registry import make_policy
    from lmgw.routing.shadow import Shadowed, ShadowMetrics

    policy = make_policy("cache_aware", RoutingConfig())
    ws = [worker(f"p{i}", "p", None) for i in range(5)]
    shared = list(range(1000, 1600))
    for i, w in enumerate(ws[:3]):  # three workers hold growing prefixes of one prompt
        ctx = RouteContext("m", f"warm{i}", tokens=shared[: 200 * (i + 1)])
        policy.choose(ws, ctx)
        policy.on_dispatch(w, ctx)
        policy.on_finish(w, ctx, True)
    policy.on_worker_removed(ws[0])
    for candidates in (ws[1:], ws[2:]):
        ctx = RouteContext("m", "q", tokens=[*shared, 7, 8, 9])
        policy.choose(candidates, ctx)
        at_once = policy.predicted_cached_by_worker(candidates, ctx)
        one_by_one = {w.id: policy.predicted_cached_tokens(w, ctx) or 0 for w in candidates}
        assert {k: v for k, v in one_by_one.items() if v} == at_once
        assert at_once  # the prefix holders are predicted
        # the wrappers (LoRA affinity, shadow policies) answer with the policy they wrap
        shadowed = Shadowed("p", policy, [make_policy("round_robin", RoutingConfig())],
                            ShadowMetrics())  # fmt: skip
        for wrapper in (LoraAffine(policy), shadowed):
            assert wrapper.predicted_cached_by_worker(candidates, ctx) == at_once
    # a policy that predicts nothing: an empty map, from the default hook
    rr = make_policy("round_robin", RoutingConfig())
    ctx = RouteContext("m", "r", tokens=shared)
    rr.choose(ws[1:], ctx)
    assert rr.predicted_cached_by_worker(ws[1:], ctx) == {}
