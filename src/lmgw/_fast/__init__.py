"""Compiled hot paths (Cython).

Each extension module here has a pure-Python twin beside it (`hashring.pyx` / `hashring_py.py`)
with the same API and the same answers: the twin is the reference the property tests compare
against, and the fallback when the extension is not built. Import through the facades (for example
`lmgw.routing.hashring`), which pick the extension when present.
"""
