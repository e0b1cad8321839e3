"""ChatTemplate: the sandbox and HF's globals, loading and selection rules, vLLM's request
normalisation (content formats, tool calls, developer role, kwargs), continue_final_message, and
the typed errors the gateway turns into 400s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmgw.simulators import model_files
from lmgw.text import (
    ChatTemplate,
    ChatTemplateConfigError,
    ChatTemplateError,
    ModelTokenizer,
    normalize_messages,
)
from lmgw.text.chat_template import detect_content_format, make_environment, normalize_tools

# A minimal string-content template that shows every message key it gets.
SHOW = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for k in m | sort %}{% if k not in ('role', 'content') %}<{{ k }}={{ m[k] | tojson }}>"
    "{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
OPENAI = (
    "{% for m in messages %}[{{ m.role }}]"
    "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% else %}<{{ p.type }}>"
    "{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- sandbox and globals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(_secret=1) %}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
    ],
)
def test_sandbox_refuses_unsafe_templates(source: str) -> None:
    with pytest.raises(ChatTemplateError) as err:
        ChatTemplate(source).apply([user("hi")])
    assert err.value.status == 400


def test_raise_exception_becomes_a_400_with_the_templates_message() -> None:
    tpl = ChatTemplate("{{ raise_exception('Roles must alternate user/assistant') }}")
    with pytest.raises(ChatTemplateError, match="Roles must alternate") as err:
        tpl.apply([user("hi")])
    assert err.value.status == 400 and err.value.param == "messages"


def test_tojson_has_transformers_semantics() -> None:
    tpl = ChatTemplate(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}|"
        "{{ x | tojson(ensure_ascii=true) }}|{{ x | tojson(separators=(',', ':')) }}"
    )
    x = {"b": "<a&'é>", "a": [1]}
    assert tpl.apply([user("")], x=x) == "|".join(
        [
            json.dumps(x, ensure_ascii=False),
            json.dumps(x, ensure_ascii=False, indent=2),
            json.dumps(x, ensure_ascii=False, sort_keys=True),
            json.dumps(x),
            json.dumps(x, ensure_ascii=False, separators=(",", ":")),
        ]
    )


def test_globals_and_extensions() -> None:
    tpl = ChatTemplate(
        "{% set d = dict(a=1) %}{{ d.a }}|{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ strftime_now('%Y') | length }}|"
        "{% generation %}kept{% endgeneration %}"
    )
    assert tpl.apply([user("a"), user("b")]) == "1|1|4|kept"


def test_special_tokens_are_template_variables_and_kwargs_override_them() -> None:
    tpl = ChatTemplate(
        "{{ bos_token }}{{ messages[0].content }}", special_tokens={"bos_token": "<s>"}
    )
    assert tpl.apply([user("hi")]) == "<s>hi"
    assert tpl.apply([user("hi")], bos_token="<B>") == "<B>hi"


def test_none_values_are_dropped_and_reasoning_is_aliased() -> None:
    tpl = ChatTemplate(SHOW)
    out = tpl.apply([{"role": "assistant", "content": "x", "tool_calls": None, "reasoning": "r"}])
    assert out == '[assistant]x<reasoning="r"><reasoning_content="r"><thinking="r">\n'


def test_template_input_is_copied_not_mutated() -> None:
    msgs = [{"role": "assistant", "content": "partial"}]
    before = json.dumps(msgs)
    ChatTemplate(SHOW).apply(msgs, continue_final_message=True)
    assert json.dumps(msgs) == before


# -- loading --------------------------------------------------------------------------------------


def test_syntax_errors_are_config_errors_with_a_line() -> None:
    with pytest.raises(ChatTemplateConfigError, match="line 2"):
        ChatTemplate("ok\n{% if %}")


def test_folder_loading_order(tmp_path: Path) -> None:
    config = {"chat_template": "from-config"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.load(tmp_path).apply([user("")]) == "from-config"
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    assert ChatTemplate.load(tmp_path).apply([user("")]) == "from-jinja"
    (tmp_path / "chat_templates").mkdir()
    (tmp_path / "chat_templates" / "tool_use.jinja").write_text("tools!")
    tpl = ChatTemplate.load(tmp_path)
    assert tpl.names == ("default", "tool_use")
    assert tpl.apply([user("")]) == "from-jinja"
    assert tpl.apply([user("")], tools=[]) == "tools!"  # tools=[] still picks tool_use (HF)
    assert tpl.apply([user("")], template_name="tool_use") == "tools!"
    with pytest.raises(ChatTemplateError, match="unknown chat template"):
        tpl.apply([user("")], template_name="nope")


def test_list_of_named_templates_in_tokenizer_config(tmp_path: Path) -> None:
    named = [{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    tpl = ChatTemplate.load(tmp_path)
    assert tpl.apply([user("")]) == "D" and tpl.render([user("")], template_name="rag") == "R"


def test_several_templates_need_a_default() -> None:
    with pytest.raises(ChatTemplateConfigError, match="none named 'default'"):
        ChatTemplate({"a": "A", "b": "B"})


def test_processor_chat_template_json_is_the_last_fallback(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "P"}))
    assert ChatTemplate.load(tmp_path).apply([user("")]) == "P"


def test_missing_template_and_bad_folders(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ChatTemplateConfigError, match="no chat template"):
        ChatTemplate.load(tmp_path)
    with pytest.raises(ChatTemplateConfigError, match="not found"):
        ChatTemplate.load(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ChatTemplateConfigError, match="cannot read"):
        ChatTemplate.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ChatTemplateConfigError, match="must be a string"):
        ChatTemplate.load(tmp_path)


def test_override_literal_or_path(tmp_path: Path) -> None:
    assert ChatTemplate.load(None, override="{{ 'lit' }}").apply([user("")]) == "lit"
    path = tmp_path / "t.jinja"
    path.write_text("from-file")
    assert ChatTemplate.load(tmp_path, override=str(path)).apply([user("")]) == "from-file"
    assert ChatTemplate.load(None, override=path).apply([user("")]) == "from-file"
    with pytest.raises(ChatTemplateConfigError, match="looks like a path"):
        ChatTemplate.load(None, override="templates/missing.jinja")
    with pytest.raises(ChatTemplateConfigError):
        ChatTemplate.load(None)


# -- content formats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
        ("{% for m in messages %}{% for p in m['content'] %}{% endfor %}{% endfor %}", "openai"),
        (
            "{% for m in messages %}{% for p in m.content | list %}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% set loop_messages = messages[1:] %}{% for m in loop_messages %}"
            "{% for p in m.content %}{% endfor %}{% endfor %}",
            "openai",
        ),
        ("{% for p in content %}{% endfor %}", "openai"),
        ("{% for m in other %}{% for p in m.content %}{% endfor %}{% endfor %}", "string"),
        (model_files.CHAT_TEMPLATE, "openai"),
    ],
)
def test_content_format_detection(source: str, expected: str) -> None:
    assert detect_content_format(make_environment(), source) == expected


def test_string_format_joins_text_and_puts_media_placeholders_first() -> None:
    msgs = [
        user(
            [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "http://x"}},
                "b",
                {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                {"type": "text", "text": None},
            ]
        ),
        user([{"image_url": "http://y"}, {"type": "text", "text": "<img> here"}]),
        user(None),
    ]
    out = normalize_messages(msgs, "string", media_placeholders={"image": "<img>", "audio": "<au>"})
    assert [m["content"] for m in out] == ["<img>\n<au>\na\nb", "<img> here", ""]
    with pytest.raises(ChatTemplateError, match="does not accept video input"):
        normalize_messages([user([{"type": "video_url", "video_url": {"url": "v"}}])], "string")
    with pytest.raises(ChatTemplateError, match="more '<img>' placeholders"):
        normalize_messages(
            [user([{"type": "image_url", "image_url": {"url": "u"}}, "<img><img>"])],
            "string",
            media_placeholders={"image": "<img>"},
        )


def test_openai_format_wraps_parts() -> None:
    out = normalize_messages(
        [
            user("hi"),
            user([{"type": "refusal", "refusal": "no"}, {"type": "video_url"}]),
            user(None),
        ],
        "openai",
    )
    assert [m["content"] for m in out] == [
        [{"type": "text", "text": "hi"}],
        [{"type": "text", "text": "no"}, {"type": "video"}],
        [],
    ]
    tpl = ChatTemplate(OPENAI)
    assert tpl.render([user(["a", {"type": "image_url", "image_url": {"url": "u"}}])]) == (
        "[user]a<image>\n"
    )


@pytest.mark.parametrize(
    ("part", "match"),
    [
        ({"type": "hologram"}, "unsupported content part type 'hologram'"),
        ({"foo": 1}, "missing 'type'"),
        ({"type": 3}, "invalid 'type'"),
        ({"type": "prompt_embeds", "data": "x"}, "not supported"),
        ({"type": "text", "text": 3}, "must be a string"),
        (7, "must be a string or an object"),
    ],
)
def test_bad_parts(part: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        normalize_messages([user([part])], "openai")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hi", "must be a list"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], "role must be a string"),
        ([user(5)], "must be a string, a list of parts or null"),
        ([{"role": "assistant", "tool_calls": [{"id": 1}]}], "with a function"),
    ],
)
def test_bad_messages(messages: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        normalize_messages(messages, "string")


def test_vllm_keeps_only_known_keys_and_parses_tool_arguments() -> None:
    msgs = [
        {"role": "user", "content": "q", "name": "ann", "extra": 1, "task": 3},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "think",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                {"id": "c", "type": "function", "function": {"name": "h"}},
            ],
        },
        {"role": "assistant", "content": "done", "tool_calls": []},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "1"}, "2"]},
        {"role": "developer", "content": "dev", "tools": [{"x": 1}]},
    ]
    out = normalize_messages(msgs, "string")
    assert out[0] == {"role": "user", "content": "q", "name": "ann"}
    args = [c["function"]["arguments"] for c in out[1]["tool_calls"]]
    assert args == [{"x": 1}, {}, {}]
    assert out[1]["reasoning"] == out[1]["reasoning_content"] == "think"
    assert out[2] == {"role": "assistant", "content": "done"}  # empty tool_calls dropped
    assert out[3] == {"role": "tool", "content": "1\n2", "tool_call_id": "a"}
    assert out[4] == {"role": "developer", "content": "dev", "tools": [{"x": 1}]}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # input untouched


def test_developer_becomes_system_unless_the_template_knows_it() -> None:
    msgs = [
        {"role": "system", "content": "s1"},
        user("u"),
        {"role": "developer", "content": [{"type": "text", "text": "d"}]},
    ]
    assert ChatTemplate(SHOW).render(msgs) == "[system]s1\n\nd\n[user]u\n"
    knows = ChatTemplate(SHOW + "{# 'developer' #}")
    assert knows.render(msgs) == "[system]s1\n[user]u\n[developer]d\n"  # tools=None is dropped


# -- kwargs and flags -----------------------------------------------------------------------------


def test_chat_template_kwargs_reach_only_variables_the_template_uses() -> None:
    tpl = ChatTemplate(
        "{{ enable_thinking }}|{{ add_generation_prompt }}", default_kwargs={"enable_thinking": 0}
    )
    assert tpl.render([user("")]) == "0|False"
    out = tpl.render(
        [user("")],
        add_generation_prompt=True,
        chat_template_kwargs={"enable_thinking": 1, "add_generation_prompt": False, "junk": 2},
    )
    assert out == "1|True"  # the request's own field wins over chat_template_kwargs
    for bad in ("tokenize", "chat_template", "messages"):
        with pytest.raises(ChatTemplateError) as err:
            tpl.render([user("")], chat_template_kwargs={bad: 1})
        assert err.value.param == "chat_template_kwargs"


def test_documents_and_tools_from_kwargs_or_arguments() -> None:
    tpl = ChatTemplate("{{ documents | tojson }}|{{ tools | tojson }}")
    docs = [{"title": "t", "text": "x"}]
    assert tpl.render([user("")], chat_template_kwargs={"documents": docs}) == (
        f"{json.dumps(docs)}|null"
    )
    custom = {"type": "custom", "custom": {"name": "grep"}}
    assert tpl.render([user("")], tools=[custom]) == f"null|[{json.dumps(custom)}]"
    for bad in (["f"], [{"function": {}}], "f"):
        with pytest.raises(ChatTemplateError) as err:
            tpl.render([user("")], tools=bad)
        assert err.value.param == "tools"
    with pytest.raises(ChatTemplateError) as err:
        tpl.render([user("")], documents=[1])
    assert err.value.param == "documents"


def test_empty_conversation_and_conflicting_flags() -> None:
    tpl = ChatTemplate(SHOW)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        tpl.render([])
    with pytest.raises(ChatTemplateError, match="Cannot set both") as err:
        tpl.render([user("x")], add_generation_prompt=True, continue_final_message=True)
    assert err.value.param == "continue_final_message"


def test_continue_final_message_cuts_after_the_final_text() -> None:
    tpl = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}")
    msgs = [user("q"), {"role": "assistant", "content": "The answer is"}]
    assert tpl.render(msgs, continue_final_message=True) == "<user>q</s><assistant>The answer is"
    trimming = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</s>{% endfor %}"
    )
    msgs[-1]["content"] = "trailing space "
    assert trimming.render(msgs, continue_final_message=True).endswith("<assistant>trailing space")
    parts = ChatTemplate(OPENAI)
    msgs[-1]["content"] = [{"type": "text", "text": "Part"}]
    assert parts.render(msgs, continue_final_message=True) == "[user]q\n[assistant]Part"


def test_continue_final_message_errors() -> None:
    dropping = ChatTemplate("{% for m in messages %}{{ m.role }}{% endfor %}{{ 'content' }}")
    with pytest.raises(ChatTemplateError, match="dropped part of the final message"):
        dropping.render([user("x")], continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="never uses it"):
        ChatTemplate("{{ messages | length }}").render([user("x")], continue_final_message=True)
    with pytest.raises(ChatTemplateError, match='no "content" to continue'):
        ChatTemplate(SHOW).apply([{"role": "assistant"}], continue_final_message=True)


def test_template_runtime_failures_are_400s() -> None:
    tpl = ChatTemplate("{{ messages[0].content + 1 }}")
    with pytest.raises(ChatTemplateError, match="failed on this input"):
        tpl.render([user("x")])


def test_sim_model_template_with_its_tokenizer(tmp_path: Path) -> None:
    folder = model_files.ensure_model_dir(tmp_path)
    tok = ModelTokenizer.load(folder)
    tpl = ChatTemplate.load(folder, special_tokens=tok.special_tokens_map)
    text = tpl.render(
        [
            {"role": "system", "content": "sys"},
            user(
                [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "u"}}]
            ),
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "1", "content": "42"},
        ],
        tools=[{"type": "function", "function": {"name": "f"}}],
        add_generation_prompt=True,
    )
    assert text.startswith("<|startoftext|><|im_start|>system\nsys\n\n# Tools")
    assert "<|im_start|>user\nlook<|image|><|im_end|>" in text
    assert '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>' in text
    assert text.endswith("<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [tok.bos_token_id, tok.token_to_id("<|im_start|>")]
    assert tok.token_to_id("<|image|>") in ids and tok.token_to_id("<tool_call>") in ids


def test_tools_are_dumped_like_vllms_models() -> None:
    tools = [{"function": {"name": "f", "x-extra": 1}, "id": 3}]
    assert normalize_tools(tools) == [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": None,
                "parameters": None,
                "strict": None,
                "x-extra": 1,
            },
            "id": 3,
        }
    ]
    old_vllm = normalize_tools(tools, function_fields=("name", "description", "parameters"))
    assert old_vllm is not None and "strict" not in old_vllm[0]["function"]
    assert normalize_tools(None) is None
    tpl = ChatTemplate("{{ tools[0].function | tojson }}")
    assert tpl.render([user("")], tools=[{"type": "function", "function": {"name": "f"}}]) == (
        '{"name": "f", "description": null, "parameters": null, "strict": null}'
    )


_NAMES = ["role", "content", "items", "get", "keys", "update", "__class__", "__len__", "missing"]


@given(
    message=st.dictionaries(st.sampled_from(_NAMES), st.one_of(st.none(), st.text(max_size=4),
                                                                st.integers())),
    name=st.sampled_from(_NAMES),
    wrap=st.booleans(),
)  # fmt: skip
def test_the_sandboxs_fast_dict_lookup_renders_as_jinjas_own(
    message: dict[str, Any], name: str, wrap: bool
) -> None:
    """``message.name`` on a plain dict (the fast path), on a dict subclass and inside a list:
    defined or not, callable or not, and the value, as jinja's own sandbox gives them."""
    source = (
        "{% set m = ms[0] if wrap else m %}{{ m.NAME is defined }}|{{ m.NAME is callable }}|"
        "{% if m.NAME is defined and m.NAME is not callable %}{{ m.NAME }}{% endif %}|"
        "{{ m['NAME'] is defined }}"
    ).replace("NAME", name)

    class Sub(dict):  # (not the fast path)
        pass

    for value in (message, Sub(message)):
        ours = make_environment().from_string(source).render(m=value, ms=[value], wrap=wrap)
        theirs = ImmutableSandboxedEnvironment().from_string(source)
        assert ours == theirs.render(m=value, ms=[value], wrap=wrap)
