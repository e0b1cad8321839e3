"""Just enough of ``multipart/form-data`` to route an upload by its form fields (sans-IO).

The audio endpoints (``/v1/audio/transcriptions``, ``/translations``) take a form: the file and
small text fields (``model``, ``stream``, ...). The gateway must know ``model`` to pick a worker,
and forwards the body untouched otherwise. So this module walks the parts' *headers* and reads
only the values of the named small fields; a part's body is skipped with one ``bytes.find`` of
the boundary (C speed, nothing copied). Everything is bounded: part headers, the values read,
the number of parts. A malformed form is a :class:`FormError` (the API answers 400).
"""

from __future__ import annotations

from typing import NamedTuple

#: at most this many bytes of one part's headers
MAX_PART_HEADERS = 8192
#: at most this many bytes of a field value that is read (a model name, a flag)
MAX_VALUE = 1024
#: at most this many parts are looked at
MAX_PARTS = 256


class FormError(ValueError):
    """The body is not the multipart form its content type announces."""


class Field(NamedTuple):
    """A small field's value and where its bytes lie in the body (``body[start:end]``)."""

    value: str
    start: int
    end: int


def boundary_of(content_type: bytes | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; FormError otherwise."""
    if content_type is None:
        raise FormError("expected a multipart/form-data body (no content-type)")
    kind, _, params = content_type.partition(b";")
    if kind.strip().lower() != b"multipart/form-data":
        raise FormError(
            f"expected a multipart/form-data body, not {kind.strip().decode('latin-1')!r}"
        )
    for param in params.split(b";"):
        name, _, value = param.strip().partition(b"=")
        if name.strip().lower() == b"boundary":
            value = value.strip()
            if len(value) >= 2 and value[:1] == value[-1:] == b'"':
                value = value[1:-1]
            if 0 < len(value) <= 200:
                return value
    raise FormError("multipart/form-data without a usable boundary")


def _field_name(headers: bytes) -> bytes | None:
    """The ``name`` of a part's ``Content-Disposition: form-data; name="..."``."""
    return _disposition(headers, b"name")


def _disposition(headers: bytes, wanted: bytes) -> bytes | None:
    """A parameter (``name``, ``filename``) of a part's ``Content-Disposition`` header."""
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        for param in value.split(b";")[1:]:
            pname, _, pvalue = param.strip().partition(b"=")
            if pname.strip().lower() == wanted:
                pvalue = pvalue.strip()
                if len(pvalue) >= 2 and pvalue[:1] == pvalue[-1:] == b'"':
                    pvalue = pvalue[1:-1]
                return pvalue
    return None


def form_spans(body: bytes, content_type: bytes | None, names: frozenset[str]) -> dict[str, slice]:
    """Where the values of the fields ``names`` lie in ``body`` (first occurrence each).

    Raises:
        FormError: not a multipart form, or a torn part.
    """
    boundary = b"--" + boundary_of(content_type)
    delimiter = b"\r\n" + boundary
    if not body.startswith(boundary):
        at = body.find(delimiter)  # a preamble before the first boundary is allowed
        if at < 0:
            raise FormError("the form has no part (its boundary never appears)")
        pos = at + 2
    else:
        pos = 0
    found: dict[str, slice] = {}
    wanted = {n.encode(): n for n in names}
    for _ in range(MAX_PARTS):
        pos += len(boundary)
        if body.startswith(b"--", pos):  # the closing delimiter
            return found
        if not body.startswith(b"\r\n", pos):
            raise FormError("a form boundary is not followed by a line break")
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + MAX_PART_HEADERS + 4)
        if head_end < 0:
            raise FormError(f"a form part's headers are missing or over {MAX_PART_HEADERS} bytes")
        name = _field_name(body[pos + 2 : head_end])
        start = head_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise FormError("the form ends inside a part (no closing boundary)")
        key = wanted.get(name) if name is not None else None
        if key is not None and key not in found:
            found[key] = slice(start, end)
        pos = end + 2
    raise FormError(f"the form has more than {MAX_PARTS} parts")


def form_fields(body: bytes, content_type: bytes | None, names: frozenset[str]) -> dict[str, Field]:
    """The values of the small text fields ``names`` (first occurrence each) of a form.

    Raises:
        FormError: not a multipart form, a torn part, or a named field's value too long or
            not UTF-8.
    """
    out: dict[str, Field] = {}
    for key, span in form_spans(body, content_type, names).items():
        if span.stop - span.start > MAX_VALUE:
            raise FormError(f"form field {key!r} is longer than {MAX_VALUE} bytes")
        try:
            out[key] = Field(body[span].decode(), span.start, span.stop)
        except UnicodeDecodeError:
            raise FormError(f"form field {key!r} is not UTF-8") from None
    return out


def part_filename(body: bytes, span: slice) -> str | None:
    """The ``filename`` of the part whose value is ``body[span]`` (from :func:`form_spans`):
    its ``Content-Disposition`` header, just before the value; None when it names none."""
    head_end = span.start - 4
    head = body[max(0, head_end - MAX_PART_HEADERS) : head_end]
    head = head[head.rfind(b"\r\n--") + 2 :] if b"\r\n--" in head else head
    name = _disposition(head, b"filename")
    if name is None:
        return None
    return name.decode(errors="replace")[:255] or None


def replace_value(body: bytes, field: Field, value: str) -> bytes:
    """The body with one field's value replaced (a part carries no length: safe to splice)."""
    return body[: field.start] + value.encode() + body[field.end :]
