"""A stand-in for ``torch``, on the path only of the subprocess that cross-checks lmgw's JSON
schema grammars against xgrammar (``tests/unit/xgrammar_crosscheck.py``).

xgrammar imports torch at import time for its token-bitmask kernels; the grammar compiler and
the matcher used by the cross-check never touch it. Installing torch (gigabytes) for that would
be absurd, so attribute access here yields inert placeholders. Never on the test suite's own
path: a test that asks for torch must not find this.
"""

from typing import Any


class Tensor:
    pass


class _Inert:
    def __getattr__(self, name: str) -> "_Inert":
        return _Inert()

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()


def __getattr__(name: str) -> Any:
    return _Inert()
