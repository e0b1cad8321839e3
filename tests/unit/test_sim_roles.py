"""Sans-IO pieces of the disaggregated simulator roles: KV block derivation and verification, the
prefill worker's KV store, P2P NCCL pair ids, the LMCache chunk store, the encoder embedding
store, media content hashes and the role CLI."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmgw.simulators import model_files
from lmgw.simulators.disagg import (
    EC_FILE_NAME,
    EMBED_BYTES_PER_TOKEN,
    KV_BLOCK_BYTES,
    EmbeddingError,
    EmbeddingStore,
    KVStore,
    KVUnknownBlocks,
    KVVerifyError,
    LMCacheStore,
    PairId,
    derive_embedding,
    kv_block_payloads,
    lmcache_chunk_payload,
    lmcache_chunks,
    parse_pair_id,
    prompt_digest,
    same_address,
    verify_kv_blocks,
)
from lmgw.simulators.engine import (
    Engine,
    EngineConfig,
    SamplingSpec,
    Tokenizer,
    load_tokenizer,
    render_chat,
)
from lmgw.simulators.fleet import dialect_args
from lmgw.simulators.worker import build_parser, options_from_args
from lmgw.simulators.worker import main as worker_main
from lmgw.transport.dialects.vllm_p2pnccl import pair_request_id


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_files.ensure_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return load_tokenizer(model_dir)


PROMPT = list(range(1000, 1000 + 40))  # 2 full blocks of 16 + 8 tokens


# -- KV blocks ------------------------------------------------------------------------------------


def test_kv_blocks_are_deterministic_full_blocks_and_chained() -> None:
    blocks = kv_block_payloads(PROMPT, 16)
    assert len(blocks) == 2 and all(len(b) == KV_BLOCK_BYTES for b in blocks)
    assert blocks == kv_block_payloads(list(PROMPT), 16)
    assert blocks[0] != blocks[1]
    assert kv_block_payloads(PROMPT[:15], 16) == []  # shorter than a block: nothing to move
    # Chained: the same 16 tokens after a different prefix give different bytes.
    other = [7] * 16 + PROMPT[16:32]
    assert kv_block_payloads(other, 16)[1] != blocks[1]
    # Tokens past the last full block do not change the full blocks.
    assert kv_block_payloads(PROMPT[:32], 16) == blocks
    assert kv_block_payloads(PROMPT, 8)[0] != blocks[0]
    with pytest.raises(ValueError):
        kv_block_payloads(PROMPT, 0)


def test_verify_kv_blocks_names_the_problem() -> None:
    blocks = kv_block_payloads(PROMPT, 16)
    assert verify_kv_blocks(PROMPT, 16, b"".join(blocks)) == 2
    assert verify_kv_blocks(PROMPT[:10], 16, b"") == 0
    with pytest.raises(KVVerifyError, match="block 0 of 2 does not match"):
        verify_kv_blocks(PROMPT, 16, blocks[1] + blocks[0])  # misordered
    corrupt = bytearray(b"".join(blocks))
    corrupt[KV_BLOCK_BYTES + 5] ^= 0xFF
    with pytest.raises(KVVerifyError, match="block 1 of 2"):
        verify_kv_blocks(PROMPT, 16, bytes(corrupt))
    with pytest.raises(KVVerifyError, match=r"has 1 blocks but .* needs 2"):
        verify_kv_blocks(PROMPT, 16, blocks[0])
    with pytest.raises(KVVerifyError, match="whole number"):
        verify_kv_blocks(PROMPT, 16, b"".join(blocks) + b"x")
    assert prompt_digest(PROMPT) == prompt_digest(list(PROMPT)) != prompt_digest(PROMPT[:-1])


def test_kv_store_take_releases_and_serves_in_asked_order() -> None:
    store = KVStore(max_entries=8, ttl_s=10.0)
    entry = store.put("r1", PROMPT, 16, now=0.0)
    assert len(entry.block_ids) == 2 and entry.num_tokens == 40
    assert entry.digest == prompt_digest(PROMPT)
    second = store.put("r2", PROMPT, 16, now=0.0)
    assert set(second.block_ids).isdisjoint(entry.block_ids)  # fresh block ids per request
    with pytest.raises(KVUnknownBlocks):
        store.take("r1", [entry.block_ids[0], 999], now=1.0)
    assert "r1" in store  # a bad fetch does not release
    _, data = store.take("r1", list(reversed(entry.block_ids)), now=1.0)
    blocks = kv_block_payloads(PROMPT, 16)
    assert data == blocks[1] + blocks[0]
    assert "r1" not in store and store.released == 1 and store.blocks_served == 2
    with pytest.raises(KeyError):
        store.take("r1", None, now=1.0)  # fetched already
    _, all_blocks = store.take("r2", None, now=1.0)
    assert all_blocks == b"".join(blocks)


def test_kv_store_ttl_and_capacity() -> None:
    store = KVStore(max_entries=2, ttl_s=5.0)
    store.put("a", PROMPT, 16, now=0.0)
    store.put("b", PROMPT, 16, now=1.0)
    store.put("c", PROMPT, 16, now=2.0)
    assert "a" not in store and store.evicted == 1
    assert store.get("b", now=6.5) is None and store.expired == 1  # published at 1 + ttl 5
    assert store.get("c", now=6.5) is not None
    assert store.expire(now=100.0) == 1 and len(store) == 0
    store.clear()
    assert (store.published, store.expired, store.evicted) == (0, 0, 0)
    with pytest.raises(ValueError):
        KVStore(max_entries=0)


# -- P2P NCCL pair ids ----------------------------------------------------------------------------

HEX = "0123456789abcdef" * 2


def test_pair_id_parses_like_the_connector_and_ignores_engine_affixes() -> None:
    rid = pair_request_id("10.0.0.1:21001", "10.0.0.2:22001", HEX)  # what the gateway sends
    want = PairId("10.0.0.1:21001", "10.0.0.2:22001", rid)
    assert parse_pair_id(rid) == want
    assert parse_pair_id(f"chatcmpl-{rid}-0") == want  # vLLM's prefix, an engine suffix
    assert parse_pair_id("cmpl-" + rid).key == rid  # same KV name on both legs
    for not_pair in (
        "plain-id",
        rid[:-1],  # 31 hex digits
        rid.replace("___decode_addr_", "___decoder_"),
        f"___prefill_addr_10.0.0.1___decode_addr_10.0.0.2:1_{HEX}",  # no prefill port
    ):
        assert parse_pair_id(not_pair) is None, not_pair


def test_same_address_accepts_loopback_spellings_only() -> None:
    assert same_address("127.0.0.1:5", "localhost:5")
    assert same_address("[::1]:5", "::1:5")
    assert not same_address("127.0.0.1:5", "127.0.0.1:6")
    assert not same_address("10.0.0.1:5", "10.0.0.2:5")


# -- LMCache chunks -------------------------------------------------------------------------------


def test_lmcache_chunks_are_chained_and_keep_the_partial_tail() -> None:
    chunks = lmcache_chunks(PROMPT, 16, "m")
    assert [(s, e) for _, s, e in chunks] == [(0, 16), (16, 32), (32, 40)]
    assert chunks == lmcache_chunks(list(PROMPT), 16, "m")
    assert lmcache_chunks(PROMPT[:32], 16, "m") == chunks[:2]  # a shared prefix shares keys
    assert lmcache_chunks(PROMPT, 16, "other")[0][0] != chunks[0][0]  # keyed by model too
    other = [7] * 16 + PROMPT[16:]
    assert lmcache_chunks(other, 16, "m")[1][0] != chunks[1][0]  # chained
    assert lmcache_chunks([], 16, "m") == []
    with pytest.raises(ValueError):
        lmcache_chunks(PROMPT, 0, "m")


def test_lmcache_store_prefix_hits_and_corruption(tmp_path: Path) -> None:
    producer = LMCacheStore(tmp_path, model="m", chunk_size=16)
    consumer = LMCacheStore(tmp_path, model="m", chunk_size=16)
    assert consumer.lookup(PROMPT) == 0 and consumer.misses == 1
    assert producer.put(PROMPT[:20]) == 2  # chunks [0, 16) and the partial [16, 20)
    assert consumer.lookup(PROMPT) == 16  # the prefix only: still a miss
    assert producer.put(PROMPT) == 2 and producer.put(PROMPT) == 0  # [16, 32), [32, 40)
    assert producer.chunks_stored == 4
    assert consumer.lookup(PROMPT) == 40
    assert (consumer.hits, consumer.misses, consumer.hit_tokens) == (1, 2, 56)
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left behind
    key, start, end = lmcache_chunks(PROMPT, 16, "m")[1]
    assert producer.path(key).read_bytes() == lmcache_chunk_payload(key, end - start)
    producer.path(key).write_bytes(lmcache_chunk_payload(key, end - start)[:-1])
    with pytest.raises(KVVerifyError, match="chunk 1 of 3"):
        consumer.lookup(PROMPT)
    assert LMCacheStore(tmp_path, model="other", chunk_size=16).lookup(PROMPT) == 0


# -- embeddings -----------------------------------------------------------------------------------


def test_embedding_store_atomic_layout_and_verification(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path)
    h = hashlib.sha256(b"data:image/png;base64,AAAA").hexdigest()
    data = derive_embedding(h, "image", 256)
    assert len(data) == 256 * EMBED_BYTES_PER_TOKEN
    assert data == derive_embedding(h, "image", 256) != derive_embedding(h, "audio", 256)
    with pytest.raises(EmbeddingError, match="no encoder output"):
        store.require(h, "image", 256)
    assert store.missing == 1
    assert store.put(h, data) is True and store.put(h, data) is False  # identical: no rewrite
    assert (tmp_path / h / EC_FILE_NAME).read_bytes() == data
    assert os.listdir(tmp_path / h) == [EC_FILE_NAME]  # no temp file left behind
    store.require(h, "image", 256)
    assert (store.stored, store.found) == (1, 1)
    (tmp_path / h / EC_FILE_NAME).write_bytes(data[:-1] + b"\x00")
    with pytest.raises(EmbeddingError, match="corrupted"):
        store.require(h, "image", 256)
    with pytest.raises(ValueError):
        store.path("../etc")


def test_media_items_carry_sha256_content_hash(tok: Tokenizer) -> None:
    url = "data:image/png;base64,iVBORw0KGgo="
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}, "uuid": "vid-1"},
            ],
        }
    ]
    r = render_chat(tok, msgs)
    assert [m.kind for m in r.media] == ["image", "audio", "video"]
    assert r.media[0].content_hash == hashlib.sha256(url.encode()).hexdigest()
    assert r.media[1].content_hash == hashlib.sha256(b"UklGRg==").hexdigest()
    assert r.media[2].content_hash == hashlib.sha256(b"uuid:vid-1").hexdigest()
    # The uuid keys the encoder cache; the content keys what the model sees (placeholder ids).
    no_uuid = [{**msgs[0], "content": [*msgs[0]["content"][:3], {**msgs[0]["content"][3]}]}]
    del no_uuid[0]["content"][3]["uuid"]
    plain = render_chat(tok, no_uuid)
    assert plain.token_ids == r.token_ids and plain.media[2].content_hash != r.media[2].content_hash
    # A uuid-only item (media omitted: expected in the encoder cache) is known by its uuid.
    ref_only = [
        {"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": "u1"}]}
    ]
    (item,) = render_chat(tok, ref_only).media
    assert item.content_hash == hashlib.sha256(b"uuid:u1").hexdigest()


def test_external_cached_tokens_skip_prefill_time(tok: Tokenizer, model_dir: Path) -> None:
    engine = Engine(EngineConfig(model_dir=str(model_dir)))
    ids = tok.encode("word " * 200)
    cold = engine.submit(len(ids))
    cold.admit(1)
    cold_s = cold.prefill([ids])
    cold.close(aborted=True)
    engine.reset()
    warm = engine.submit(len(ids))
    warm.admit(1)
    warm_s = warm.prefill([ids], external_cached=len(ids) // 16 * 16)
    assert warm.cached_tokens == len(ids) // 16 * 16
    assert engine.cache.hits == 0  # remote KV is not a local prefix-cache hit
    assert warm_s < cold_s / 5
    warm.close(aborted=True)
    assert engine.generate(ids, SamplingSpec()) == engine.generate(ids, SamplingSpec())


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_accepts_roles_and_checks_encoder_dir(tmp_path: Path) -> None:
    parser = build_parser()
    for role in ("e", "p", "d", "pd"):
        ns = parser.parse_args(["--role", role, "--ec-dir", str(tmp_path), "--engine-id", "x1"])
        opts = options_from_args(ns, as_process=False)
        assert opts.role == role and opts.ec_dir == str(tmp_path) and opts.engine_id == "x1"
    with pytest.raises(ValueError, match="--ec-dir"):
        options_from_args(parser.parse_args(["--role", "e"]))
    with pytest.raises(ValueError, match="unknown worker role 'x'"):
        options_from_args(parser.parse_args(["--role", "x"]))


def test_cli_p2pnccl_and_lmcache_options(tmp_path: Path) -> None:
    parser = build_parser()
    opts = options_from_args(parser.parse_args(["--role", "p"]))
    assert (opts.kv_port, opts.kv_connector, opts.lmcache_strict) == (None, "auto", True)
    opts = options_from_args(parser.parse_args(["--role", "d", "--kv-port", "0"]))
    assert opts.kv_port == 0
    args = ["--role", "d", "--kv-connector", "lmcache", "--lmcache-dir", str(tmp_path)]
    opts = options_from_args(parser.parse_args([*args, "--no-lmcache-strict"]))
    assert opts.kv_connector == "lmcache" and opts.lmcache_dir == str(tmp_path)
    assert opts.lmcache_strict is False
    with pytest.raises(ValueError, match="--lmcache-dir"):
        options_from_args(parser.parse_args(["--role", "p", "--kv-connector", "lmcache"]))
    with pytest.raises(ValueError, match="not a port"):
        options_from_args(parser.parse_args(["--role", "p", "--kv-port", "70000"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-connector", "mooncake"])


def test_cli_model_dir_and_max_model_len(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    opts = options_from_args(parser.parse_args([]))
    assert (opts.model_dir, opts.max_model_len) == (None, None)  # the sim-model's own
    args = ["--model-dir", str(tmp_path), "--max-model-len", "4096"]
    opts = options_from_args(parser.parse_args(args))
    assert (opts.model_dir, opts.max_model_len) == (str(tmp_path), 4096)
    with pytest.raises(ValueError, match="--max-model-len"):
        options_from_args(parser.parse_args(["--max-model-len", "0"]))
    with pytest.raises(SystemExit) as exc:  # a folder without tokenizer.json: a usage error
        worker_main(["--model-dir", str(tmp_path)])
    assert exc.value.code == 2 and "tokenizer.json" in capsys.readouterr().err


def test_model_folder_is_built_once_under_concurrent_callers(tmp_path: Path) -> None:
    # several workers starting at once on a fresh cache: one complete folder, no leftovers
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: model_files.ensure_model_dir(tmp_path), range(4)))
    assert len(set(folders)) == 1 and folders[0].parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [folders[0].name]
    assert (folders[0] / "tokenizer.json").is_file() and load_tokenizer(folders[0]).vocab_size > 0


def test_fleet_dialect_args_configure_p_and_d_only() -> None:
    assert dialect_args("vllm-p2pnccl", "p", None) == ["--kv-port", "0"]
    assert dialect_args("vllm-p2pnccl", "e", None) == []
    assert dialect_args("vllm-lmcache", "d", "/x") == [
        "--kv-connector",
        "lmcache",
        "--lmcache-dir",
        "/x",
    ]
    assert dialect_args("vllm-lmcache", "pd", "/x") == []
    assert dialect_args("vllm-nixl", "p", "/x") == dialect_args(None, "d", None) == []
