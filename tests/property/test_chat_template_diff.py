"""Differential test: lmgw's ChatTemplate + ModelTokenizer against transformers'
``apply_chat_template`` (tokenizer only, no torch) on hypothesis-generated conversations.

Three real-world template styles are written here by hand (ChatML with tools, Llama-3 with a
header per turn and tools in the system turn, Mistral with [INST] and its alternation
``raise_exception``) and run over one byte-level BPE trained in the test. For every conversation
both sides must agree on the text, on the token ids (through the inline and the off-loop encode
paths, with and without the segment cache), and on whether it is an error at all. vLLM's request
layer (OpenAI-shaped messages with JSON-string tool arguments and list-of-text content) is
checked against transformers run on the conversation vLLM would build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmgw.text import ChatTemplate, ChatTemplateError, ModelTokenizer

transformers = pytest.importorskip("transformers")

CHATML = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\\n\\n# Tools\\n\\nFunction signatures:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}{{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function %}
            {{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = '26 Jul 2024' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools is not none %}
    {{- 'Environment: ipython\\n' }}
{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}
{%- if tools is not none %}
    {{- 'You have access to these functions. '
        + 'Reply with JSON {"name": ..., "parameters": ...}.\\n\\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- '\\n\\n' }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- '<|eot_id|>' }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
        {{- message.content | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception('This model only supports single tool-calls at once!') }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
        {%- if message.content is mapping
            or (message.content is iterable and message.content is not string) %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must '
                            + 'alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and tools is not none %}
            {{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- if message.tool_calls is defined %}
            {{- '[TOOL_CALLS] '
                + (message.tool_calls | map(attribute='function') | list | tojson) + eos_token }}
        {%- else %}
            {{- ' ' + message['content'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception '
                            + 'of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

SPECIALS = (
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
)


@dataclass(frozen=True)
class Style:
    name: str
    template: str
    specials: dict[str, str]


STYLES = {
    "chatml": Style("chatml", CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}),
    "llama3": Style(
        "llama3", LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    ),
    "mistral": Style("mistral", MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}),
}

_CORPUS = [
    "You are a helpful assistant. What is the weather in Paris today? It is sunny.",
    'Function signatures: {"name": "get_weather", "parameters": {"city": "Paris"}}',
    "user assistant system tool ipython Environment: Today Date: 26 Jul 2024",
    "Héllo wörld, naïve café. 日本語 テキスト. Привет. 😀 👍🏽\n\ttabs and  spaces\r\n",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.add_tokens([AddedToken("<tool_call>", normalized=False)])
    return tok


@dataclass
class Pair:
    ours: ModelTokenizer
    cached: ModelTokenizer  # the same, with every stretch between special tokens cached
    template: ChatTemplate
    hf: Any


@pytest.fixture(scope="module")
def pairs(bpe: Tokenizer) -> dict[str, Pair]:
    out = {}
    for style in STYLES.values():
        ours = ModelTokenizer(
            Tokenizer.from_str(bpe.to_str()),
            special_tokens_map=style.specials,
            offload_threshold_chars=64,  # long conversations exercise the off-loop path
            prefix_cache_chars=0,
        )
        cached = ModelTokenizer(
            Tokenizer.from_str(bpe.to_str()),
            special_tokens_map=style.specials,
            offload_threshold_chars=64,
            prefix_cache_min_chars=1,
            prefix_cache_chars=4096,
        )
        assert cached.prefix_cache_off_reason is None
        template = ChatTemplate(style.template, special_tokens=ours.special_tokens_map)
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(bpe.to_str()),
            chat_template=style.template,
            **style.specials,
        )
        out[style.name] = Pair(ours, cached, template, hf)
    return out


# -- strategies -----------------------------------------------------------------------------------

_FRAGMENTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.sampled_from(
        ["<|im_end|>", "[INST]", "</s>", "<tool_call>", "{{ x }}", " ", "  ", "\n", "\t", "é", "😀"]
    ),
)
TEXT = st.lists(_FRAGMENTS, max_size=6).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
NAMES = st.sampled_from(["get_weather", "search", "calc"])


@st.composite
def tool_calls(draw: st.DrawFn) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {
                "name": draw(NAMES),
                "arguments": draw(st.dictionaries(st.sampled_from("abc"), JSON_VALUES, max_size=3)),
            },
        }
        for i in range(draw(st.integers(1, 2)))
    ]


@st.composite
def messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Mostly well-formed chats (system?, user/assistant turns, tool calls and results), with
    enough odd orders that templates' raise_exception paths run too."""
    out: list[dict[str, Any]] = []
    if draw(st.booleans()):
        out.append({"role": "system", "content": draw(TEXT)})
    turns = draw(st.integers(1, 5))
    role = "user"
    for _ in range(turns):
        if draw(st.integers(0, 9)) == 0:
            role = draw(st.sampled_from(["user", "assistant", "tool", "system"]))
        if role == "assistant" and draw(st.integers(0, 3)) == 0:
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": draw(st.none() | TEXT),
                "tool_calls": draw(tool_calls()),
            }
            out.append(msg)
            out.append({"role": "tool", "content": draw(TEXT), "tool_call_id": "call_0"})
            role = "user" if draw(st.booleans()) else "assistant"
            continue
        msg = {"role": role, "content": draw(TEXT)}
        if role == "assistant" and draw(st.integers(0, 4)) == 0:
            msg["reasoning_content"] = draw(TEXT)
        out.append(msg)
        role = {"user": "assistant", "assistant": "user"}.get(role, "user")
    return out


