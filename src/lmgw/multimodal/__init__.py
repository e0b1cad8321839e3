"""Multimodal preprocessing: find, fetch, validate, decode and hash the media of a request.

The entry point is :func:`preprocess`; :class:`MediaLimits` is its configuration and
:class:`MediaError` (a 400 ``GatewayError``) its only error. The modules underneath are
usable on their own: ``content`` (where the media parts are), ``fetch`` (data/file/http with
the SSRF guard), ``image``/``audio``/``video`` (decoders), ``hashing`` (the content-hash rule).
See docs/multimodal.md.
"""

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
