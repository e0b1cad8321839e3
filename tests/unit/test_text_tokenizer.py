"""ModelTokenizer: loading a local folder (and every way that fails), special tokens, encode and
decode against transformers, and the off-loop path for long texts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from lmgw.simulators import model_files
from lmgw.text import ModelTokenizer, TokenIdError, TokenizerLoadError, resolve_model_dir
from lmgw.text.tokenizer import _CHUNK_PROBES, ENTRY_CHARS, chunk_cuts

TEXT = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
        st.sampled_from(["<|im_start|>", "<|im_end|>", "<tool_call>", " ", "  ", "\n", "\t"]),
    ),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_files.ensure_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tok(sim_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(sim_dir)


@pytest.fixture(scope="module")
def hf(sim_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(sim_dir))


def _copy(sim_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(sim_dir, target)
    return target


# -- the sim model folder -------------------------------------------------------------------------


def test_sim_model_dir_is_cached_and_deterministic(tmp_path: Path, sim_dir: Path) -> None:
    first = model_files.ensure_model_dir(tmp_path)
    assert model_files.ensure_model_dir(tmp_path) == first
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (first / name).read_bytes() == (sim_dir / name).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary leftovers


def test_load_reads_special_tokens_generation_config_and_context(tok: ModelTokenizer) -> None:
    assert tok.bos_token == model_files.BOS
    assert tok.eos_token == model_files.EOS
    assert tok.pad_token == model_files.PAD
    assert tok.unk_token is None and tok.unk_token_id is None
    assert tok.special_tokens_map == {
        "bos_token": model_files.BOS,
        "eos_token": model_files.EOS,
        "pad_token": model_files.PAD,
    }
    im_end, pad = tok.token_to_id(model_files.EOS), tok.token_to_id(model_files.PAD)
    assert tok.eos_token_id == im_end
    assert tok.eos_token_ids == (im_end, pad)  # generation_config's list, deduplicated
    assert tok.max_model_len == model_files.MAX_MODEL_LEN
    assert tok.generation_max_tokens is None  # the sim's generation_config sets none
    specials = {a.content for a in tok.added_tokens if a.special}
    assert specials == set(model_files.SPECIAL_TOKENS)
    plain = {a.content for a in tok.added_tokens if not a.special}
    assert plain == set(model_files.ADDED_TEXT_TOKENS)
    assert tok.all_special_ids == {tok.token_to_id(t) for t in model_files.SPECIAL_TOKENS}


def test_max_model_len_override(sim_dir: Path) -> None:
    assert ModelTokenizer.load(sim_dir, max_model_len=1024).max_model_len == 1024


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXT, add_special=st.booleans())
def test_encode_matches_transformers(tok: ModelTokenizer, hf, text: str, add_special: bool) -> None:
    ids = tok.encode(text, add_special_tokens=add_special)
    assert ids == hf.encode(text, add_special_tokens=add_special)
    assert tok.count_tokens(text, add_special_tokens=add_special) == len(ids)
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@settings(max_examples=40, deadline=None)
@given(text=TEXT)
def test_byte_level_round_trip(tok: ModelTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_add_special_tokens_adds_bos(tok: ModelTokenizer) -> None:
    plain = tok.encode("hello world", add_special_tokens=False)
    assert tok.encode("hello world") == [tok.bos_token_id, *plain]
    assert tok.encode("<|im_start|>user")[0] == tok.bos_token_id
    assert tok.token_to_id("<|im_start|>") in tok.encode(
        "<|im_start|>user", add_special_tokens=False
    )


def test_decode_rejects_ids_outside_the_vocabulary(tok: ModelTokenizer) -> None:
    for bad in ([tok.vocab_size], [0, -1], [10**12]):
        with pytest.raises(TokenIdError) as err:
            tok.decode(bad)
        assert err.value.status == 400 and err.value.param == "tokens"
    assert tok.decode([]) == ""


def test_convert_ids_to_tokens(tok: ModelTokenizer) -> None:
    ids = tok.encode("<|im_start|>hello", add_special_tokens=False)
    strs = tok.convert_ids_to_tokens([*ids, tok.vocab_size + 5, -3])
    assert strs[0] == "<|im_start|>"
    assert strs[-2:] == [None, None]


# -- the off-loop path ----------------------------------------------------------------------------


async def test_long_texts_go_through_the_limiter_short_ones_do_not(sim_dir: Path) -> None:
    limiter = trio.CapacityLimiter(1)
    tok = ModelTokenizer.load(sim_dir, offload_threshold_chars=100, limiter=limiter)
    short, long = "short text", "The gateway routes each request. " * 20
    results: dict[str, list[int]] = {}

    async def encode(name: str, text: str) -> None:
        results[name] = await tok.encode_async(text, add_special_tokens=False)

    # Hold the only thread token: an off-loop encode has to wait for it, an inline one does not.
    async with trio.open_nursery() as nursery, limiter:
        nursery.start_soon(encode, "long", long)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.statistics().tasks_waiting == 1
        await encode("short", short)  # inline: done while the limiter is still held
        assert "long" not in results
    assert results["short"] == tok.encode(short, add_special_tokens=False)
    assert results["long"] == tok.encode(long, add_special_tokens=False)


@settings(max_examples=25, deadline=None)
@given(text=TEXT, add_special=st.booleans())
async def test_off_loop_encode_equals_inline(sim_dir: Path, text: str, add_special: bool) -> None:
    tok = ModelTokenizer.load(sim_dir, offload_threshold_chars=0, offload_threshold_ids=0)
    ids = await tok.encode_async(text, add_special_tokens=add_special)
    assert ids == tok.encode(text, add_special_tokens=add_special)
    assert await tok.count_tokens_async(text, add_special_tokens=add_special) == len(ids)
    assert await tok.decode_async(ids) == tok.decode(ids)


async def test_decode_async_checks_ids_before_the_thread(sim_dir: Path) -> None:
    tok = ModelTokenizer.load(sim_dir, offload_threshold_ids=0)
    with pytest.raises(TokenIdError):
        await tok.decode_async([tok.vocab_size])


def test_default_limiter_is_created_once(sim_dir: Path) -> None:
    tok = ModelTokenizer.load(sim_dir, offload_threads=3)
    assert tok.limiter is tok.limiter
    assert tok.limiter.total_tokens == 3


# -- loading errors and transformers' loading rules ----------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        ModelTokenizer.load(tmp_path / "nope")


def test_a_file_is_not_a_folder(sim_dir: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="is a file"):
        ModelTokenizer.load(sim_dir / "tokenizer.json")


def test_hub_id_without_local_copy_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError) as err:
        ModelTokenizer.load("some-org/some-model", hf_cache=tmp_path)
    msg = str(err.value)
    assert "Hub id" in msg and "never downloads" in msg and "huggingface-cli download" in msg


def test_hub_id_resolves_to_an_existing_local_cache_snapshot(tmp_path: Path, sim_dir: Path) -> None:
    repo = tmp_path / "models--some-org--some-model"
    shutil.copytree(sim_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert resolve_model_dir("some-org/some-model", hf_cache=tmp_path) == (
        repo / "snapshots" / "abc123"
    )
    tok = ModelTokenizer.load("some-org/some-model", hf_cache=tmp_path)
    assert tok.name == "some-org/some-model" and tok.eos_token == model_files.EOS


def test_missing_tokenizer_json_hints_at_conversion(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(TokenizerLoadError, match="only fast tokenizers"):
        ModelTokenizer.load(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", "{not json", "not valid JSON"),
        ("tokenizer.json", "{}", "not a valid tokenizer"),
        ("tokenizer_config.json", "[1, 2]", "JSON object"),
        ("tokenizer_config.json", '{"bos_token": 5}', "bos_token"),
        ("generation_config.json", '{"eos_token_id": "x"}', "eos_token_id"),
        ("tokenizer_config.json", '{"added_tokens_decoder": {"x": {}}}', "bad entry"),
    ],
)
def test_bad_files(sim_dir: Path, tmp_path: Path, name: str, content: str, match: str) -> None:
    folder = _copy(sim_dir, tmp_path)
    (folder / name).write_text(content)
    with pytest.raises(TokenizerLoadError, match=match):
        ModelTokenizer.load(folder)


def test_legacy_special_tokens_map_applies_without_added_tokens_decoder(
    sim_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(sim_dir, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>", "special": True}})
    )
    assert ModelTokenizer.load(folder).eos_token == "<|endoftext|>"
    # With added_tokens_decoder present, tokenizer_config.json wins (transformers 5).
    assert ModelTokenizer.load(sim_dir).eos_token == model_files.EOS


def test_config_only_added_tokens_are_added_at_their_ids(sim_dir: Path, tmp_path: Path) -> None:
    folder = _copy(sim_dir, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    base = ModelTokenizer.load(sim_dir).vocab_size
    entry = {"content": "<|new|>", "special": True, "normalized": False}
    config["added_tokens_decoder"][str(base)] = entry
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = ModelTokenizer.load(folder)
    assert tok.token_to_id("<|new|>") == base and base in tok.all_special_ids
    config["added_tokens_decoder"] = {str(base + 7): entry}  # a gap: the files disagree
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerLoadError, match="do not belong together"):
        ModelTokenizer.load(folder)


def test_truncation_stored_in_tokenizer_json_is_ignored(sim_dir: Path, tmp_path: Path) -> None:
    folder = _copy(sim_dir, tmp_path)
    raw = json.loads((folder / "tokenizer.json").read_text())
    raw["truncation"] = {
        "direction": "Right",
        "max_length": 4,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    (folder / "tokenizer.json").write_text(json.dumps(raw))
    assert len(ModelTokenizer.load(folder).encode("one two three four five six seven")) > 4


def test_context_length_sources(sim_dir: Path, tmp_path: Path) -> None:
    folder = _copy(sim_dir, tmp_path)
    (folder / "config.json").write_text(
        json.dumps({"text_config": {"max_position_embeddings": 8192, "seq_length": 4096}})
    )
    assert ModelTokenizer.load(folder).max_model_len == 4096  # the smallest bound, nested
    (folder / "config.json").unlink()
    assert ModelTokenizer.load(folder).max_model_len == model_files.MAX_MODEL_LEN  # tokenizer cfg
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1e30  # transformers' "no limit"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert ModelTokenizer.load(folder).max_model_len is None


def test_clean_up_tokenization_spaces_like_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "hello": 1, ",": 2, "world": 3, "!": 4, "don": 5, "'": 6, "t": 7}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.save(str(tmp_path / "tokenizer.json"))
    config = {"unk_token": "[UNK]", "clean_up_tokenization_spaces": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = ModelTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = ours.encode("hello , world ! don ' t")
    assert ours.decode(ids) == theirs.decode(ids)
    assert "," in ours.decode(ids) and " ," not in ours.decode(ids)


# -- the segment (prefix) cache ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_segment_cache_gives_the_ids_of_a_whole_encode(sim_dir: Path, texts: list[str]) -> None:
    budget = 200 + 4 * ENTRY_CHARS  # (a few entries: evictions)
    cached = ModelTokenizer.load(sim_dir, prefix_cache_min_chars=1, prefix_cache_chars=budget)
    assert cached.prefix_cache_off_reason is None
    plain = ModelTokenizer.load(sim_dir, prefix_cache_chars=0)
    for text in [*texts, *texts]:  # the second round hits what the first one stored
        want = plain.encode(text, add_special_tokens=False)
        assert cached.encode(text, add_special_tokens=False) == want
        assert cached.count_tokens(text, add_special_tokens=False) == len(want)
    stats = cached.prefix_cache_statistics()
    assert stats is not None and stats.chars <= budget
    assert stats.chars == sum(len(t) + ENTRY_CHARS for t in cached._segments._entries)  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), chunk=st.integers(1, 6))
def test_chunked_stretches_give_the_ids_of_a_whole_encode(
    sim_dir: Path, texts: list[str], chunk: int
) -> None:
    """Chunks of a few characters cut the hypothesis texts in many places: still exact."""
    cached = ModelTokenizer.load(
        sim_dir,
        prefix_cache_min_chars=1,
        prefix_cache_chars=400 + 8 * ENTRY_CHARS,
        prefix_cache_chunk_chars=chunk,
    )
    assert cached.prefix_cache_chunk_off_reason is None
    plain = ModelTokenizer.load(sim_dir, prefix_cache_chars=0)
    for text in [*texts, *(t + " and a tail" for t in texts)]:
        want = plain.encode(text, add_special_tokens=False)
        assert cached.encode(text, add_special_tokens=False) == want


@given(text=st.text(st.sampled_from("ab \n\t."), max_size=60), tail=st.text(max_size=10),
       every=st.integers(1, 8))  # fmt: skip
def test_chunk_cuts_follow_a_non_space_and_survive_what_comes_after(
    text: str, tail: str, every: int
) -> None:
    cuts = chunk_cuts(text, every)
    assert cuts == sorted(set(cuts))
    for c in cuts:
        assert text[c] == " " and not text[c - 1].isspace()
    at = 0
    for c in cuts:  # the first eligible space from each multiple on
        assert c >= at + every
        assert all(text[i] != " " or text[i - 1].isspace() for i in range(at + every, c))
        at = c
    # a text that shares the prefix up to (and including) a cut's space shares that cut
    for c in cuts:
        assert set(cuts) & set(range(c + 1)) <= set(chunk_cuts(text[: c + 1] + tail, every))


def test_a_shared_document_is_encoded_once_and_only_the_question_after_it(sim_dir: Path) -> None:
    """RAG: the document and the question are one stretch; its chunks hit, the tail is new."""
    tok = ModelTokenizer.load(sim_dir)
    plain = ModelTokenizer.load(sim_dir, prefix_cache_chars=0)
    doc = " ".join(f"word{i % 97} of the shared document, line {i}." for i in range(300))

    def prompt(question: str) -> str:
        return f"<|im_start|>user\nDocument: {doc}\n\nQuestion: {question}<|im_end|>\n"

    first = tok.encode(prompt("what is it about?"), add_special_tokens=False)
    stats = tok.prefix_cache_statistics()
    assert stats is not None and stats.hits == 0 and stats.entries > 10
    second_prompt = prompt("and who wrote it, and when?")
    second = tok.encode(second_prompt, add_special_tokens=False)
    after = tok.prefix_cache_statistics()
    assert after is not None and after.misses - stats.misses <= 2  # the chunk with the question
    assert after.hit_tokens >= 0.9 * len(second)
    assert first == plain.encode(prompt("what is it about?"), add_special_tokens=False)
    assert second == plain.encode(second_prompt, add_special_tokens=False)


def test_chunking_stays_off_where_a_cut_could_change_ids() -> None:
    """A pre-tokenizer that keeps a space with the word before it, or none at all: a cut before
    the space would change the ids, so the stretches are kept whole (the cache stays on)."""
    chars = sorted(set("".join(_CHUNK_PROBES)))
    vocab = {c: i for i, c in enumerate(chars)} | {"a ": len(chars)}

    def bpe() -> Tokenizer:
        return Tokenizer(models.BPE(vocab=dict(vocab), merges=[("a", " ")]))

    merged = bpe()  # "a b": ["a ", "b"] whole, ["a", " ", "b"] cut before the space
    merged.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok = ModelTokenizer(merged, prefix_cache_chunk_chars=8)
    assert tok.prefix_cache_off_reason is None
    assert "changes the ids" in (tok.prefix_cache_chunk_off_reason or "")
    text = "a banana, a cat " * 20
    assert tok.encode(text, add_special_tokens=False) == merged.encode(text).ids
    assert "pre-tokenizer" in (ModelTokenizer(bpe()).prefix_cache_chunk_off_reason or "")
    off = ModelTokenizer(Tokenizer(models.BPE()), prefix_cache_chars=0)
    assert off.prefix_cache_chunk_off_reason == off.prefix_cache_off_reason


def test_segment_cache_reuses_a_shared_system_turn(sim_dir: Path) -> None:
    tok = ModelTokenizer.load(sim_dir, prefix_cache_min_chars=256)
    system = "You are a helpful assistant. Answer briefly. " * 20
    first = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    second = first.replace("hi", "what is the weather?")
    tok.encode(first, add_special_tokens=False)
    stats = tok.prefix_cache_statistics()
    assert stats is not None and (stats.hits, stats.misses, stats.entries) == (0, 1, 1)
    ids = tok.encode(second, add_special_tokens=False)
    stats = tok.prefix_cache_statistics()
    assert stats is not None and (stats.hits, stats.misses) == (1, 1)
    assert stats.hit_tokens == tok.count_tokens(f"system\n{system}", add_special_tokens=False)
    assert ids == ModelTokenizer.load(sim_dir, prefix_cache_chars=0).encode(
        second, add_special_tokens=False
    )
    tok.encode(second)  # add_special_tokens=True (a completion) never uses the cache
    assert tok.prefix_cache_statistics() == stats


def test_segment_cache_evicts_least_recently_used(sim_dir: Path) -> None:
    entry = 24 + ENTRY_CHARS  # what each of a..e counts
    budget = 4 * entry + 4
    tok = ModelTokenizer.load(sim_dir, prefix_cache_min_chars=10, prefix_cache_chars=budget)
    a, b, c, d, e = (ch * 24 for ch in "abcde")

    def hits(text: str) -> int:
        tok.encode(f"{text}<|im_end|>", add_special_tokens=False)
        stats = tok.prefix_cache_statistics()
        assert stats is not None and stats.chars <= budget
        return stats.hits

    for text in (a, b, a, c, d):  # four entries; b is now the least recently used
        hits(text)
    hits(e)  # five: b goes
    before = hits("x" * 5)  # (under prefix_cache_min_chars: not kept)
    assert hits(a) == before + 1  # a survived
    assert hits(b) == before + 1  # b was evicted: a miss
    big = "f" * (budget // 4 + 1)
    assert hits(big) == before + 1 and hits(big) == before + 1  # too big to keep


def test_many_tiny_stretches_stay_within_the_budget(sim_dir: Path) -> None:
    """Every stretch is cached by default, a newline between two turns too: each counts
    its Python objects (ENTRY_CHARS), so thousands of distinct tiny ones are evicted in
    time rather than growing the memory far past the budget's characters."""
    budget = 50 * ENTRY_CHARS
    tok = ModelTokenizer.load(sim_dir, prefix_cache_chars=budget)
    plain = ModelTokenizer.load(sim_dir, prefix_cache_chars=0)
    for i in range(2000):
        text = f"{i}<|im_end|>\n<|im_start|>{i % 7}"
        assert tok.encode(text, add_special_tokens=False) == plain.encode(
            text, add_special_tokens=False
        )
    stats = tok.prefix_cache_statistics()
    assert stats is not None and stats.chars <= budget and stats.entries <= 50
    assert stats.hits >= 1999  # the newline, and the digits 0-6 after their first time


