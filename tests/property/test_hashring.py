"""Consistent-hash ring: the Cython extension against its pure-Python twin, and its promises.

The twin is the obviously-correct model (bisect over Python lists), so most checks are "both give
the same answer"; the rest pin what routing relies on: XXH64 matches the reference vectors, keys
spread evenly with the default vnodes, and membership changes move only the keys they must.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lmgw._fast import hashring_py as twin

try:
    from lmgw._fast import hashring as fast
except ImportError:  # not built: the comparisons skip, the twin is still checked
    fast = None

needs_fast = pytest.mark.skipif(
    fast is None, reason="extension not built (python setup.py build_ext --inplace)"
)
IMPLS = [pytest.param(twin, id="python")] + ([pytest.param(fast, id="cython")] if fast else [])
# The spread/remap properties are about the ring, not the language: check the fast one if present.
RING = fast or twin

KEYS = st.binary(max_size=80) | st.text(max_size=40)

# Reference values from the xxHash library (XXH64, seed 0); the longer inputs cover the 32-byte
# stripe loop and every tail length class (8-byte lanes, a 4-byte word, single bytes).
VECTORS: list[tuple[bytes | str, int]] = [
    (b"", 0xEF46DB3751D8E999),
    (b"a", 0xD24EC4F1A98C6E5B),
    (b"abc", 0x44BC2CF5AD770999),
    (b"abcdefghijklmnopqrstuvwxyz0123456789", 0x64F23ECF1609B766),
    (b"The quick brown fox jumps over the lazy dog", 0x0B242D361FDA71BC),
    (bytes(range(100)), 0x6AC1E58032166597),
    (b"x" * 1000, 0x4CB9A3B69CB700E1),
    (bytes(range(256)) * 3 + b"tail", 0x2A74DE530BDF2A9F),
    ("héllo wörld ✓", 0x34D9919C86F55AC4),  # str is hashed as UTF-8
]


def node_names(n: int, base: int = 8000) -> list[str]:
    return [f"http://127.0.0.1:{base + i}" for i in range(n)]


def build(impl, names: list[str], vnodes: int | None = None):
    ring = impl.HashRing() if vnodes is None else impl.HashRing(vnodes)
    for name in names:
        ring.add(name)
    return ring


# --- XXH64 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_xxh64_vectors(impl, data: bytes | str, expected: int) -> None:
    assert impl.hash64(data) == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_hash64_rejects_other_types(impl) -> None:
    for bad in (None, 1, bytearray(b"a"), ["a"]):
        with pytest.raises(TypeError):
            impl.hash64(bad)


@needs_fast
@given(st.binary(max_size=300))
def test_hash64_bytes_matches_twin(data: bytes) -> None:
    assert fast.hash64(data) == twin.hash64(data)


@needs_fast
@given(st.text(max_size=100))
def test_hash64_str_matches_twin_and_utf8(text: str) -> None:
    assert fast.hash64(text) == twin.hash64(text) == fast.hash64(text.encode("utf-8"))


# --- API edges -----------------------------------------------------------------------------------


@needs_fast
def test_default_vnodes_agree() -> None:
    assert fast.DEFAULT_VNODES == twin.DEFAULT_VNODES


@pytest.mark.parametrize("impl", IMPLS)
def test_api_edges(impl) -> None:
    ring = impl.HashRing(8)
    assert ring.lookup("k") is None
    assert ring.candidates(b"k", 3) == []
    assert len(ring) == 0
    assert repr(ring) == "HashRing(nodes=0, vnodes=8)"
    ring.add("b")
    ring.add("a")
    ring.add("a")  # idempotent
    ring.remove("zzz")  # absent: no error
    assert list(ring.nodes) == ["a", "b"]
    assert len(ring) == 2
    assert "a" in ring
    assert "c" not in ring
    assert repr(ring) == "HashRing(nodes=2, vnodes=8)"
    assert ring.candidates("k", 0) == []
    assert ring.candidates("k", -1) == []
    assert sorted(ring.candidates("k", 99)) == ["a", "b"]
    with pytest.raises(TypeError):
        ring.lookup(1)
    with pytest.raises(TypeError):
        ring.add(b"a")
    with pytest.raises(ValueError):
        impl.HashRing(0)
    ring.remove("a")
    ring.remove("b")
    assert ring.lookup("k") is None
    assert ring.nodes == ()


@pytest.mark.parametrize("impl", IMPLS)
def test_vnode_label_maps_to_its_own_node(impl) -> None:
    """A key that hashes exactly onto a point belongs to that point (first point >= hash)."""
    names = node_names(5)
    ring = build(impl, names, vnodes=32)
    for name in names:
        for i in range(32):
            assert ring.lookup(f"{name}#{i}") == name


# --- Stateful: Cython and twin side by side ----------------------------------------------------

# Awkward names on purpose: empty, non-ASCII, one containing the '#' vnode separator.
NAMES = [*node_names(6), "", "é", "a#1", "a"]
_rng = random.Random(0)
PROBES: list[bytes | str] = [_rng.randbytes(12) for _ in range(48)] + [
    f"{name}#{i}" for name in NAMES for i in range(2)
]


class RingMachine(RuleBasedStateMachine):
    """Every rule acts on both rings and a set model; the rings must agree after every step."""

    @initialize(vnodes=st.sampled_from([1, 2, 3, 16, 64]))
    def start(self, vnodes: int) -> None:
        self.fast = fast.HashRing(vnodes)
        self.twin = twin.HashRing(vnodes)
        self.model: set[str] = set()

    def owners(self) -> list[str | None]:
        out = [self.fast.lookup(k) for k in PROBES]
        assert out == [self.twin.lookup(k) for k in PROBES]
        return out

    @rule(node=st.sampled_from(NAMES))
    def add(self, node: str) -> None:
        before = self.owners()
        self.fast.add(node)
        self.twin.add(node)
        self.model.add(node)
        after = self.owners()
        moved = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
        note(f"add {node!r}: {len(moved)} probes moved")
        assert all(a == node for _, a in moved), "a key moved onto a node that was not added"

    @rule(node=st.sampled_from(NAMES))
    def remove(self, node: str) -> None:
        before = self.owners()
        self.fast.remove(node)
        self.twin.remove(node)
        self.model.discard(node)
        after = self.owners()
        moved = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
        note(f"remove {node!r}: {len(moved)} probes moved")
        assert all(b == node for b, _ in moved), "a key moved off a node that stayed"
        assert node not in after

    @rule(key=KEYS)
    def lookup(self, key: bytes | str) -> None:
        got = self.fast.lookup(key)
        assert got == self.twin.lookup(key)
        assert got in self.model if self.model else got is None

    @rule(key=KEYS, n=st.integers(-1, 12))
    def candidates(self, key: bytes | str, n: int) -> None:
        got = self.fast.candidates(key, n)
        assert got == self.twin.candidates(key, n)
        assert len(got) == max(0, min(n, len(self.model)))
        assert len(set(got)) == len(got)
        assert set(got) <= self.model
        if got:
            assert got[0] == self.fast.lookup(key)

    @invariant()
    def agree(self) -> None:
        if not hasattr(self, "fast"):
            return
        assert list(self.fast.nodes) == list(self.twin.nodes) == sorted(self.model)
        assert len(self.fast) == len(self.twin) == len(self.model)
        assert repr(self.fast) == repr(self.twin)
        for name in NAMES:
            assert (name in self.fast) == (name in self.twin) == (name in self.model)


TestRingMachine = needs_fast(RingMachine.TestCase)
TestRingMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- Distribution ------------------------------------------------------------------------------

SPREAD_KEYS = [f"session-{i}" for i in range(100_000)]


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_spread_within_ten_percent(n: int) -> None:
    ring = build(RING, node_names(n))
    counts = dict.fromkeys(ring.nodes, 0)
    for key in SPREAD_KEYS:
        counts[ring.lookup(key)] += 1
    shares = {name: c * n / len(SPREAD_KEYS) for name, c in counts.items()}
    worst = max(abs(s - 1) for s in shares.values())
    assert worst <= 0.10, f"worst node is {worst:.1%} off its fair share: {shares}"


_remap_rng = random.Random(1)
REMAP_KEYS = [_remap_rng.randbytes(16) for _ in range(20_000)]


def _moved(lookup_before: Callable, lookup_after: Callable) -> list[tuple[str, str]]:
    pairs = [(lookup_before(k), lookup_after(k)) for k in REMAP_KEYS]
    return [(b, a) for b, a in pairs if a != b]


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_adding_a_node_remaps_about_its_share(n: int) -> None:
    names = node_names(n + 1)
    before, after = build(RING, names[:n]), build(RING, names)
    moved = _moved(before.lookup, after.lookup)
    assert all(a == names[n] for _, a in moved)
    fraction = len(moved) / len(REMAP_KEYS)
    assert 0.5 / (n + 1) <= fraction <= 1.5 / (n + 1), fraction


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_removing_a_node_remaps_about_its_share(n: int) -> None:
    names = node_names(n)
    gone = names[n // 2]
    before = build(RING, names)
    after = build(RING, names)
    after.remove(gone)
    moved = _moved(before.lookup, after.lookup)
    assert all(b == gone for b, _ in moved)
    fraction = len(moved) / len(REMAP_KEYS)
    assert 0.5 / n <= fraction <= 1.5 / n, fraction


# --- Facade ------------------------------------------------------------------------------------


def test_facade_uses_extension_when_built() -> None:
    from lmgw.routing import hashring

    if importlib.util.find_spec("lmgw._fast.hashring") is None:
        pytest.skip("extension not built")
    assert hashring.IMPLEMENTATION == "cython"
    assert hashring.HashRing is fast.HashRing
    assert hashring.hash64 is fast.hash64


def test_facade_falls_back_to_twin(monkeypatch, caplog) -> None:
    """Load a private copy of the facade with the extension hidden; the real one is untouched."""
    import lmgw.routing.hashring as facade

    monkeypatch.setitem(sys.modules, "lmgw._fast.hashring", None)  # makes the import fail
    spec = importlib.util.spec_from_file_location("_hashring_fallback", Path(facade.__file__))
    module = importlib.util.module_from_spec(spec)
    with caplog.at_level(logging.WARNING):
        spec.loader.exec_module(module)
    assert module.IMPLEMENTATION == "python"
    assert module.HashRing is twin.HashRing
    assert "not built" in caplog.text
