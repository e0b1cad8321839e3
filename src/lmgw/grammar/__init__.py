"""Grammars for structured outputs: expressions with derivatives (:mod:`.expr`), GBNF
(:mod:`.gbnf`), regexes (:mod:`.regex`) and JSON schemas (:mod:`.schema`) as grammars, and
the continuation of a constrained answer on another worker (:mod:`.resume`)."""
