"""`lmgw serve` starts in well under 0.3 s only while heavy optional libraries stay out of the
gateway's import graph: they load with the feature that needs them (numpy with the first array
the cache pool or the native path handles, ~100 ms on a small VM). Checked in a fresh process."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("numpy", "jinja2", "tokenizers", "mcp", "opentelemetry", "PIL", "matplotlib", "rich")


def test_the_serving_path_imports_no_heavy_optional_library() -> None:
    code = (
        "import sys, lmgw.cli, lmgw.gateway, lmgw.api.app, lmgw.http.server\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"
