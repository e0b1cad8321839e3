"""Multimodal preprocessing: find, fetch, validate, decode and hash the media of a request.

The entry point is :func:`preprocess`; :class:`MediaLimits` is its configuration and
:class:`MediaError` (a 400 ``GatewayError``) its only error. The modules underneath are
usable on their own: ``content`` (where the media parts are), ``fetch`` (data/file/http with
the SSRF guard), ``image``/``audio``/``video`` (decoders), ``hashing`` (the content-hash rule).
See docs/multimodal.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> submodule; loaded on first use, so that importing the config (which embeds
#: MediaLimits) does not load numpy, Pillow and PyAV into every gateway at start-up
_LAZY = {
    "MEDIA_TYPES": "content",
    "MediaPart": "content",
    "find_media_parts": "content",
    "ItemHasher": "hashing",
    "hash_value": "hashing",
    "uuid_hash": "hashing",
    "ImageSpec": "limits",
    "MediaError": "limits",
    "MediaLimits": "limits",
    "MediaProfile": "limits",
    "MediaItem": "preprocess",
    "preprocess": "preprocess",
}

if TYPE_CHECKING:
    from .content import MEDIA_TYPES as MEDIA_TYPES
    from .content import MediaPart as MediaPart
    from .content import find_media_parts as find_media_parts
    from .hashing import ItemHasher as ItemHasher
    from .hashing import hash_value as hash_value
    from .hashing import uuid_hash as uuid_hash
    from .limits import ImageSpec as ImageSpec
    from .limits import MediaError as MediaError
    from .limits import MediaLimits as MediaLimits
    from .limits import MediaProfile as MediaProfile
    from .preprocess import MediaItem as MediaItem
    from .preprocess import preprocess as preprocess


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