def test_segment_cache_stays_off_where_it_could_be_wrong() -> None:
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok = ModelTokenizer(metaspace)
    assert tok.prefix_cache_statistics() is None
    assert tok.prefix_cache_off_reason is not None and "Metaspace" in tok.prefix_cache_off_reason
    stripping = Tokenizer(models.BPE())
    stripping.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    assert "strips" in (ModelTokenizer(stripping).prefix_cache_off_reason or "")
    off = ModelTokenizer(Tokenizer(models.BPE()), prefix_cache_chars=0)
    assert off.prefix_cache_off_reason is not None and off.prefix_cache_statistics() is None


async def test_segment_cache_misses_go_off_loop(sim_dir: Path) -> None:
    limiter = trio.CapacityLimiter(1)
    tok = ModelTokenizer.load(
        sim_dir, prefix_cache_min_chars=50, offload_threshold_chars=500, limiter=limiter
    )
    system = "The gateway routes each request to a worker. " * 20
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    done: list[list[int]] = []

    async def encode() -> None:
        done.append(await tok.encode_async(prompt, add_special_tokens=False))

    async with trio.open_nursery() as nursery, limiter:
        nursery.start_soon(encode)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.statistics().tasks_waiting == 1  # the miss waits for a thread
    # Now cached: only short misses are left, so it runs inline even with the limiter held.
    async with limiter:
        again = await tok.encode_async(prompt, add_special_tokens=False)
    assert done == [again]
    assert again == ModelTokenizer.load(sim_dir, prefix_cache_chars=0).encode(
        prompt, add_special_tokens=False
    )


