"""Model routes, sans-IO: the split's shares, session stickiness, the order of fallbacks, and
the rules a route's definition must follow (config file and admin API alike)."""

from __future__ import annotations

import itertools
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.config import ConfigError, GatewayConfig, config_from_mapping
from lmgw.model_routes import ModelRoute, ModelRoutes, Target

weights = st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=6).filter(
    lambda ws: sum(ws) > 0
)


def _route(ws: list[float], split: str = "request", fallbacks: tuple[str, ...] = ()) -> ModelRoute:
    return ModelRoute("r", [Target(f"m{i}", w) for i, w in enumerate(ws)], fallbacks, split)


@given(weights, st.integers(min_value=1, max_value=3))
def test_round_robin_gives_each_target_exactly_its_weight_per_cycle(
    ws: list[int], cycles: int
) -> None:
    route = _route([float(w) for w in ws])
    total = sum(ws)
    for _ in range(cycles):
        got = Counter(route.choose() for _ in range(total))
        assert got == Counter({f"m{i}": w for i, w in enumerate(ws) if w})
    assert route.given == {f"m{i}": w * cycles for i, w in enumerate(ws)}


def test_round_robin_spreads_a_small_share_evenly() -> None:
    """A canary at 1 of 4 is every fourth request, not four in a row."""
    route = _route([3.0, 1.0])
    picks = [route.choose() for _ in range(12)]
    gaps = [i for i, m in enumerate(picks) if m == "m1"]
    assert [b - a for a, b in itertools.pairwise(gaps)] == [4, 4]


@given(weights, st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30))
def test_a_session_always_gets_the_same_target_and_never_a_weightless_one(
    ws: list[int], keys: list[str]
) -> None:
    route = _route([float(w) for w in ws], split="session")
    again = _route([float(w) for w in ws], split="session")  # another replica, same answer
    for key in keys:
        first = route.choose(key)
        assert route.choose(key) == first == again.choose(key)
        assert ws[int(first[1:])] > 0


@settings(max_examples=50)
@given(
    st.integers(min_value=1, max_value=99),
    st.integers(min_value=1, max_value=99),
    st.lists(st.text(min_size=1, max_size=8), min_size=20, max_size=60, unique=True),
)
def test_moving_weight_to_the_canary_moves_only_sessions_toward_it(
    before: int, after: int, keys: list[str]
) -> None:
    """Growing a canary's share from before% to after% moves users from the stable model to
    the canary only (and shrinking it, only back): nobody flips the other way."""
    old = _route([100.0 - before, float(before)], split="session")
    new = _route([100.0 - after, float(after)], split="session")
    for key in keys:
        a, b = old.choose(key), new.choose(key)
        if after >= before:
            assert not (a == "m1" and b == "m0")
        else:
            assert not (a == "m0" and b == "m1")


def test_sessionless_requests_of_a_session_route_use_the_round_robin() -> None:
    route = _route([1.0, 1.0], split="session")
    assert Counter(route.choose(None) for _ in range(4)) == {"m0": 2, "m1": 2}


def test_the_order_is_the_choice_then_the_other_fallbacks() -> None:
    route = _route([1.0, 1.0], fallbacks=("m1", "other"))
    assert route.order() == ("m0", "m1", "other")
    assert route.order() == ("m1", "other")  # the choice is not tried twice


def test_counters_outlive_a_route_replaced() -> None:
    routes = ModelRoutes([_route([1.0])])
    r = routes.get("r")
    assert r is not None
    routes.order(r)
    routes.fell_back(r, "m0", "x")
    assert routes.set(_route([1.0, 1.0])) is True
    new = routes.get("r")
    assert new is not None and new.given == {"m0": 0, "m1": 0}
    routes.choose(new)
    assert routes.chosen == {("r", "m0"): 2}
    assert routes.fallen == {("r", "m0", "x"): 1}
    assert routes.remove("r") and not routes.remove("r") and not routes


@pytest.mark.parametrize(
    ("targets", "fallbacks", "split", "words"),
    [
        ([], (), "request", "at least one target"),
        ([Target("a", 0.0)], (), "request", "weight above 0"),
        ([Target("a", float("nan"))], (), "request", "between 0 and 1e9"),
        ([Target("a", 1.0), Target("a", 2.0)], (), "request", "listed twice"),
        ([Target(" a", 1.0)], (), "request", "whitespace"),
        ([Target("a", 1.0)], ("b", "b"), "request", "fallback is listed twice"),
        ([Target("a", 1.0)], (), "sticky", "split must be"),
    ],
)
def test_bad_definitions_say_what_is_wrong(
    targets: list[Target], fallbacks: tuple[str, ...], split: str, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        ModelRoute("r", targets, fallbacks, split)


def _config(routes: list[dict]) -> GatewayConfig:
    return config_from_mapping({"model_routes": routes})


def test_the_config_file_takes_routes_and_names_the_bad_key() -> None:
    cfg = _config(
        [{"model": "chat", "targets": [{"model": "a", "weight": 9}, {"model": "b"}],
          "fallbacks": ["c"], "split": "session"}]
    )  # fmt: skip
    route = cfg.model_routes[0]
    assert [(t.model, t.weight) for t in route.targets] == [("a", 9.0), ("b", 1.0)]
    with pytest.raises(ConfigError) as e:
        _config([{"model": "x", "targets": [{"model": "a"}]}, {"model": "x", "targets": []}])
    assert "model_routes[1]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _config([{"model": "x", "targets": [{"model": "y"}]}, {"model": "y", "targets": [
            {"model": "a"}]}])  # fmt: skip
    assert "model_routes[0].targets[0].model" in str(e.value) and "is a model route" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _config([{"model": "x", "targets": [{"model": "a", "weight": 1}], "weights": 2}])
    assert "weights" in str(e.value)
    # a route may wrap the model of its own name
    assert _config([{"model": "a", "targets": [{"model": "a"}], "fallbacks": ["a2"]}])
    assert msgspec.structs.asdict(cfg.model_routes[0])["split"] == "session"


@given(st.integers(min_value=1, max_value=20), st.integers(min_value=1, max_value=20))
def test_a_mirror_gets_exactly_its_share_evenly(num: int, den: int) -> None:
    share = min(num, den) / den
    route = ModelRoute("r", [Target("a", 1.0)], mirror="m", mirror_share=share)
    due = [route.mirror_due() for _ in range(3 * den)]
    assert sum(due) == 3 * min(num, den) == route.mirrored
    # evenly: every window of den requests holds the share, never a burst of copies
    for i in range(len(due) - den + 1):
        assert sum(due[i : i + den]) in (min(num, den), min(num, den) - 1, min(num, den) + 1)
    assert not _route([1.0]).mirror_due()  # no mirror: never


def test_mirror_rules() -> None:
    with pytest.raises(ValueError, match="mirror_share"):
        ModelRoute("r", [Target("a", 1.0)], mirror="m", mirror_share=0.0)
    with pytest.raises(ValueError, match="mirror must not be empty"):
        ModelRoute("r", [Target("a", 1.0)], mirror="")
    routes = ModelRoutes([_route([1.0])])
    with pytest.raises(ValueError, match="is a model route"):
        routes.set(ModelRoute("s", [Target("a", 1.0)], mirror="r"))
    with pytest.raises(ConfigError) as e:
        _config([{"model": "x", "targets": [{"model": "a"}], "mirror": "y"},
                 {"model": "y", "targets": [{"model": "b"}]}])  # fmt: skip
    assert "model_routes[0].mirror" in str(e.value)
