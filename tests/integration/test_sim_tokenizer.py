"""The simulated worker tokenizes exactly as the gateway does with the same model folder: its
``/tokenize`` equals ``lmgw.text`` (``ChatTemplate`` + ``ModelTokenizer``) on the parity probes
and on other request shapes, ``/detokenize`` inverts it, and the prompt tokens a generation
request reports are the ones ``/tokenize`` gives. Then the gateway's own parity self-test run
against a simulated worker, and ``lmgw simulate``'s fleet handing its folder to the gateway."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from gateway_support import RawResponse, http_request

from lmgw.config import ModelConfig
from lmgw.fleetspec import FleetSpec
from lmgw.simulate import fleet_config
from lmgw.simulators import (
    Fleet,
    SimWorker,
    WorkerOptions,
    model_files,
    run_fleet,
    serve_worker_inprocess,
)
from lmgw.text import (
    ChatTemplate,
    ModelTokenizer,
    build_probes,
    compare_tokens,
    parse_tokenize_response,
    summarize,
)

MODEL = "sim-model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_files.ensure_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[ModelTokenizer, ChatTemplate]:
    """The gateway's side: its own code on the folder, loaded the way the gateway loads it."""
    tok = ModelTokenizer.load(model_dir)
    return tok, ChatTemplate.load(model_dir, special_tokens=tok.special_tokens_map)


async def start(nursery: trio.Nursery, **options: Any) -> tuple[SimWorker, str]:
    options.setdefault("speed", math.inf)
    worker = SimWorker(WorkerOptions(model=MODEL, **options))
    return worker, await nursery.start(serve_worker_inprocess, worker)


@pytest.fixture
async def sim(nursery: trio.Nursery, model_dir: Path) -> tuple[SimWorker, str]:
    return await start(nursery, model_dir=str(model_dir))


async def post(url: str, path: str, body: Any) -> RawResponse:
    return await http_request(url, "POST", path, body)


async def tokenize(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await post(url, "/tokenize", {"model": MODEL, **body})
    assert r.status == 200, r.body
    return r.json()


# -- parity ---------------------------------------------------------------------------------------


async def check_probes(url: str, tok: ModelTokenizer, template: ChatTemplate) -> None:
    verdicts = []
    for probe in build_probes(tok):
        r = await post(url, "/tokenize", probe.tokenize_body(MODEL))
        assert r.status == 200, r.body
        theirs = parse_tokenize_response(r.body)
        ours = probe.gateway_tokens(tok, template)
        verdicts.append(
            compare_tokens(probe.name, ours, theirs, token_strs=tok.convert_ids_to_tokens)
        )
    assert [v.status for v in verdicts] == ["match"] * 3, [v.reason for v in verdicts]
    report = summarize(verdicts)
    assert report.safe, report.reason


async def test_tokenize_matches_the_gateway_on_the_parity_probes(
    sim: tuple[SimWorker, str], reference: tuple[ModelTokenizer, ChatTemplate]
) -> None:
    _, url = sim
    tok, template = reference
    await check_probes(url, tok, template)
    # The probes exercise what they should: BOS from the post-processor, typed special tokens.
    text_probe = build_probes(tok)[2]
    ids = (await tokenize(url, text_probe.tokenize_body(MODEL)))["tokens"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.token_to_id("<|im_start|>")) == 1  # typed by the "user"


async def test_default_worker_uses_the_per_user_sim_model(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    worker, url = await start(nursery)  # no model_dir: built on first use
    folder = tmp_path / "cache" / "lmgw" / f"sim-model-v{model_files.BUILD_VERSION}"
    assert worker.engine.tokenizer.model_dir == folder and (folder / "tokenizer.json").is_file()
    tok = ModelTokenizer.load(folder)
    await check_probes(url, tok, ChatTemplate.load(folder, special_tokens=tok.special_tokens_map))


CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hi there!"}]},
    {"messages": [{"role": "user", "content": "Hi there!"}], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "Hi"}], "add_special_tokens": True},
    {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You call tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "24 C, sunny"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    },
    {
        "messages": [
            {"role": "user", "content": "Finish this: the quick brown"},
            {"role": "assistant", "content": "fox jumps"},
        ],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
]


