# ruff: noqa: E501  (templates and their cases read best on one line each)
"""Rendering by shape (lmgw.text.template_shapes) against the full jinja render.

Templates: the three styles of test_chat_template_diff (ChatML with tools, Llama 3, Mistral),
the simulator model's, and hand-written ones in the style of reasoning models (``</think>``
splits, ``startswith`` tests, ``lstrip('\\n')``) and of Llama 3.1 (``strftime_now`` dates,
``| trim``). For random plain conversations (contents that hit every guard: whitespace at the
ends, the templates' own literals, braces, sentinel-like characters, empty strings)
``render`` (shapes where admitted) must equal ``_render`` (always the full path), error or
text, and shapes must actually have been used. Then the analysis itself: what each template
is guarded by, and templates no guard covers.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simulators.model_files import CHAT_TEMPLATE as SIM_CHAT_TEMPLATE
from tests.property.test_chat_template_diff import CHATML, LLAMA3, MISTRAL

import lmgw.text.chat_template as chat_template_module
import lmgw.text.template_shapes as shapes_module
from lmgw.text import ChatTemplate, ChatTemplateError
from lmgw.text.sampled_check import EVERY
from lmgw.text.template_shapes import ContentUse, Unshaped, analyze

# In the style of reasoning models' templates: the reasoning split off an assistant turn at
# </think>, a tool response recognised by its tags, the last real user turn found by a loop.
REASONING = """\
{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if message.role == 'user' and message.content is string
          and not (message.content.startswith('<tool_response>')
                   and message.content.endswith('</tool_response>')) %}
        {%- set ns.last_user = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == 'system' or message.role == 'user' %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# In the style of Llama 3.1: today's date from strftime_now, the system turn trimmed.
DATED = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# In the style of Gemma 3: the system turn folded into the first user turn, list contents read
# by index in a branch string contents never take, every content trimmed.
FOLDED = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}
    {%- else %}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for item in message['content'] %}
            {%- if item['type'] == 'text' %}{{- item['text'] | trim }}{%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}
