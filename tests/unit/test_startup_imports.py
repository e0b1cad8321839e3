"""`lmgw serve` starts in well under 0.3 s only while heavy optional libraries stay out of the
gateway's import graph: they load with the feature that needs them (numpy with the first array
the cache pool or the native path handles, ~100 ms on a small VM). Checked in a fresh process."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "numpy", "jinja2", "tokenizers", "mcp", "opentelemetry", "PIL", "matplotlib", "rich",
    "http.client", "lmgw.bench.api",
)  # fmt: skip


def test_the_serving_path_imports_no_heavy_optional_library() -> None:
    # what `lmgw serve` does before it serves: parse its flags (every sub-parser is built) and
    # load and validate the configuration
    code = (
        "import sys, lmgw.cli, lmgw.gateway, lmgw.api.app, lmgw.http.server\n"
        "assert lmgw.cli.main(['serve', '--worker', 'pd=http://127.0.0.1:9', '--print-config'])"
        " == 0\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stderr.strip() == "", f"imported at start-up: {out.stderr.strip()}"


def test_the_default_image_formats_are_pillow_formats() -> None:
    """Config validation loads Pillow only for formats beyond the defaults: so the defaults
    must be formats Pillow opens."""
    from PIL import Image

    from lmgw.multimodal.limits import DEFAULT_IMAGE_FORMATS

    Image.init()
    assert set(DEFAULT_IMAGE_FORMATS) <= set(Image.OPEN)