@pytest.mark.parametrize("body", CHATS, ids=range(len(CHATS)))
async def test_tokenize_chat_forms_match_the_gateway(
    sim: tuple[SimWorker, str], reference: tuple[ModelTokenizer, ChatTemplate], body: dict
) -> None:
    _, url = sim
    tok, template = reference
    text = template.render(
        body["messages"],
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        tools=body.get("tools"),
    )
    want = tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))
    got = await tokenize(url, {**body, "return_token_strs": True})
    assert got["tokens"] == want
    assert got["count"] == len(want)
    assert got["max_model_len"] == model_files.MAX_MODEL_LEN
    assert got["token_strs"] == tok.convert_ids_to_tokens(want)
    detok = (await post(url, "/detokenize", {"model": MODEL, "tokens": got["tokens"]})).json()
    assert detok == {"prompt": tok.decode(want)}
    if not body.get("add_special_tokens"):
        assert detok["prompt"] == text  # the rendered template, special tokens included


@pytest.mark.parametrize("special", [None, True, False])
async def test_tokenize_prompt_and_detokenize_round_trip(
    sim: tuple[SimWorker, str], reference: tuple[ModelTokenizer, ChatTemplate], special: Any
) -> None:
    _, url = sim
    tok, _ = reference
    text = "  Héllo, wörld! 日本語 👨\u200d👩\u200d👧\r\n\tcode: x = 42  "
    body: dict[str, Any] = {"prompt": text}
    if special is not None:
        body["add_special_tokens"] = special
    got = await tokenize(url, body)
    want = tok.encode(text, add_special_tokens=special is not False)  # vLLM's default: True
    assert got["tokens"] == want and got["token_strs"] is None
    detok = (await post(url, "/detokenize", {"tokens": got["tokens"]})).json()["prompt"]
    assert detok == (text if special is False else model_files.BOS + text)


async def test_max_model_len_option_overrides_the_folder(
    nursery: trio.Nursery, model_dir: Path
) -> None:
    _, url = await start(nursery, model_dir=str(model_dir), max_model_len=64)
    assert (await tokenize(url, {"prompt": "x"}))["max_model_len"] == 64
    models = (await http_request(url, "GET", "/v1/models")).json()
    assert models["data"][0]["max_model_len"] == 64
    r = await post(url, "/v1/completions", {"prompt": "word " * 80})
    assert r.status == 400 and "maximum context length is 64" in r.json()["error"]["message"]


# -- generation requests count the same tokens ----------------------------------------------------


