"""Continue a constrained answer on another worker (sans-IO): the constraint the *rest* of the
answer must meet, given the text the client already has.

Why: an engine compiles a request's constraint (JSON schema, regex, choice, grammar) into a
matcher that starts at the first generated token. Sent the partial answer as a continued
assistant message and the *same* constraint, a new worker would start the constraint afresh
and write a second JSON document after half of the first (Dynamo's migration refuses guided
decoding for this reason). The gateway instead replays the partial answer through the
constraint's grammar (:meth:`~.expr.Grammar.derive_text`) and sends the derivative, as a GBNF
grammar every vLLM backend and SGLang compile: whatever the next worker writes completes the
client's answer within the original constraint.

Continuable: ``json`` (schemas :mod:`.schema` models), ``json_object``, ``regex``, ``choice``
and GBNF ``grammar``; not: ``structural_tag``, Lark grammars, a custom
``whitespace_pattern``, and constructs the translations refuse (:class:`~.expr.Unsupported`,
whose message the client's error event carries).
"""

from __future__ import annotations

from typing import Any

from ..protocol.messages import StructuredOutput
from . import gbnf
from .expr import FAIL, Arena, Grammar, Unsupported
from .regex import regex_expr

__all__ = ["MAX_PREFIX_CHARS", "Unsupported", "constraint_grammars", "resume_grammar"]

MAX_PREFIX_CHARS = 256 << 10
"""Longest partial answer replayed (about 40 ms for 256 KiB of JSON, off the event loop past
4 KiB); a longer one is not continued."""


def constraint_grammars(c: StructuredOutput) -> list[Grammar]:
    """The grammars of the strings ``c`` admits, one per way an engine may read it (raises
    :class:`Unsupported`): with ``disable_any_whitespace``, vLLM ≥ 0.10.2 writes JSON with
    ``","``/``":"`` separators and older builds with ``", "``/``": "``."""
    options: dict[str, Any] = c.options or {}
    if options.get("whitespace_pattern") is not None:
        raise Unsupported("a custom whitespace_pattern cannot be continued")
    kind = c.kind
    if kind in ("json", "json_object"):
        from .schema import json_object_grammar, schema_grammar  # cold path: loaded on a break

        if not options.get("disable_any_whitespace", False):
            seps: list[tuple[str, str] | None] = [None]
            ws = True
        else:
            seps, ws = [(",", ":"), None], False
        if kind == "json_object":
            return [json_object_grammar(Arena(), any_whitespace=ws, separators=s) for s in seps]
        return [schema_grammar(c.spec, Arena(), any_whitespace=ws, separators=s) for s in seps]
    arena = Arena()
    if kind == "regex":
        return [Grammar(arena, {"root": regex_expr(c.spec, arena)})]
    if kind == "choice":
        return [Grammar(arena, {"root": arena.alt(arena.lit(s) for s in c.spec)})]
    if kind == "grammar":
        return [gbnf.parse(c.spec, arena)]
    raise Unsupported(f"a {kind} constraint cannot be continued")


def resume_grammar(c: StructuredOutput, prefix: str) -> str:
    """GBNF for what may follow ``prefix`` under ``c``. Raises :class:`Unsupported` when the
    constraint cannot be modelled or ``prefix`` is not the start of an answer it admits (the
    first worker's engine read the constraint differently: continuing would guess)."""
    if len(prefix) > MAX_PREFIX_CHARS:
        raise Unsupported(f"a partial answer over {MAX_PREFIX_CHARS} characters is not replayed")
    for g in constraint_grammars(c):
        rest = g.derive_text(g.root(), prefix)
        if rest != FAIL:
            return gbnf.render(g, rest)
    raise Unsupported("the partial answer does not match its constraint as the gateway reads it")
