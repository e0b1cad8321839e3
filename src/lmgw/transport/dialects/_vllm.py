"""What every vLLM P/D proxy does to the client body for the prefill leg."""

from __future__ import annotations

from typing import Any

#: P must not see these: ``stream_options`` is rejected without ``stream``, and
#: ``min_tokens`` > 1 contradicts ``max_tokens=1`` (a 400). D gets them back untouched.
_PREFILL_DROPS = ("stream_options", "min_tokens", "min_completion_tokens")


def prefill_only(obj: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A shallow copy of ``obj`` that runs the prompt and one token, non-streamed.

    P's job is the KV cache; one generated token finishes the request (length-capped, which is
    what makes the NIXL connector keep the blocks for D), and a non-streamed answer is one JSON
    body the dialect can check (and read ``kv_transfer_params`` from).
    """
    out = {k: v for k, v in obj.items() if k not in _PREFILL_DROPS}
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out.update(extra)
    return out
