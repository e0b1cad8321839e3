"""``examples/torch_worker.py`` (a native worker around a PyTorch model) through the gateway:
the P -> D answer, with the KV handed over as tensor frames through the gateway, equals the
merged worker's, streamed and not, in float32 and in bfloat16 (sent as an int16 view), as
frames and through shared memory.

Runs where torch is installed (a GPU machine's image; ``examples/torch_pd_check.py`` is the
same check at a larger size there), on the CPU with a tiny model; skipped elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

CHECK = Path(__file__).resolve().parents[2] / "examples" / "torch_pd_check.py"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "shm"), [("float32", 0), ("bfloat16", 0), ("bfloat16", 1)], ids=str
)
def test_split_answers_equal_merged_ones_with_a_real_model(
    tmp_path: Path, dtype: str, shm: int
) -> None:
    """``shm``: the hand-off threshold (0: frames; 1 byte: the KV goes by shared memory)."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(CHECK), "--device", "cpu", "--dtype", dtype, "--layers", "2",
         "--hidden", "64", "--heads", "4", "--prompts", "3", "--repeats", "1",
         "--max-tokens", "6", "--shm-threshold", str(shm), "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert not result["failures"]
    assert result["shared_memory"] is bool(shm)
    assert len(result["rows"]) == 3 and all(row["merged"] for row in result["rows"])
    # 2 layers x K and V x 2 KV heads x 16 dims x the dtype's size, per prompt token
    assert result["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * (4 if dtype == "float32" else 2)