TOOLS = st.none() | st.lists(
    st.builds(
        lambda name, desc: {
            "type": "function",
            "function": {
                "name": name,
                "description": desc,
                "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        },
        NAMES,
        TEXT,
    ),
    min_size=1,
    max_size=2,
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    msgs = draw(messages())
    continue_final = msgs[-1]["role"] == "assistant" and draw(st.booleans())
    return {
        "messages": msgs,
        "tools": draw(TOOLS),
        "add_generation_prompt": (not continue_final) and draw(st.booleans()),
        "continue_final_message": continue_final,
    }


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except ChatTemplateError as exc:
        return "error", exc.message
    except (jinja2.TemplateError, ValueError, TypeError) as exc:  # transformers' errors
        return "error", str(exc)


async def _assert_same(pair: Pair, req: dict[str, Any]) -> None:
    args = {k: v for k, v in req.items() if k != "messages"}
    ours = _outcome(lambda: pair.template.apply(req["messages"], **args))
    theirs = _outcome(lambda: pair.hf.apply_chat_template(req["messages"], tokenize=False, **args))
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "error":
        if "alternate" in theirs[1] or "supported" in theirs[1]:  # the template's own message
            assert theirs[1] in ours[1]
        return
    assert ours[1] == theirs[1]
    hf_ids = pair.hf.apply_chat_template(req["messages"], tokenize=True, return_dict=False, **args)
    for tok in (pair.ours, pair.cached):
        assert tok.encode(ours[1], add_special_tokens=False) == list(hf_ids)
        assert await tok.encode_async(ours[1], add_special_tokens=False) == list(hf_ids)


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("style", sorted(STYLES))
@SETTINGS
@given(req=requests())
async def test_apply_matches_transformers(pairs: dict[str, Pair], style: str, req: dict) -> None:
    await _assert_same(pairs[style], req)


def _openai_shape(msgs: list[dict[str, Any]], split: list[bool]) -> list[dict[str, Any]]:
    """What a client sends: tool arguments as JSON strings, some content as text parts."""
    out = []
    for msg, as_parts in zip(msgs, split, strict=True):
        msg = dict(msg)
        if "tool_calls" in msg:
            msg["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": json.dumps(c["function"]["arguments"]),
                    },
                }
                for c in msg["tool_calls"]
            ]
        if as_parts and isinstance(msg.get("content"), str):
            content = msg["content"]
            cut = len(content) // 2
            msg["content"] = [
                {"type": "text", "text": content[:cut]},
                {"type": "text", "text": content[cut:]},
            ]
        out.append(msg)
    return out


def _vllm_conversation(msgs: list[dict[str, Any]], split: list[bool]) -> list[dict[str, Any]]:
    """The conversation vLLM builds (an independent model of it, for string-content templates)."""
    out = []
    for msg, as_parts in zip(msgs, split, strict=True):
        content = msg.get("content")
        if content is None:
            content = ""
        elif as_parts:
            cut = len(content) // 2
            content = f"{content[:cut]}\n{content[cut:]}"
        conv = {"role": msg["role"], "content": content}
        if msg.get("tool_calls"):
            conv["tool_calls"] = msg["tool_calls"]
        if msg["role"] == "tool" and "tool_call_id" in msg:
            conv["tool_call_id"] = msg["tool_call_id"]
        out.append(conv)
    return out


@pytest.mark.parametrize("style", sorted(STYLES))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests(), data=st.data())
def test_render_is_vllm_then_transformers(
    pairs: dict[str, Pair], style: str, req: dict, data: st.DataObject
) -> None:
    pair = pairs[style]
    msgs = [m for m in req["messages"] if "reasoning_content" not in m]
    if not msgs:
        return
    split = data.draw(st.lists(st.booleans(), min_size=len(msgs), max_size=len(msgs)))
    args = {k: v for k, v in req.items() if k != "messages"}
    ours = _outcome(lambda: pair.template.render(_openai_shape(msgs, split), **args))
    if args["tools"] is not None:  # vLLM dumps its tool models: every declared field is there
        args["tools"] = [
            {**t, "function": {**t["function"], "strict": None}} for t in args["tools"]
        ]
    theirs = _outcome(
        lambda: pair.hf.apply_chat_template(_vllm_conversation(msgs, split), tokenize=False, **args)
    )
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "ok":
        assert ours[1] == theirs[1]