async def test_chat_usage_counts_what_tokenize_gives(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    for body in CHATS:
        count = (await tokenize(url, body))["count"]
        r = await post(url, "/v1/chat/completions", {"model": MODEL, **body, "max_tokens": 5})
        assert r.status == 200, r.body
        assert r.json()["usage"]["prompt_tokens"] == count
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        events = (await post(url, "/v1/chat/completions", {"model": MODEL, **stream})).events()
        usage = events[-2]["usage"]
        tokens = [e for e in events[1:-3] if e["choices"][0]["delta"].get("content")]
        assert usage["prompt_tokens"] == count
        assert usage["completion_tokens"] == len(tokens)  # one token per streamed event


async def test_completion_usage_counts_what_tokenize_gives(sim: tuple[SimWorker, str]) -> None:
    _, url = sim
    prompts = ["Once upon a time", "  two\n\nlines  "]
    counts = [(await tokenize(url, {"prompt": p}))["count"] for p in prompts]
    r = await post(url, "/v1/completions", {"prompt": prompts, "max_tokens": 3})
    assert r.json()["usage"]["prompt_tokens"] == sum(counts)
    no_bos = {"prompt": prompts[0], "add_special_tokens": False, "max_tokens": 3}
    r = await post(url, "/v1/completions", no_bos)
    assert r.json()["usage"]["prompt_tokens"] == counts[0] - 1
    ids = (await tokenize(url, {"prompt": prompts[0]}))["tokens"]
    by_ids = (await post(url, "/v1/completions", {"prompt": ids, "max_tokens": 3})).json()
    by_text = (await post(url, "/v1/completions", {"prompt": prompts[0], "max_tokens": 3})).json()
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


async def test_media_placeholders_count_in_tokenize_and_usage(sim: tuple[SimWorker, str]) -> None:
    worker, url = sim
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    text = {"type": "text", "text": "What is this?"}
    plain = (await tokenize(url, {"messages": [{"role": "user", "content": [text]}]}))["count"]
    body = {"messages": [{"role": "user", "content": [text, image]}]}
    got = await tokenize(url, body)
    per_image = worker.engine.config.media.image_tokens
    assert got["count"] == plain + per_image  # the marker token becomes the item's placeholders
    r = await post(url, "/v1/chat/completions", {"model": MODEL, **body, "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] == got["count"]
    detok = await post(url, "/detokenize", {"tokens": got["tokens"]})
    assert detok.status == 200  # placeholder ids are ordinary vocabulary ids
    other = {
        "messages": [{"role": "user", "content": [text, {**image, "image_url": {"url": "x"}}]}]
    }
    assert (await tokenize(url, other))["tokens"] != got["tokens"]  # keyed by content
    typed = {"messages": [{"role": "user", "content": "<|image|> but no image"}]}
    r = await post(url, "/tokenize", {"model": MODEL, **typed})
    assert r.status == 400 and "placeholders" in r.json()["error"]["message"]


async def test_continuation_continues_exactly(sim: tuple[SimWorker, str]) -> None:
    """continue_final_message on a prefix of this model's own answer gives the rest of it."""
    _, url = sim
    msgs = [{"role": "user", "content": "Tell me a story about the sea."}]
    full = (await post(url, "/v1/chat/completions", {"messages": msgs})).json()
    answer = full["choices"][0]["message"]["content"]
    words = answer.split(" ")
    partial = " ".join(words[:3])
    cont = {
        "messages": [*msgs, {"role": "assistant", "content": partial}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    rest = (await post(url, "/v1/chat/completions", cont)).json()
    assert partial + rest["choices"][0]["message"]["content"] == answer
    # the answer's text re-tokenizes to its own tokens, so the two parts add up
    said = (await tokenize(url, {"prompt": partial, "add_special_tokens": False}))["count"]
    assert rest["usage"]["completion_tokens"] + said == full["usage"]["completion_tokens"]


# -- the gateway's parity self-test against simulated workers --------------------------------------


async def test_gateway_parity_self_test_passes_against_the_simulator(
    nursery: trio.Nursery, sim_worker: Any, model_dir: Path
) -> None:
    from lmgw.config import GatewayConfig, HealthConfig, ServerConfig, WorkerConfig
    from lmgw.gateway import Gateway

    sim = await sim_worker(model_dir=str(model_dir))
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, tokenizer=str(model_dir))],
        workers=[WorkerConfig(url=sim.url, role="pd", id="w0")],
    )
    port = await nursery.start(Gateway(cfg).run)
    gw = f"http://127.0.0.1:{port}"
    sample = f'lmgw_tokenizer_parity{{model="{MODEL}",worker="w0"}}'
    with trio.fail_after(10):
        while True:
            metrics = (await http_request(gw, "GET", "/metrics")).body.decode()
            line = next((ln for ln in metrics.splitlines() if ln.startswith(sample)), None)
            if line is not None:
                break
            await trio.sleep(0.02)
    assert float(line.rsplit(" ", 1)[1]) == 1.0, line
    # and the gateway's own /tokenize agrees with the worker's
    body = {"model": MODEL, "messages": CHATS[4]["messages"], "tools": CHATS[4]["tools"]}
    ours = (await post(gw, "/tokenize", body)).json()["tokens"]
    assert ours == (await post(sim.url, "/tokenize", body)).json()["tokens"]


# -- lmgw simulate: one folder for the fleet and the gateway --------------------------------------


def test_fleet_config_gives_the_gateway_the_fleets_folder(model_dir: Path) -> None:
    fleet = Fleet()
    fleet.model_dir = model_dir
    args = argparse.Namespace(host="127.0.0.1", port=0, model=MODEL)
    (model,) = fleet_config(fleet, FleetSpec(pd=1), args).models
    if "tokenizer" in ModelConfig.__struct_fields__:
        assert model.tokenizer == str(model_dir)  # type: ignore[attr-defined]
    assert model.name == MODEL


def test_fleet_config_takes_the_simulate_flags(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lmgw simulate --hedge --coalesce`: the gateway config says so; the simulation's admin
    API takes $LMGW_ADMIN_TOKEN, else local clients."""
    fleet = Fleet()
    fleet.model_dir = model_dir
    args = argparse.Namespace(
        host="127.0.0.1", port=0, model=MODEL, hedge=True, coalesce=True, enable_lora=True
    )
    monkeypatch.delenv("LMGW_ADMIN_TOKEN", raising=False)
    cfg = fleet_config(fleet, FleetSpec(pd=1), args)
    assert cfg.hedging.enabled and cfg.streams.coalesce and not cfg.streams.resumable
    assert cfg.routing.lora_affinity
    assert cfg.admin.token is None and cfg.admin.allow_unauthenticated_localhost
    monkeypatch.setenv("LMGW_ADMIN_TOKEN", "t0ken")
    cfg = fleet_config(fleet, FleetSpec(pd=1), argparse.Namespace(host="h", port=0, model=MODEL))
    assert not cfg.hedging.enabled and not cfg.streams.coalesce
    assert not cfg.routing.lora_affinity
    assert cfg.admin.token == "t0ken" and not cfg.admin.allow_unauthenticated_localhost


def test_fleet_config_takes_the_local_prefill_flags(model_dir: Path) -> None:
    """`lmgw simulate --workers 1p2d --dialect vllm-nixl --local-prefill-tokens 64
    --local-prefill-busy 3`: conditional disaggregation, both arms, in the gateway config."""
    fleet = Fleet()
    fleet.model_dir = model_dir
    args = argparse.Namespace(
        host="127.0.0.1", port=0, model=MODEL, dialect="vllm-nixl",
        local_prefill_tokens=64, local_prefill_busy=3,
    )  # fmt: skip
    (model,) = fleet_config(fleet, FleetSpec(p=1, d=2), args).models
    assert (model.local_prefill_tokens, model.local_prefill_busy) == (64, 3)


@pytest.mark.slow
async def test_process_fleet_shares_one_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fleet: Fleet = await nursery.start(
                lambda task_status: run_fleet(
                    {"pd": 2}, model=MODEL, speed=math.inf, task_status=task_status
                )
            )
            folder = fleet.model_dir
            assert folder == tmp_path / "cache" / "lmgw" / f"sim-model-v{model_files.BUILD_VERSION}"
            tok = ModelTokenizer.load(folder)
            template = ChatTemplate.load(folder, special_tokens=tok.special_tokens_map)
            for url in fleet.urls():
                await check_probes(url, tok, template)
            nursery.cancel_scope.cancel()
    # only the published folder is left: no half-written temporary copies
    assert sorted(p.name for p in (tmp_path / "cache" / "lmgw").iterdir()) == [folder.name]


def test_tokenize_request_body_shapes_are_vllms() -> None:
    """The probe bodies the gateway sends decode as this simulator's request (no extra fields
    required, unknown ones ignored)."""
    from lmgw.simulators.app import TokenizeRequest

    for probe in build_probes():
        body = msgspec.json.encode({**probe.tokenize_body(MODEL), "unknown_field": 1})
        req = msgspec.json.decode(body, type=TokenizeRequest)
        assert req.add_special_tokens is probe.add_special_tokens
