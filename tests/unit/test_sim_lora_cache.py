"""The simulator's prefix cache per LoRA adapter: an adapter's blocks chain from a root derived
from its name, so the base model and each adapter never share blocks (as vLLM hashes the adapter
into every block), the base model's hashes stay what they were, and an adapter's ``BlockStored``
events carry its ``lora_id`` and ``lora_name`` in vLLM's field order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from lmgw.simulators import kv_events, model_files
from lmgw.simulators.engine import (
    Completion,
    Engine,
    EngineConfig,
    LoraKey,
    PrefixCache,
    block_hashes,
    lora_root,
)
from lmgw.simulators.lora import LoraAdapters

BS = 16
PROMPT = list(range(1000, 1050))  # 50 tokens: 3 full blocks, (50 - 1) // 16 = 3 usable
SQL = LoraKey.of("sql", 1)
LAW = LoraKey.of("law", 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_files.ensure_model_dir(tmp_path_factory.mktemp("models"))


def base_hashes_as_before(ids: list[int]) -> list[int]:
    """The base model's scheme before adapters existed: chained from 0."""
    out, parent = [], 0
    for start in range(0, len(ids) - BS + 1, BS):
        parent = hash((parent, *ids[start : start + BS]))
        out.append(parent)
    return out


# -- roots and hashes -----------------------------------------------------------------------------


def test_lora_root_is_a_stable_nonzero_digest_of_the_name() -> None:
    assert lora_root("sql") == 4171032033051015956  # blake2b-64 of b"sql", little-endian signed
    assert lora_root("sql") != lora_root("law") and 0 not in (lora_root("sql"), lora_root("law"))
    code = "from lmgw.simulators.engine import lora_root; print(lora_root('law'))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "12345"},  # str hashes differ per process; the root must not
    )
    assert int(other.stdout) == lora_root("law")
    assert SQL.root == lora_root("sql") and SQL.lora_id == 1 and SQL.name == "sql"


def test_base_hashes_are_unchanged_and_adapters_chain_from_their_own_root() -> None:
    base = block_hashes(PROMPT, BS)
    assert base == block_hashes(PROMPT, BS, root=0) == base_hashes_as_before(PROMPT)
    sql = block_hashes(PROMPT, BS, root=SQL.root)
    law = block_hashes(PROMPT, BS, root=LAW.root)
    assert len(base) == len(sql) == len(law) == 3
    assert not set(base) & set(sql) and not set(base) & set(law) and not set(sql) & set(law)
    assert sql == block_hashes(PROMPT, BS, root=lora_root("sql"))  # the same adapter shares
    assert block_hashes(PROMPT, BS, sql[:1], SQL.root) == sql  # extending known hashes
    assert block_hashes(PROMPT[:10], BS, root=SQL.root) == []


def test_the_cache_keeps_base_and_adapters_apart() -> None:
    cache = PrefixCache(capacity_blocks=100, block_size=BS)
    cache.insert(PROMPT)  # the base model's blocks
    assert cache.lookup(PROMPT, block_hashes(PROMPT, BS, root=SQL.root)) == 0
    cache.insert(PROMPT, lora=SQL)  # hashes from the adapter's root when none are given
    assert cache.lookup(PROMPT, block_hashes(PROMPT, BS, root=SQL.root)) == 48
    assert cache.lookup(PROMPT, block_hashes(PROMPT, BS, root=LAW.root)) == 0
    assert cache.lookup(PROMPT) == 48 and len(cache) == 6


# -- tickets --------------------------------------------------------------------------------------


def run(engine: Engine, ids: list[int], lora: LoraKey | None, output: tuple[int, ...] = ()) -> int:
    """One request through a ticket; its cached prompt tokens."""
    ticket = engine.submit(len(ids), 1, lora)
    ticket.admit(len(output))
    ticket.prefill([ids])
    ticket.begin_decode()
    ticket.close([Completion(output, tuple("x" for _ in output), "", "length")])
    return ticket.cached_tokens


