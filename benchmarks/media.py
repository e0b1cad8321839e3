"""Image decode + hash cost per megapixel: what the multimodal preprocessor adds per image.

Why: on the HTTP path the gateway forwards the client's original bytes and only needs to
validate and hash each image, so this is the whole per-image CPU cost of encoder-cache-aware
routing. Each row splits it into the steps of ``lmgw.multimodal.image`` (header parse, decode,
RGB conversion, pixel hash) and compares with hashing the encoded bytes alone (what a
bytes-keyed rule would cost, e.g. newer vLLM's hash over the original file), and with the
whole ``preprocess`` call on a base64 data URL (JSON-side work included: base64 decoding).

    .venv/bin/python benchmarks/media.py [--quick]

Prints medians of 5 runs and writes benchmarks/results/media.json.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import trio
from PIL import Image

from lmgw.multimodal import MediaLimits, preprocess
from lmgw.multimodal.hashing import start_item_hash
from lmgw.multimodal.image import decode_image, hash_image, open_image, to_rgb

REPEATS = 5
SIZES = ((512, 512), (1024, 1024), (2048, 2048), (3840, 2160))
FORMATS = ("PNG", "JPEG")
RESULTS = Path(__file__).parent / "results" / "media.json"
LIMITS = MediaLimits()


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus mild noise: compresses like a photo, unlike pure noise (which makes
    PNG huge and slow) or flat colour (which makes it trivially small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0),
            128 + 100 * np.sin((x + y) / 173.0),
            128 + 100 * np.cos(x / 59.0 - y / 211.0),
        ],
        axis=-1,
    )
    noisy = base + rng.normal(0, 6, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": 90} if fmt == "JPEG" else {}
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def ms(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def steps(data: bytes) -> dict[str, Callable[[], object]]:
    """Each step alone (later steps start from the earlier steps' output, made once here)."""

    def header() -> None:
        im, _ = open_image(data, LIMITS)
        im.close()

    def load() -> None:
        im, _ = open_image(data, LIMITS)
        im.load()
        im.close()

    im, _ = open_image(data, LIMITS)
    im.load()
    decoded = decode_image(data, LIMITS)

    def rgb() -> None:
        to_rgb(im).tobytes()

    def pixel_hash() -> None:
        h = start_item_hash("org/model", "sha256")
        hash_image(decoded, h)
        h.hexdigest()

    def decode_and_hash() -> None:
        d = decode_image(data, LIMITS)
        h = start_item_hash("org/model", "sha256")
        hash_image(d, h)
        h.hexdigest()

    def bytes_hash() -> None:
        hashlib.sha256(data).hexdigest()

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ]
    }
    # inline (no thread hop) so the figure is CPU cost, comparable with the other columns
    inline = MediaLimits(offload_bytes=1 << 40, offload_pixels=1 << 40)

    def whole() -> None:
        trio.run(preprocess, body, inline)

    return {
        "header": header,
        "decode": load,
        "to_rgb": rgb,
        "pixel_hash": pixel_hash,
        "decode_hash": decode_and_hash,
        "bytes_hash": bytes_hash,
        "preprocess": whole,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer repetitions")
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    images = {(w, h): photo_like(w, h) for w, h in sizes}
    files = {(fmt, size): encode(arr, fmt) for size, arr in images.items() for fmt in FORMATS}
    fns = {cfg: steps(data) for cfg, data in files.items()}
    names = list(next(iter(fns.values())))

    runs: dict[tuple, list[float]] = {}
    for _rep in range(REPEATS):  # interleaved, so drift hits every configuration alike
        for cfg, table in fns.items():
            mp = cfg[1][0] * cfg[1][1] / 1e6
            reps = max(1, round((2 if args.quick else 4) / mp))
            for name, fn in table.items():
                runs.setdefault((*cfg, name), []).append(ms(fn, reps))

    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"image decode + hash, median of {REPEATS} runs (ms), sha256, Pillow {PIL.__version__}")
    print(
        f"{'fmt':>4} {'size':>9} {'MP':>5} {'KiB':>6} {'header':>7} {'decode':>7} {'to_rgb':>7}"
        f" {'hash':>6} {'dec+hash':>8} {'ms/MP':>6} {'bytes':>6} {'preproc':>7}"
    )
    rows = []
    for (fmt, (w, h)), data in files.items():
        mp = w * h / 1e6
        r = {name: med[(fmt, (w, h), name)] for name in names}
        print(
            f"{fmt:>4} {w:>4}x{h:<4} {mp:>5.2f} {len(data) / 1024:>6.0f} {r['header']:>7.3f}"
            f" {r['decode']:>7.2f} {r['to_rgb']:>7.2f} {r['pixel_hash']:>6.2f}"
            f" {r['decode_hash']:>8.2f} {r['decode_hash'] / mp:>6.2f} {r['bytes_hash']:>6.2f}"
            f" {r['preprocess']:>7.2f}"
        )
        rows.append(
            {
                "format": fmt,
                "width": w,
                "height": h,
                "megapixels": mp,
                "encoded_bytes": len(data),
                "median_ms": r,
                "decode_hash_ms_per_mp": r["decode_hash"] / mp,
                "preprocess_ms_per_mp": r["preprocess"] / mp,
                "runs_ms": {name: runs[(fmt, (w, h), name)] for name in names},
            }
        )
    print(
        "header: open + limits; decode: full decode; to_rgb: convert + tobytes; hash: pixel hash;"
        " dec+hash: all of it (what preprocess runs per image); bytes: sha256 of the file;"
        " preproc: preprocess() on a base64 data URL, inline",
        file=sys.stderr,
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeats": REPEATS,
        "hash_algorithm": LIMITS.hash_algorithm,
        "quick": args.quick,
    }
    RESULTS.write_text(json.dumps({"benchmark": "media", "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
