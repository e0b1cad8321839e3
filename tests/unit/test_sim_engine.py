"""The simulator's sans-IO engine: tokenizer, chat rendering, deterministic output, timing model,
prefix cache, accounting, faults and metrics text. No sockets, no trio."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmgw.simulators import model_files
from lmgw.simulators.engine import (
    MAX_NATURAL_TOKENS,
    MIN_NATURAL_TOKENS,
    Engine,
    EngineConfig,
    MediaConfig,
    PrefixCache,
    PromptError,
    SamplingSpec,
    TimingModel,
    Tokenizer,
    block_hashes,
    generate,
    load_tokenizer,
    render_chat,
)
from lmgw.simulators.faults import FaultInjector, Faults
from lmgw.simulators.metrics import render_metrics
from lmgw.text import ChatTemplate, ModelTokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_files.ensure_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return load_tokenizer(model_dir)


DEFAULT = SamplingSpec()


def gen(
    tok: Tokenizer, prompt: str, spec: SamplingSpec = DEFAULT, *, seed: int = 0, index: int = 0
):
    return generate(
        tok.encode(prompt),
        spec,
        engine_seed=seed,
        max_model_len=8192,
        vocab=tok.output,
        index=index,
    )


# -- tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing  ",
        "tabs\tand\nnewlines\n\n",
        "naïve café ☕ 42 日本語 👍🏽",
        "",
    ],
)
def test_tokenizer_round_trips_and_stays_in_vocab(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= t < tok.vocab_size for t in ids)
    bos = tok.model.bos_token_id
    assert tok.encode(text) == (bos, *ids)  # a completion prompt gets the BOS, as in vLLM
    assert tok.decode(tok.encode(text)) == model_files.BOS + text


def test_tokenizer_is_the_model_folders_and_knows_special_tokens(
    tok: Tokenizer, model_dir: Path
) -> None:
    reference = ModelTokenizer.load(model_dir)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>"
    assert list(tok.encode(text)) == reference.encode(text)
    assert list(tok.encode(text, add_special_tokens=False)) == reference.encode(
        text, add_special_tokens=False
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == reference.token_to_id("<|im_start|>")
    assert ids[-1] == reference.token_to_id("<|im_end|>") == reference.eos_token_id
    assert tok.max_model_len == model_files.MAX_MODEL_LEN
    assert load_tokenizer(model_dir) is tok  # loaded once per process
    with pytest.raises(PromptError, match="out of vocabulary"):
        tok.decode([tok.vocab_size])


def test_tokenizer_caches_repeated_prompts(tok: Tokenizer, model_dir: Path) -> None:
    tok = Tokenizer(model_dir, cache_entries=2)
    a = tok.encode("first prompt")
    assert tok.encode("first prompt") is a  # a hit: no re-encode
    assert tok.encode("first prompt", add_special_tokens=False) is not a
    msgs = [{"role": "user", "content": "hello"}]
    r = tok.render_chat(msgs)
    assert tok.render_chat([{"role": "user", "content": "hello"}]) is r
    assert tok.render_chat(msgs, add_generation_prompt=False) is not r
    tok.encode("third")  # two entries: the oldest are gone
    assert tok.encode("first prompt") is not a and tok.encode("first prompt") == a


def test_output_text_retokenizes_to_the_output_ids(tok: Tokenizer, model_dir: Path) -> None:
    c = gen(tok, "Tell me a story")
    assert tok.encode(c.text, add_special_tokens=False) == c.token_ids
    assert ModelTokenizer.load(model_dir).decode(c.token_ids) == c.text
    entries = tok.output.entries
    assert len(tok.output.word_forms) == model_files.OUTPUT_WORDS  # all trained as whole tokens
    assert len({e.token_id for e in entries}) == len(entries)
    for e in entries:
        assert tok.encode(e.piece, add_special_tokens=False) == (e.token_id,)
        assert tok.decode([e.token_id]) == e.piece


# -- chat rendering -------------------------------------------------------------------------------


def test_render_chat_string_and_text_parts_agree(tok: Tokenizer, model_dir: Path) -> None:
    plain = render_chat(tok, [{"role": "user", "content": "Describe this picture"}])
    parts = render_chat(
        tok,
        [{"role": "user", "content": [{"type": "text", "text": "Describe this picture"}]}],
    )
    assert plain.token_ids == parts.token_ids
    assert plain.text == (
        "<|startoftext|><|im_start|>user\nDescribe this picture<|im_end|>\n<|im_start|>assistant\n"
    )
    # The gateway's own code on the same folder: the same text, the same ids.
    template = ChatTemplate.load(model_dir, special_tokens=tok.model.special_tokens_map)
    msgs = [{"role": "user", "content": "Describe this picture"}]
    assert template.render(msgs, add_generation_prompt=True) == plain.text
    reference = ModelTokenizer.load(model_dir)
    assert list(plain.token_ids) == reference.encode(plain.text, add_special_tokens=False)
    no_gen = render_chat(
        tok, [{"role": "user", "content": "hi"}], add_generation_prompt=False
    ).token_ids
    assert len(no_gen) < len(render_chat(tok, [{"role": "user", "content": "hi"}]).token_ids)


def test_render_chat_passes_tools_and_continues_a_final_message(tok: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = render_chat(tok, msgs, tools=tools)
    assert '"name": "get_weather"' in with_tools.text and "# Tools" in with_tools.text
    assert len(with_tools.token_ids) > len(render_chat(tok, msgs).token_ids)
    partial = [*msgs, {"role": "assistant", "content": "It is"}]
    cont = render_chat(tok, partial, add_generation_prompt=False, continue_final_message=True)
    assert cont.text.endswith("<|im_start|>assistant\nIt is")
    with pytest.raises(PromptError, match="Cannot set both"):
        render_chat(tok, partial, continue_final_message=True)  # as vLLM: a 400


def test_render_chat_counts_media_placeholders(tok: Tokenizer) -> None:
    media = MediaConfig(image_tokens=100, audio_tokens=30, video_tokens=500)

    def img(url: str) -> dict:
        return {"type": "image_url", "image_url": {"url": url}}

    text_only = render_chat(tok, [{"role": "user", "content": "What is in these?"}], media=media)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                img("http://x/cat.png"),
                img("http://x/dog.png"),
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}},
            ],
        }
    ]
    r = render_chat(tok, msgs, media=media)
    assert len(r.token_ids) == len(text_only.token_ids) + 100 + 100 + 30 + 500
    assert [m.kind for m in r.media] == ["image", "image", "audio", "video"]
    cat, dog = r.media[0], r.media[1]
    assert cat.mm_hash != dog.mm_hash
    cat_ids = r.token_ids[cat.offset : cat.offset + cat.length]
    dog_ids = r.token_ids[dog.offset : dog.offset + dog.length]
    assert cat_ids != dog_ids
    again = Tokenizer(tok.model_dir).render_chat(msgs, media=media)  # another process, say
    assert again.token_ids == r.token_ids  # same image, same placeholder ids (cacheable)
    assert r.text.count("<|image|>") == 2
    assert all(0 <= t < tok.vocab_size for t in r.token_ids)  # /detokenize accepts them
    assert not set(cat_ids) & tok.model.all_special_ids
    # Markers and items must pair up, as in vLLM.
    with pytest.raises(PromptError, match="more image placeholders than image items"):
        render_chat(tok, [{"role": "user", "content": "typed <|image|>, no image"}])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        ["not a dict"],
        [{"content": "no role"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "hologram"}]}],
        [{"role": "user", "content": [{"type": "text", "text": 1}]}],
    ],
)
def test_render_chat_rejects_bad_shapes(tok: Tokenizer, messages: list) -> None:
    with pytest.raises(PromptError):
        render_chat(tok, messages)


# -- deterministic output -------------------------------------------------------------------------


def test_same_prompt_and_seed_give_same_text_other_seeds_differ(tok: Tokenizer) -> None:
    a = gen(tok, "What is the capital of France?")
    assert gen(tok, "What is the capital of France?") == a
    assert gen(tok, "What is the capital of France?", seed=1).text != a.text
    assert gen(tok, "What is the capital of France?", SamplingSpec(seed=7)).text != a.text
    assert gen(tok, "What is the capital of France?", index=1).text != a.text
    assert gen(tok, "What is the capital of Spain?").text != a.text
    assert a.finish_reason == "stop"
    assert MIN_NATURAL_TOKENS <= a.num_tokens <= MAX_NATURAL_TOKENS
    assert a.text == "".join(a.pieces) and not a.text.startswith(" ")


def test_natural_lengths_spread_over_the_range(tok: Tokenizer) -> None:
    lengths = {gen(tok, f"prompt number {i}").num_tokens for i in range(200)}
    assert min(lengths) >= MIN_NATURAL_TOKENS and max(lengths) <= MAX_NATURAL_TOKENS
    assert len(lengths) > 30


def test_max_tokens_caps_with_finish_length_and_keeps_the_prefix(tok: Tokenizer) -> None:
    full = gen(tok, "Count to ten")
    capped = gen(tok, "Count to ten", SamplingSpec(max_tokens=3))
    assert capped.num_tokens == 3 and capped.finish_reason == "length"
    assert capped.token_ids == full.token_ids[:3]
    assert full.text.startswith(capped.text)
    roomy = gen(tok, "Count to ten", SamplingSpec(max_tokens=1000))
    assert roomy == full


def test_ignore_eos_and_min_tokens_force_length(tok: Tokenizer) -> None:
    c = gen(tok, "hi", SamplingSpec(max_tokens=200, ignore_eos=True))
    assert c.num_tokens == 200 and c.finish_reason == "length"
    c = gen(tok, "hi", SamplingSpec(min_tokens=100, max_tokens=150))
    assert c.num_tokens == 100 and c.finish_reason == "stop"
    prompt = tok.encode("hi")
    c = generate(
        prompt, SamplingSpec(ignore_eos=True), engine_seed=0, max_model_len=64, vocab=tok.output
    )
    assert c.num_tokens == 64 - len(prompt) and c.finish_reason == "length"


def test_stop_strings_truncate_and_report_the_stop(tok: Tokenizer) -> None:
    full = gen(tok, "Tell me a story")
    word = full.pieces[3].strip()
    assert word
    c = gen(tok, "Tell me a story", SamplingSpec(stop=("zzz-never", word)))
    assert c.finish_reason == "stop" and c.stop_reason == word
    assert c.text == full.text[: full.text.index(word)]
    assert c.num_tokens <= 4
    inc = gen(tok, "Tell me a story", SamplingSpec(stop=(word,), include_stop_str_in_output=True))
    assert inc.text == full.text[: full.text.index(word) + len(word)]


def test_stop_token_ids_and_min_tokens_defer_stops(tok: Tokenizer) -> None:
    full = gen(tok, "Tell me a story")
    target = full.token_ids[2]
    c = gen(tok, "Tell me a story", SamplingSpec(stop_token_ids=(target,)))
    assert c.num_tokens == full.token_ids.index(target) + 1
    assert c.stop_reason == target and c.finish_reason == "stop"
    # before min_tokens no stop condition applies
    first_word = full.pieces[0]
    eager = gen(tok, "Tell me a story", SamplingSpec(stop=(first_word,)))
    assert eager.num_tokens == 1 and eager.text == ""
    deferred = gen(tok, "Tell me a story", SamplingSpec(stop=(first_word,), min_tokens=5))
    assert deferred.num_tokens >= 5 and deferred.text.startswith(first_word)


# -- timing model ---------------------------------------------------------------------------------


def test_timing_model_numbers() -> None:
    t = TimingModel()
    assert t.prefill_s(1000) == pytest.approx(0.002 + 0.1)
    assert t.prefill_s(0) == pytest.approx(0.002)
    assert t.decode_s(1) == pytest.approx(0.0081)
    assert t.decode_s(100) == pytest.approx(0.018)
    assert t.decode_s(1, slow=3.0) == pytest.approx(0.0243)
    fast = TimingModel(speed=100)
    assert fast.prefill_s(1000) == pytest.approx(0.00102)
    inf = TimingModel(speed=math.inf)
    assert inf.instant and inf.prefill_s(10**6, slow=10) == 0.0 and inf.decode_s(256) == 0.0


# -- prefix cache ---------------------------------------------------------------------------------


def test_prefix_cache_hits_on_repeats_and_never_caches_the_last_token() -> None:
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    prompt = list(range(1000, 1050))  # 50 tokens: 3 full blocks
    assert cache.lookup(prompt) == 0
    cache.insert(prompt)
    assert cache.lookup(prompt) == 48
    assert cache.lookup(prompt[:48]) == 32  # 48 tokens: (48 - 1) // 16 = 2 usable blocks
    longer = [*prompt[:40], 7, 7, 7]
    assert cache.lookup(longer) == 32  # shares two blocks, third differs
    assert cache.lookup([5, *prompt[1:]]) == 0  # chained: a changed first block misses all
    assert cache.queries == 50 + 50 + 48 + 43 + 50
    assert cache.hits == 48 + 32 + 32


def test_prefix_cache_evicts_least_recently_used() -> None:
    cache = PrefixCache(capacity_blocks=4, block_size=4)
    a, b, c = ([x] * 9 for x in (10, 20, 30))  # two full blocks each
    cache.insert(a)
    cache.insert(b)
    assert len(cache) == 4
    assert cache.lookup(a) == 8  # touch a: b is now least recently used
    cache.insert(c)
    assert len(cache) == 4 and cache.evictions == 2
    assert cache.lookup(a) == 8
    assert cache.lookup(b) == 0
    assert cache.lookup(c) == 8


def test_block_hashes_are_chained() -> None:
    h1 = block_hashes(list(range(32)), 16)
    h2 = block_hashes([*range(16), *range(100, 116)], 16)
    assert len(h1) == 2 and h1[0] == h2[0] and h1[1] != h2[1]
    assert block_hashes(list(range(15)), 16) == []


# -- accounting -----------------------------------------------------------------------------------


def test_tickets_track_queue_running_kv_and_release_on_every_path(
    tok: Tokenizer, model_dir: Path
) -> None:
    engine = Engine(EngineConfig(kv_blocks=100, block_size=16, model_dir=str(model_dir)))
    assert engine.tokenizer is tok and engine.max_model_len == model_files.MAX_MODEL_LEN
    prompt = tok.encode("word " * 40)
    t1 = engine.submit(len(prompt))
    t2 = engine.submit(len(prompt))
    assert (engine.waiting, engine.running) == (2, 0)
    t1.admit(24)
    assert (engine.waiting, engine.running) == (1, 1)
    assert engine.kv_cache_usage == pytest.approx(-(-(len(prompt) + 24) // 16) / 100)
    assert t1.prefill([prompt]) == pytest.approx(0.002 + 0.0001 * len(prompt))
    t1.begin_decode()
    assert engine.decoding == 1
    t2.close(aborted=True)  # left while waiting
    out = engine.generate(prompt, SamplingSpec(max_tokens=24, ignore_eos=True))
    t1.close([out])
    t1.close([out])  # idempotent
    assert (engine.waiting, engine.running, engine.decoding, engine.kv_blocks_in_use) == (
        0,
        0,
        0,
        0,
    )
    assert engine.stats.finished == {"length": 1} and engine.stats.aborted_total == 1
    full = [*prompt, *out.token_ids]
    assert engine.cache.lookup(full) == (len(full) - 1) // 16 * 16  # output blocks cached too
    t3 = engine.submit(len(prompt))
    t3.admit(0)
    t3.prefill([prompt])
    assert t3.cached_tokens == (len(prompt) - 1) // 16 * 16
    t3.close(aborted=True)
    text = render_metrics(engine, "m")
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        'vllm:request_success_total{model_name="m",engine="0",finished_reason="length"} 1.0',
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert name in text


# -- faults ---------------------------------------------------------------------------------------


def test_fault_error_rate_is_seeded_and_updates_validate() -> None:
    a = FaultInjector(Faults(error_rate=0.3), seed=1)
    b = FaultInjector(Faults(error_rate=0.3), seed=1)
    draws = [a.should_error() for _ in range(200)]
    assert draws == [b.should_error() for _ in range(200)]
    assert 30 < sum(draws) < 90
    a.update({"error_rate": 0.0, "flap_health": True})
    assert not any(a.should_error() for _ in range(50))
    assert [a.health_ok() for _ in range(4)] == [True, False, True, False]
    with pytest.raises(ValueError):
        a.update({"error_rate": 2})
    with pytest.raises(ValueError):
        a.update({"no_such_fault": 1})
    a.reset()
    assert a.faults == Faults(error_rate=0.3)
    with pytest.raises(ValueError):
        Faults(slow=0)


def test_the_timing_flag_sets_the_models_coefficients() -> None:
    """``--timing c=0.002,d=0.004``: a decode step of 2 ms plus 4 ms per running request (what
    the planner's tests and benchmark use), the other coefficients as they were."""
    import pytest

    from lmgw.simulators.worker import build_parser, options_from_args

    ns = build_parser().parse_args(["--timing", "c=0.002,d=0.004", "--speed", "2"])
    timing = options_from_args(ns, as_process=False).engine_config().timing
    assert (timing.c, timing.d, timing.a) == (0.002, 0.004, 0.002)
    assert timing.decode_s(5) == pytest.approx((0.002 + 0.004 * 5) / 2)
    for bad in ("z=1", "c=-1", "c", "d=fast"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--timing", bad])
