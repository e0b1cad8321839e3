"""Content hashes of media items: the key for encoder routing and for the encoder cache.

The rule follows vLLM's ``MultiModalHasher.hash_kwargs`` (v0.10-v0.11 layout), so that a hash
computed here is the engine's ``mm_hash`` whenever the engine hashes the same decoded content
with the same algorithm:

    digest over  "model_id", <model id>,  then the item under its modality key,
                 then each ``mm_processor_kwargs`` entry in the client's order

where every value is written as its key (dotted path, UTF-8) followed by its bytes:

* ``str`` -> UTF-8; ``bytes`` -> as is; ``None`` -> the key alone;
* ``bool``/``int``/``float`` -> ``numpy.array(x).tobytes()`` (1, 8, 8 bytes, little endian);
  an ``int`` outside int64 is written as its decimal string (vLLM would hash an object pointer);
* ``list``/``tuple`` -> each element under ``key.<i>``; ``dict`` -> each value under
  ``key.<name>`` in insertion order;
* a numpy array -> under the fresh key ``ndarray``: ``ndarray.dtype`` (``dtype.str``),
  ``ndarray.shape.<i>`` (int64 each), ``ndarray.data`` (C-order bytes);
* an image -> under the fresh key ``image``: ``image.mode`` then ``image.data`` (its pixels as an
  array), after the conversion to RGB the engine applies when it loads an image.

So an image hashes as ``"image" "image.mode" "RGB" "image.data" "ndarray.dtype" "|u1"
"ndarray.shape.0" <h> "ndarray.shape.1" <w> "ndarray.shape.2" <3> "ndarray.data" <pixels>``:
the same pixels give the same hash whatever the encoding (PNG, lossless WebP, BMP, a palette
image), and any pixel change gives a new one. Audio hashes as the pair ``(samples, rate)``
(mono float32), video as the list of its RGB frames: the gateway's own keys, since vLLM
resamples audio and samples video frames before hashing.

A client ``uuid`` on the content part is the hash itself, as in vLLM, unless
``mm_processor_kwargs`` are present; then the uuid string stands in for the item in the rule
above (processor arguments change the encoder's output, so they must change the key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .limits import HashAlgorithm

_INT64 = (-(2**63), 2**63 - 1)


def new_digest(algorithm: HashAlgorithm) -> Any:
    """A fresh hash object; blake3 only when the optional ``blake3`` package is installed."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "sha512":
        return hashlib.sha512()
    if algorithm == "blake3":
        try:
            from blake3 import blake3
        except ImportError:
            raise ValueError("hash_algorithm 'blake3' needs the `blake3` package") from None
        return blake3()
    raise ValueError(f"unknown hash algorithm {algorithm!r}")


class ItemHasher:
    """Feeds values into a digest in the key-prefixed layout described in the module docstring.

    Streaming: a video's frames can be fed one at a time as ``video.0``, ``video.1``, ... which
    is exactly the layout of the list ``video=[frame0, frame1, ...]``.
    """

    __slots__ = ("_d",)

    def __init__(self, algorithm: HashAlgorithm = "sha256") -> None:
        self._d = new_digest(algorithm)

    def update(self, key: str, value: object) -> None:
        """Write ``value`` under ``key`` (recursing into lists, tuples and dicts)."""
        if value is None:
            self._d.update(key.encode())
        elif isinstance(value, (list, tuple)):
            for i, elem in enumerate(value):
                self.update(f"{key}.{i}", elem)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                self.update(f"{key}.{k}", v)
        else:
            self._d.update(key.encode())
            self._leaf(value)

    def update_image(self, key: str, mode: str, pixels: bytes | memoryview, shape: tuple) -> None:
        """An image by its raw pixels (``Image.tobytes()``), without building a PIL object or
        an array: ``shape`` is what ``numpy.asarray(image).shape`` would be."""
        d = self._d
        d.update(key.encode())
        d.update(b"image.mode")
        d.update(mode.encode())
        d.update(b"image.data")
        self._array_header(np.dtype(np.uint8), shape)
        d.update(pixels)

    def update_array(self, key: str, arr: np.ndarray) -> None:
        self._d.update(key.encode())
        self._leaf(arr)

    def update_kwargs(self, kwargs: Mapping[str, Any] | None) -> None:
        """Processor arguments, each under its own name, in the client's order."""
        if kwargs:
            for k, v in kwargs.items():
                self.update(str(k), v)

    def hexdigest(self) -> str:
        return self._d.hexdigest()

    def _leaf(self, value: object) -> None:
        d = self._d
        if isinstance(value, str):
            d.update(value.encode())
        elif isinstance(value, (bytes, bytearray, memoryview)):
            d.update(value)
        elif isinstance(value, bool):
            d.update(np.array(value).tobytes())
        elif isinstance(value, int):
            if _INT64[0] <= value <= _INT64[1]:
                d.update(np.array(value, dtype=np.int64).tobytes())
            else:
                d.update(str(value).encode())
        elif isinstance(value, float):
            d.update(np.array(value, dtype=np.float64).tobytes())
        elif isinstance(value, np.ndarray):
            self._array_header(value.dtype, value.shape)
            d.update(value.data if value.flags.c_contiguous else value.tobytes())
        else:
            raise TypeError(f"cannot hash a {type(value).__name__}")

    def _array_header(self, dtype: np.dtype, shape: tuple) -> None:
        d = self._d
        d.update(b"ndarray.dtype")
        d.update(dtype.str.encode())
        for i, n in enumerate(shape):
            d.update(b"ndarray.shape.%d" % i)
            d.update(np.array(n, dtype=np.int64).tobytes())
        d.update(b"ndarray.data")


def start_item_hash(model_id: str, algorithm: HashAlgorithm) -> ItemHasher:
    """A hasher with the model id already written (the rule's first field)."""
    h = ItemHasher(algorithm)
    h.update("model_id", model_id)
    return h


def uuid_hash(
    uuid: str,
    modality: str,
    *,
    model_id: str,
    processor_kwargs: Mapping[str, Any] | None,
    algorithm: HashAlgorithm,
) -> str:
    """The key of an item the client named by ``uuid``: the uuid itself, or with processor
    arguments present, the rule applied to the uuid string in place of the content."""
    if not processor_kwargs:
        return uuid
    h = start_item_hash(model_id, algorithm)
    h.update(modality, uuid)
    h.update_kwargs(processor_kwargs)
    return h.hexdigest()


def hash_value(
    modality: str,
    value: object,
    *,
    model_id: str,
    processor_kwargs: Mapping[str, Any] | None = None,
    algorithm: HashAlgorithm = "sha256",
) -> str:
    """The rule for an already decoded item (an array, an ``(array, rate)`` pair, a list of
    frames). Decoders use the streaming methods; this is for tests and callers with arrays."""
    h = start_item_hash(model_id, algorithm)
    h.update(modality, value)
    h.update_kwargs(processor_kwargs)
    return h.hexdigest()
