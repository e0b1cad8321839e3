"""Extension points that need a registration step (the others are constructor arguments of
:class:`lmgw.Gateway`: ``policies=``, ``middleware=``, ``on_startup=``, ``on_shutdown=``,
``on_worker_change=``, ``tools=``; see ``docs/sdk.md``). :func:`register_tool` and :func:`tool`
are :mod:`lmgw.tools.registry`'s (docs/tools.md, "Gateway tools").
"""

from __future__ import annotations

from typing import TypeVar

from ..tools.registry import register_tool, tool
from ..transport.dialects import DIALECTS, Dialect

__all__ = ["register_dialect", "register_tool", "tool"]

D = TypeVar("D", bound=type[Dialect])


def register_dialect(cls: D, *, replace: bool = False) -> D:
    """Make a :class:`~lmgw.transport.dialects.Dialect` subclass usable by its ``name`` in
    ``models[].dialect`` and ``routing.dialect``. Register before the gateway is built (the
    pipeline resolves dialects once, at start). Usable as a class decorator.

    Raises:
        TypeError: ``cls`` is not a Dialect subclass with a ``name`` and ``flows``.
        ValueError: the name is taken (``replace=True`` to override a built-in on purpose).
    """
    if not (isinstance(cls, type) and issubclass(cls, Dialect)):
        raise TypeError(f"{cls!r} is not a lmgw.transport.dialects.Dialect subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not getattr(cls, "flows", None):
        raise TypeError(f"{cls.__name__} needs class attributes `name` (str) and `flows`")
    if name in DIALECTS and DIALECTS[name] is not cls and not replace:
        raise ValueError(f"dialect {name!r} is already registered ({DIALECTS[name].__name__})")
    DIALECTS[name] = cls
    return cls
