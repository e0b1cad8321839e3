"""vLLM's ``--max-loras`` bookkeeping of the simulator (:class:`LoraSlots`): a request joins an
active adapter, activates one into a free slot, evicts only the least recently used idle adapter,
and must wait while every active adapter has running requests."""

from __future__ import annotations

import pytest

from lmgw.simulators.lora import LoraSlots


def test_a_request_joins_an_active_adapter_without_loading() -> None:
    slots = LoraSlots(1)
    assert slots.needs_load("a")
    assert slots.try_acquire("a") == (True, None)
    assert not slots.needs_load("a")
    assert slots.try_acquire("a") == (True, None)
    assert slots.active() == {"a": 2}
    assert slots.running() == ["a"]


def test_a_free_slot_activates_a_new_adapter() -> None:
    slots = LoraSlots(2)
    assert slots.try_acquire("a") == (True, None)
    assert slots.try_acquire("b") == (True, None)
    assert slots.active() == {"a": 1, "b": 1}


def test_all_slots_busy_refuses_until_one_goes_idle() -> None:
    slots = LoraSlots(1)
    slots.try_acquire("a")
    slots.try_acquire("a")
    assert slots.try_acquire("b") == (False, None)
    assert not slots.release("a")  # one request of "a" still runs
    assert slots.try_acquire("b") == (False, None)
    assert slots.release("a")  # idle now
    assert slots.try_acquire("b") == (True, "a")
    assert slots.active() == {"b": 1}


def test_eviction_takes_the_least_recently_used_idle_adapter() -> None:
    slots = LoraSlots(3)
    for name in ("a", "b", "c"):
        slots.try_acquire(name)
    slots.try_acquire("a")  # "a" used last: b is now the least recently used
    for name in ("a", "a", "b", "c"):
        slots.release(name)
    assert slots.try_acquire("d") == (True, "b")
    assert list(slots.active()) == ["c", "a", "d"]


def test_a_busy_adapter_is_never_evicted() -> None:
    slots = LoraSlots(2)
    slots.try_acquire("a")  # least recently used, but busy
    slots.try_acquire("b")
    slots.release("b")
    assert slots.try_acquire("c") == (True, "b")
    assert slots.active() == {"a": 1, "c": 1}


def test_release_of_an_unknown_or_idle_adapter_is_harmless() -> None:
    slots = LoraSlots(1)
    assert not slots.release("x")
    slots.try_acquire("a")
    assert slots.release("a")
    assert not slots.release("a")
    assert slots.active() == {"a": 0}
    assert slots.running() == []


def test_waiting_adapters_are_counted_per_request() -> None:
    slots = LoraSlots(1)
    slots.wait("b")
    slots.wait("b")
    slots.wait("c")
    assert slots.waiting() == ["b", "c"]
    slots.unwait("b")
    assert slots.waiting() == ["b", "c"]
    slots.unwait("b")
    slots.unwait("c")
    assert slots.waiting() == []


def test_unlimited_never_waits_nor_evicts() -> None:
    slots = LoraSlots(None)
    for i in range(50):
        assert slots.try_acquire(f"a{i}") == (True, None)
    assert len(slots.active()) == 50


def test_clear_idle_keeps_busy_adapters() -> None:
    slots = LoraSlots(2)
    slots.try_acquire("a")
    slots.try_acquire("b")
    slots.release("b")
    slots.clear_idle()
    assert slots.active() == {"a": 1}


def test_max_loras_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LoraSlots(0)
