"""The chaos suite: real simulator processes under 200 streaming clients while workers are
killed, stopped, slowed, made to fail, flapped, drained and their Redis restarted.

Select it with ``-m chaos`` (or leave it out with ``-m "not chaos"``); it runs in the default
``make test``. The harness is in ``chaos_support.py``.
"""

from __future__ import annotations

import pytest
from chaos_support import MAX_TOKENS, Answers, compute_answers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: fault scenarios under load against simulated worker processes"
    )


@pytest.fixture(scope="session")
def answers() -> Answers:
    """The load's prompts and the exact answer of each (computed once per session)."""
    return compute_answers(MAX_TOKENS)


@pytest.fixture(scope="session")
def short_answers() -> Answers:
    """Shorter answers, for the scenario whose slow worker makes every stream 10x longer."""
    return compute_answers(16)
