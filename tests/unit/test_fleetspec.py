"""Tests for lmgw.fleetspec: the `lmgw simulate --workers 3e2p4d` grammar."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmgw.config import ConfigError, infer_flow
from lmgw.fleetspec import FLEET_ORDER, IMPLEMENTED_ROLES, FleetSpec, parse_fleet_spec


@pytest.mark.parametrize(
    ("text", "counts", "flow", "canonical"),
    [
        ("4pd", {"pd": 4}, "pd", "4pd"),
        ("1pd", {"pd": 1}, "pd", "1pd"),
        ("3e2p4d", {"e": 3, "p": 2, "d": 4}, "e+p+d", "3e2p4d"),
        ("2pd4d", {"pd": 2, "d": 4}, "p/d", "2pd4d"),  # greedy: "pd" before "p"
        ("1e2pd", {"e": 1, "pd": 2}, "e+pd", "1e2pd"),
        ("2p4d", {"p": 2, "d": 4}, "p/d", "2p4d"),
        ("4d2p", {"p": 2, "d": 4}, "p/d", "2p4d"),  # any order in, canonical order out
        ("4d2pd", {"pd": 2, "d": 4}, "p/d", "2pd4d"),
        (" 2P4D ", {"p": 2, "d": 4}, "p/d", "2p4d"),  # case and outer whitespace ignored
        ("12pd", {"pd": 12}, "pd", "12pd"),
        ("007pd", {"pd": 7}, "pd", "7pd"),
        ("1e1pd1p1d", {"e": 1, "pd": 1, "p": 1, "d": 1}, "e+p+d", "1e1pd1p1d"),
    ],
)
def test_valid_specs(text: str, counts: dict[str, int], flow: str, canonical: str) -> None:
    spec = parse_fleet_spec(text)
    assert spec == FleetSpec(**counts)
    assert spec.counts() == {r: counts[r] for r in FLEET_ORDER if r in counts}
    assert spec.total == sum(counts.values())
    assert spec.flow == flow
    assert str(spec) == canonical
    assert parse_fleet_spec(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("3x", 2, "unknown role 'x'"),
        ("2pd3q", 5, "unknown role 'q'"),
        ("pd", 1, "expected a count before the role 'p'"),
        ("2pdd", 4, "expected a count before the role 'd'"),
        ("4", 2, "expected a role after the count 4"),
        ("2pd4", 5, "expected a role after the count 4"),
        ("0pd", 1, "zero merged workers"),
        ("2p00d", 3, "zero decode workers"),
        ("2p3p", 4, "role 'p' (prefill) is given twice"),
        ("2pd1p3pd", 7, "role 'pd' (merged) is given twice"),
        ("4pd!", 4, "unexpected '!'"),
        ("1e 2pd", 3, "unexpected ' '"),
        ("-1pd", 1, "unexpected '-'"),
        ("²pd", 1, "unexpected '²'"),
    ],
)
def test_invalid_specs_point_at_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet_spec(text)
    msg = str(info.value)
    assert f"at column {column}:" in msg and fragment in msg, msg
    # the caret line sits under the offending character
    lines = msg.splitlines()
    spec_line = next(i for i, line in enumerate(lines) if line.strip() == text.strip())
    caret = lines[spec_line + 1]
    assert caret.index("^") - lines[spec_line].index(text.strip()[0]) == column - 1, msg


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_spec(text: str) -> None:
    with pytest.raises(ConfigError, match="empty worker spec"):
        parse_fleet_spec(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("3e", "encode workers alone"),
        ("2p", "prefill workers need decode"),
        ("2d", "decode workers need prefill"),
        ("1e2d", "decode workers need prefill"),
    ],
)
def test_specs_that_form_no_flow(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet_spec(text)
    assert "forms no flow" in str(info.value) and fragment in str(info.value)


def test_direct_construction_is_checked() -> None:
    with pytest.raises(ConfigError):
        FleetSpec()
    with pytest.raises(ConfigError, match=">= 0"):
        FleetSpec(pd=-1)
    with pytest.raises(ConfigError, match="encode workers alone"):
        FleetSpec(e=2)


def test_unimplemented_roles() -> None:
    assert sorted(IMPLEMENTED_ROLES) == ["d", "e", "p", "pd"]
    for spec in ("4pd", "3e2p4d", "1e2pd", "4d2pd"):
        assert parse_fleet_spec(spec).unimplemented() == []


def test_frozen() -> None:
    spec = parse_fleet_spec("4pd")
    with pytest.raises(AttributeError):
        spec.pd = 3  # type: ignore[misc]
    assert hash(spec) == hash(FleetSpec(pd=4))


def _can_flow(counts: dict[str, int]) -> bool:
    try:
        infer_flow(counts)
    except ConfigError:
        return False
    return True


_counts = st.dictionaries(st.sampled_from(FLEET_ORDER), st.integers(1, 10_000), min_size=1).filter(
    _can_flow
)


@given(_counts)
def test_round_trip_of_canonical_specs(counts: dict[str, int]) -> None:
    text = "".join(f"{counts[r]}{r}" for r in FLEET_ORDER if r in counts)
    spec = parse_fleet_spec(text)
    assert str(spec) == text
    assert spec.counts() == {r: counts[r] for r in FLEET_ORDER if r in counts}
    assert spec.total == sum(counts.values())


@given(_counts, st.randoms(use_true_random=False), st.booleans())
def test_any_order_and_case_parse_to_the_same_spec(counts, rnd, upper) -> None:
    items = [f"{n}{r}" for r, n in counts.items()]
    rnd.shuffle(items)
    text = "".join(items)
    spec = parse_fleet_spec(text.upper() if upper else text)
    assert spec == FleetSpec(**counts)
    assert parse_fleet_spec(str(spec)) == spec


@given(st.text(alphabet="0123456789epdxPD !\u0130\u00b2", max_size=12))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        spec = parse_fleet_spec(text)
    except ConfigError as e:
        assert str(e).startswith("config error")
    else:
        assert parse_fleet_spec(str(spec)) == spec
        assert spec.total >= 1
