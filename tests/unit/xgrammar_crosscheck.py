"""Cross-check of lmgw's JSON-schema grammars (``lmgw.grammar.schema``) against xgrammar, run
as a subprocess by ``test_grammar_schema.py::test_matches_xgrammar_character_by_character``
with ``tests/xgrammar_stub`` (a stand-in for torch) and this folder on ``PYTHONPATH``.

For each schema of ``CASES`` and both whitespace settings: ``WALKS`` random walks of up to 120
characters through xgrammar's matcher; at every step, every character of ``_ALPHABET`` must be
accepted by both or by neither, and both must agree on whether the text so far is complete.
Prints ``{"walks": n, "failures": [...]}`` as JSON; exits 77 when xgrammar cannot be imported.
"""

from __future__ import annotations

import json
import random
import sys

try:
    import xgrammar as xg
    from xgrammar import testing
except Exception as exc:  # not installed, or a build that needs more than the stub
    print(repr(exc))
    sys.exit(77)

from test_grammar_schema import _ALPHABET, CASES, WALKS

from lmgw.grammar.expr import FAIL
from lmgw.grammar.schema import schema_grammar


def main() -> int:
    walks, failures = 0, []
    for name in sorted(CASES):
        for any_ws in (True, False):
            schema = CASES[name]
            mine = schema_grammar(schema, any_whitespace=any_ws)
            theirs = xg.Grammar.from_json_schema(json.dumps(schema), any_whitespace=any_ws)
            start = testing._get_matcher_from_grammar(theirs)
            rnd = random.Random(name)
            for _ in range(WALKS):
                walks += 1
                m, state, prefix = start.fork(), mine.root(), ""
                for _ in range(120):
                    if mine.nullable(state) != m.is_terminated():
                        failures.append([name, any_ws, prefix, "complete"])
                        break
                    allowed = []
                    for c in _ALPHABET:
                        fork = m.fork()
                        ok = fork.accept_string(c)
                        if (mine.derive(state, c) != FAIL) != ok:
                            failures.append([name, any_ws, prefix, c])
                        if ok:
                            allowed.append((c, fork))
                    if not allowed:
                        break
                    c, m = rnd.choice(allowed)
                    state, prefix = mine.derive(state, c), prefix + c
    print(json.dumps({"walks": walks, "failures": failures[:20]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