"""

# Prints contents through filters: every shape fails its rich probe, so every request renders
# in full (and correctly).
TRANSFORMING = """\
{%- for message in messages %}
    {{- message.role + ': ' + (message.content | tojson) + '\\n' }}
    {{- message.content | upper }}
    {{- message.content[-1] }}
{%- endfor %}
"""

# Content as a list of text parts (the "openai" content format).
PARTS = """\
{%- for message in messages %}
    {{- '<|' + message.role + '|>' }}
    {%- for part in message.content %}
        {%- if part.type == 'text' %}{{- part.text }}{%- endif %}
    {%- endfor %}
    {{- '<|end|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}
"""

# Strips given characters off every content; an empty one is a tag of its own.
STRIPPING = """\
{%- for message in messages %}
    {%- if message.content %}
        {{- '<' + message.role + '>' + message.content.lstrip('\\n').rstrip('*') + '</' + message.role + '>' }}
    {%- else %}
        {{- '<' + message.role + '/>' }}
    {%- endif %}
{%- endfor %}
"""

SPECIALS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "</s>",
}

TEMPLATES = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "sim": SIM_CHAT_TEMPLATE,
    "reasoning": REASONING,
    "dated": DATED,
    "transforming": TRANSFORMING,
    "parts": PARTS,
    "stripping": STRIPPING,
    "folded": FOLDED,
}
SHAPED = {
    "chatml", "llama3", "mistral", "sim", "reasoning", "dated", "parts", "stripping", "folded",
}  # fmt: skip


def _template(name: str) -> ChatTemplate:
    return ChatTemplate(TEMPLATES[name], special_tokens=SPECIALS)


_PIECES = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=6),
    st.sampled_from(
        [
            " ", "\n", "\t", "{", "}", "{0}", "{1}", "%s", "\ue000", "\ue0000\ue001",
            "</think>", "<think>", "<tool_response>", "</tool_response>", "<|im_end|>",
            "[INST]", "hello", "Ünïcödé 日本", "\r\n", "*",
        ]
    ),
)  # fmt: skip
_WORDS = st.sampled_from(["a", "Hello", "x1", "é", "日本"])
CONTENT = st.one_of(
    st.lists(_PIECES, max_size=5).map("".join),
    # mostly admitted by the guards: no whitespace at the ends, not empty
    st.builds(
        lambda a, mid, b: a + mid + b, _WORDS, st.lists(_PIECES, max_size=4).map("".join), _WORDS
    ),
)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    if draw(st.booleans()):
        out.append({"role": "system", "content": draw(CONTENT)})
    role = "user"
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 7)) == 0:
            role = draw(st.sampled_from(["system", "user", "assistant"]))
        out.append({"role": role, "content": draw(CONTENT)})
        role = "assistant" if role == "user" else "user"
    return out


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except ChatTemplateError as exc:
        return "error", exc.message


SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_CACHE: dict[str, ChatTemplate] = {}


def _tool(name: str, description: str) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"q": {"type": "string"}}}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


TOOL_SETS = st.sampled_from(
    [
        None,
        None,
        [_tool("search", 'Find {things} on the web.\nReturns "hits".')],
        [_tool("search", "Find things."), _tool("calc", "Add 2 + 2 </think> {0}")],
        [{"type": "function", "function": {"description": "no name"}}],  # (refused: a 400)
    ]
)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@SETTINGS
@given(msgs=conversations(), generation=st.booleans(), tools=TOOL_SETS)
def test_shaped_render_is_the_full_render(
    name: str, msgs: list, generation: bool, tools: Any
) -> None:
    template = _CACHE.get(name) or _CACHE.setdefault(name, _template(name))
    args = {"add_generation_prompt": generation, "tools": tools}
    got = _outcome(lambda: template.render(msgs, **args))
    want = _outcome(lambda: template._render(msgs, **args))
    assert got == want


def test_tools_are_part_of_the_shape() -> None:
    template = _template("chatml")
    msgs = [{"role": "user", "content": "hi"}]
    one, two = [_tool("a", "first")], [_tool("b", "second")]
    for tools in (one, two, one, two):
        got = template.render(msgs, add_generation_prompt=True, tools=tools)
        assert got == template._render(msgs, add_generation_prompt=True, tools=tools)
        assert tools[0]["function"]["description"] in got
    shapes = template.shapes
    assert shapes is not None and shapes.stats.shaped == 4 and shapes.learned == 2


def test_a_tool_use_template_of_its_own_keeps_requests_with_tools_in_full() -> None:
    template = ChatTemplate(
        {"default": CHATML, "tool_use": "{{ tools | tojson }}{{ messages[0].content }}"}
    )
    msgs = [{"role": "user", "content": "hi"}]
    got = template.render(msgs, tools=[_tool("a", "first")])
    assert got.endswith("hi") and got.startswith("[{")
    assert template.shapes is not None and template.shapes.stats.shaped == 0


_EDGES = [
    " ", "\n", "\t", "{", "}", "{0}", "%s", "\ue000", "\ue0000\ue001", "</think>", "<think>",
    "<tool_response>", "</tool_response>", "<|im_end|>", "*", "\r\n", "stop", "end", "",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_edge_of_every_guard(name: str) -> None:
    """Each awkward piece alone, at either end and inside a content, in each role."""
    template = _template(name)
    for piece in _EDGES:
        for content in (piece, f"{piece}x", f"x{piece}", f"x{piece}x", f"{piece}x{piece}"):
            for role in ("system", "user", "assistant"):
                for msgs in (
                    [{"role": role, "content": content}],
                    [{"role": "user", "content": "q"}, {"role": role, "content": content}],
                ):
                    got = _outcome(lambda m=msgs: template.render(m, add_generation_prompt=True))
                    want = _outcome(lambda m=msgs: template._render(m, add_generation_prompt=True))
                    assert got == want, (msgs, got, want)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_shapes_are_used_where_the_template_allows(name: str) -> None:
    template = _template(name)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello {0} there"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "And now?"},
    ]
    for _ in range(3):
        assert template.render(msgs, add_generation_prompt=True) == template._render(
            msgs, add_generation_prompt=True
        )
    stats = template.shapes.stats if template.shapes is not None else None
    if name in SHAPED:
        assert template.unshaped is None
        assert stats is not None and stats.shaped >= 2 and template.shapes.learned == 1, stats  # type: ignore[union-attr]
    else:  # learned as unshapeable once, then rendered in full
        assert stats is not None and stats.shaped == 0 and stats.full == 3


def test_the_reasoning_template_is_guarded_by_its_literals() -> None:
    use = _template("reasoning").shapes.use  # type: ignore[union-attr]
    assert set(use.literals) == {"</think>", "<think>", "<tool_response>", "</tool_response>"}
    assert use.strip_chars == "\n" and not use.strip_space
    assert use.admits("plain text") and not use.admits("a</think>b")
    assert not use.admits("\nlead") and not use.admits("") and use.admits(" spaces inside ok ")


def test_trimming_templates_admit_no_whitespace_at_the_ends() -> None:
    use = _template("dated").shapes.use  # type: ignore[union-attr]
    assert use.strip_space and use.clock_formats == ("%d %b %Y",)
    assert use.admits("a b") and not use.admits(" a") and not use.admits("a\n")


def test_a_shape_per_day(monkeypatch: pytest.MonkeyPatch) -> None:
    days = iter([dt.datetime(2031, 1, 2, 23, 59), dt.datetime(2031, 1, 3, 0, 1)])
    now = {"at": next(days)}

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return now["at"]

    monkeypatch.setattr(shapes_module, "datetime", Clock)
    monkeypatch.setattr(chat_template_module, "datetime", Clock)
    template = _template("dated")
    msgs = [{"role": "user", "content": "hi"}]
    assert "Today Date: 02 Jan 2031" in template.render(msgs, add_generation_prompt=True)
    assert "Today Date: 02 Jan 2031" in template.render(msgs, add_generation_prompt=True)
    now["at"] = next(days)
    assert "Today Date: 03 Jan 2031" in template.render(msgs, add_generation_prompt=True)
    assert template.shapes is not None and template.shapes.learned == 2


def test_a_mismatch_turns_shapes_off(caplog: pytest.LogCaptureFixture) -> None:
    template = _template("chatml")
    shapes = template.shapes
    assert shapes is not None
    msgs = [{"role": "user", "content": "hi"}]
    template.render(msgs, add_generation_prompt=False)
    (key,) = shapes._shapes
    shapes._shapes[key] = "<|im_start|>user\nWRONG {0}<|im_end|>\n"  # a shape gone bad
    for _ in range(EVERY + 1):
        template.render(msgs, add_generation_prompt=False)
    assert shapes.check.off is not None and shapes.check.mismatches == 1
    assert "turned off" in caplog.text
    assert template.render(msgs, add_generation_prompt=False) == template._render(msgs)


def test_requests_with_more_than_roles_and_contents_render_in_full() -> None:
    template = _template("chatml")
    plain = [{"role": "user", "content": "hi"}]
    template.render(plain)
    shaped = template.shapes.stats.shaped  # type: ignore[union-attr]
    others: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
        {"messages": [{"role": "tool", "content": "1", "tool_call_id": "c"}]},
        {"messages": [{"role": "developer", "content": "hi"}]},
        {"messages": [{"role": "user", "content": ""}]},
        {"messages": plain, "chat_template_kwargs": {"x": 1}},
        {"messages": [{"role": "assistant", "content": "hi"}], "continue_final_message": True},
    ]
    for req in others:
        args = {k: v for k, v in req.items() if k != "messages"}
        assert template.render(req["messages"], **args) == template._render(req["messages"], **args)
    assert template.shapes.stats.shaped == shaped  # type: ignore[union-attr]


def test_shapes_can_be_turned_off() -> None:
    template = ChatTemplate(CHATML, shapes=False)
    assert template.shapes is None and template.unshaped is not None
    assert template.render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")


def test_default_kwargs_that_set_the_flags_render_in_full() -> None:
    template = ChatTemplate(CHATML, default_kwargs={"add_generation_prompt": True})
    assert template.shapes is None and "kwargs" in (template.unshaped or "")


# -- the analysis ---------------------------------------------------------------------------------


def _analyze(source: str) -> ContentUse:
    return analyze(chat_template_module.make_environment().parse(source))


@pytest.mark.parametrize(
    ("source", "literals", "strip_space", "strip_chars"),
    [
        ("{{ messages[0].content }}", (), False, ""),
        ("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}", (), True, ""),
        ("{% for m in messages %}{{ m.content.strip('*') }}{% endfor %}", (), False, "*"),
        ("{% for m in messages %}{% if 'X' in m.content %}x{% endif %}{% endfor %}", ("X",), False, ""),
        (
            "{% for m in messages %}{% if m.content.startswith(('A', 'B')) %}.{% endif %}"
            "{% endfor %}",
            ("A", "B"), False, "",
        ),
        (
            "{% macro show(c) %}{% if c == 'stop' %}!{% endif %}{{ c }}{% endmacro %}"
            "{% for m in messages %}{{ show(m.content) }}{% endfor %}",
            ("stop",), False, "",
        ),
        (
            "{% set ns = namespace(c='') %}{% for m in messages %}{% set ns.c = m.content %}"
            "{% endfor %}{% if ns.c != 'end' %}{{ ns.c }}{% endif %}",
            ("end",), False, "",
        ),
        ("{% for m in messages %}{{ m.content.replace('a', 'b') }}{% endfor %}", ("a",), False, ""),
        ("{% for m in messages %}{{ m.content | upper }}{% endfor %}", (), False, ""),
        ("{% for m in messages %}{% if m.content is none %}-{% endif %}{% endfor %}", (), False, ""),
        ("{% for m in messages %}{% if 'tool_calls' in m %}-{% endif %}{% endfor %}", (), False, ""),
        ("{% for m in messages %}{{ m.get('content') }}{% endfor %}", (), False, ""),
    ],
)  # fmt: skip
def test_guards(source: str, literals: tuple, strip_space: bool, strip_chars: str) -> None:
    use = _analyze(source)
    assert (use.literals, use.strip_space, use.strip_chars) == (literals, strip_space, strip_chars)


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}{% if m.content | length > 10 %}long{% endif %}{% endfor %}",
        "{% for m in messages %}{{ m.content[:100] }}{% endfor %}",
        "{% for m in messages %}{{ m.content[n] }}{% endfor %}",
        "{% for m in messages %}{% if m.content[0] == 'x' %}!{% endif %}{% endfor %}",
        "{% for m in messages %}{{ m.content.split('x')[1] }}{% endfor %}",
        "{% for m in messages %}{{ m.content.split() | join(' ') }}{% endfor %}",
        "{% for m in messages %}{% if m.content in 'abc' %}!{% endif %}{% endfor %}",
        "{% for m in messages %}{% if m.content == other %}!{% endif %}{% endfor %}",
        "{% for m in messages %}{% if m.content < 'b' %}!{% endif %}{% endfor %}",
        "{% for m in messages %}{% if m == messages[0] %}!{% endif %}{{ m.content }}{% endfor %}",
        "{% for m in messages %}{% if m in messages[1:] %}!{% endif %}{% endfor %}",
        "{{ messages | map(attribute='content') | join('\\n') }}",
        "{% for m in messages %}{% for k, v in m.items() %}{{ v }}{% endfor %}{% endfor %}",
        "{% for m in messages %}{{ messages.index(m) }}{% endfor %}",
        "{{ strftime_now(fmt) }}",
        "{{ strftime_now('%H:%M') }}",
        "{{ lipsum(1) }}",
        "{% for m in messages %}{% if (m.content | lower) == 'hi' %}!{% endif %}{% endfor %}",
        "{% for m in messages %}{% if (m.content + 'x') == 'hix' %}!{% endif %}{% endfor %}",
        "{% for m in messages %}{% set t = m.content | lower %}{% if t %}!{% endif %}{% endfor %}",
        "{% for m in messages %}{{ m.content | truncate(10) }}{% endfor %}",
        "{% for m in messages %}{{ m.content.count('a') }}{% endfor %}",
        "{% for m in messages %}{{ m.content.startswith(prefix) }}{% endfor %}",
        "{% for m in messages %}{{ m.content | wordcount }}{% endfor %}",
        "{% for m in messages %}{% set a, b = m.content, 1 %}{% endfor %}",
        "{% set ns = namespace(c=messages[0].content) %}{{ ns.c }}",
    ],
)
def test_uses_no_guard_covers(source: str) -> None:
    with pytest.raises(Unshaped):
        _analyze(source)


def test_a_printed_index_passes_the_analysis_and_fails_the_probe() -> None:
    template = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content[-1] }}{% endfor %}")
    assert template.unshaped is None  # (a character of a content, printed: the probe decides)
    msgs = [{"role": "user", "content": "hello"}]
    for _ in range(2):
        assert template.render(msgs) == "user:o"
    assert template.shapes is not None and template.shapes.stats.shaped == 0


def test_an_analysis_that_breaks_leaves_the_template_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> ContentUse:
        raise KeyError("unforeseen")

    monkeypatch.setattr(chat_template_module, "analyze", broken)
    template = ChatTemplate(CHATML)
    assert template.shapes is None and "KeyError" in (template.unshaped or "")
    assert template.render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")


def test_a_loop_over_a_string_content_has_no_shapes() -> None:
    source = "{% for m in messages %}{% for c in m.content %}{{ c }}{% endfor %}{% endfor %}"
    with pytest.raises(Unshaped, match="characters"):
        _analyze(source)  # (a loop as long as the content: loop.index could branch on it)
    template = ChatTemplate(source, content_format="string")
    assert template.shapes is None and "characters" in (template.unshaped or "")
    assert _analyze_openai(source) is not None  # (over the parts of a string content: one)


def _analyze_openai(source: str) -> ContentUse:
    return analyze(chat_template_module.make_environment().parse(source), "openai")