def test_tickets_hit_only_their_own_adapters_blocks(model_dir: Path) -> None:
    engine = Engine(EngineConfig(kv_blocks=100, block_size=BS, model_dir=str(model_dir)))
    assert run(engine, PROMPT, None) == 0
    assert run(engine, PROMPT, SQL) == 0  # base blocks do not serve the adapter
    assert run(engine, PROMPT, SQL) == 48
    assert run(engine, PROMPT, LoraKey.of("sql", 7)) == 48  # keyed by name, not by number
    assert run(engine, PROMPT, LAW) == 0
    assert run(engine, PROMPT, None) == 48
    assert (engine.cache.queries, engine.cache.hits) == (6 * 50, 3 * 48)


def test_output_blocks_of_a_short_prompt_chain_from_the_adapters_root(model_dir: Path) -> None:
    engine = Engine(EngineConfig(kv_blocks=100, block_size=BS, model_dir=str(model_dir)))
    prompt = list(range(2000, 2010))  # under one block: no prompt hashes to extend
    output = tuple(range(3000, 3010))
    run(engine, prompt, SQL, output)
    full = [*prompt, *output]
    assert engine.cache.block_hashes() == block_hashes(full, BS, root=SQL.root)
    assert engine.cache.lookup(full) == 0  # not the base model's block


# -- KV events ------------------------------------------------------------------------------------


def stored_events(lora: LoraKey | None) -> list[kv_events.BlockStored]:
    events: list[kv_events.BlockStored] = []
    cache = PrefixCache(capacity_blocks=100, block_size=BS, listener=events.append)
    cache.insert(PROMPT[:32], lora=lora)
    cache.insert(PROMPT, lora=lora)  # one new block, chained to the cached two
    return events


def test_adapter_events_carry_lora_id_and_name_where_vllm_puts_them() -> None:
    first, second = stored_events(SQL)
    assert isinstance(first, kv_events.LoraBlockStored) and first.lora_name == "sql"
    assert isinstance(second, kv_events.LoraBlockStored) and second.lora_id == 1
    hashes = block_hashes(PROMPT, BS, root=SQL.root)
    assert (first.block_hashes, first.parent_block_hash) == (hashes[:2], None)
    assert (second.block_hashes, second.parent_block_hash) == (hashes[2:], hashes[1])
    wire = msgspec.msgpack.decode(kv_events.encode_batch([second], ts=1.0))
    # vLLM's BlockStored: block_hashes, parent_block_hash, token_ids, block_size, lora_id,
    # medium, lora_name (array form, tag first)
    assert wire == [
        1.0,
        [["BlockStored", hashes[2:], hashes[1], PROMPT[32:48], BS, 1, "GPU", "sql"]],
    ]


def test_base_events_leave_lora_unset_and_encode_as_before() -> None:
    first, second = stored_events(None)
    hashes = base_hashes_as_before(PROMPT)
    assert type(first) is type(second) is kv_events.BlockStored
    assert (first.lora_id, second.lora_id) == (None, None)
    wire = kv_events.encode_batch([first, second], ts=1.0)
    assert msgspec.msgpack.decode(wire) == [
        1.0,
        [
            ["BlockStored", hashes[:2], None, PROMPT[:32], BS, None, "GPU"],
            ["BlockStored", hashes[2:], hashes[1], PROMPT[32:48], BS, None, "GPU"],
        ],
    ]


# -- adapter numbers ------------------------------------------------------------------------------


def test_adapters_are_numbered_like_vllms_lora_int_id() -> None:
    adapters = LoraAdapters([("s", "/s"), ("t", "/t")])
    assert [adapters.lora_id(n) for n in ("s", "t", "x")] == [1, 2, None]
    adapters.load("x", "/x")
    adapters.load("y", "/y")
    assert (adapters.lora_id("x"), adapters.lora_id("y")) == (3, 4)
    adapters.load("x", "/x2", inplace=True)
    assert adapters.lora_id("x") == 3  # an in-place reload keeps its number
    adapters.unload("x")
    assert adapters.lora_id("x") is None
    adapters.load("x", "/x")
    assert adapters.lora_id("x") == 5  # numbers are not reused
    adapters.unload("s")
    adapters.reset()
    assert [adapters.lora_id(n) for n in ("s", "t", "x", "y")] == [1, 2, None, None]
    adapters.load("z", "/z")
    assert adapters.lora_id("z") == 3