# -- fixed cases: errors, kwargs, and loading the same folder both ways ---------------------------


def test_mistral_alternation_error_is_the_templates_message(pairs: dict[str, Pair]) -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError) as theirs:
        pairs["mistral"].hf.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(ChatTemplateError) as ours:
        pairs["mistral"].template.render(msgs)
    assert str(theirs.value) in ours.value.message and ours.value.status == 400


def test_template_kwargs_match_transformers(pairs: dict[str, Pair]) -> None:
    pair = pairs["llama3"]
    msgs = [{"role": "user", "content": "hi"}]
    expected = pair.hf.apply_chat_template(msgs, tokenize=False, date_string="1 Jan 2030")
    assert pair.template.apply(msgs, date_string="1 Jan 2030") == expected
    got = pair.template.render(msgs, chat_template_kwargs={"date_string": "1 Jan 2030", "x": 1})
    assert got == expected


@pytest.mark.parametrize("style", sorted(STYLES))
def test_saved_folder_loads_the_same_both_ways(
    pairs: dict[str, Pair], style: str, tmp_path: Path
) -> None:
    pairs[style].hf.save_pretrained(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = ModelTokenizer.load(tmp_path)
    template = ChatTemplate.load(tmp_path, special_tokens=ours.special_tokens_map)
    assert dict(ours.special_tokens_map) == hf.special_tokens_map
    msgs = [
        {"role": "system", "content": "Be brief.  "},
        {"role": "user", "content": "Héllo <|im_end|> [INST] 😀\n\tok"},
        {"role": "assistant", "content": " sure "},
        {"role": "user", "content": "again"},
    ]
    text = template.apply(msgs, add_generation_prompt=True)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text, add_special_tokens=False) == list(
        hf.apply_chat_template(msgs, tokenize=True, return_dict=False, add_generation_prompt=True)
    )
    assert ours.encode(text) == hf.encode(text)