def test_generation_config_defaults(sim_dir: Path, tmp_path: Path) -> None:
    folder = _copy(sim_dir, tmp_path)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 7, "max_length": 4096})
    )
    tok = ModelTokenizer.load(folder)
    assert tok.eos_token_ids == (7, tok.eos_token_id)
    assert tok.generation_max_tokens == 4096
    assert tok.generation_config["max_length"] == 4096


def test_models_tokenizer_cache_chars_sizes_the_segment_cache(sim_dir: Path) -> None:
    from lmgw.config import ModelConfig
    from lmgw.text.service import load_model_texts

    texts = load_model_texts(
        [
            ModelConfig(name="small", tokenizer=str(sim_dir), tokenizer_cache_chars=ENTRY_CHARS),
            ModelConfig(name="off", tokenizer=str(sim_dir), tokenizer_cache_chars=0),
        ]
    )
    small, off = texts["small"].tokenizer, texts["off"].tokenizer
    for text in ("<|im_start|>a<|im_end|>b", "<|im_start|>c<|im_end|>d"):
        small.encode(text, add_special_tokens=False)
    stats = small.prefix_cache_statistics()
    assert stats is not None and stats.chars <= ENTRY_CHARS and stats.entries <= 1
    assert off.prefix_cache_statistics() is None
    assert "disabled" in (off.prefix_cache_off_reason or "")
