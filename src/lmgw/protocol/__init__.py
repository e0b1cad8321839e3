"""Wire messages of the native lmgw <-> worker ZeroMQ protocol (see docs/native-protocol.md)."""

from .messages import *  # noqa: F403
from .messages import __all__  # noqa: F401
