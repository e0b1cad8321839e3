"""``/openapi.json`` describes the API as implemented: schemathesis generates valid and invalid
requests for every documented operation and sends them to a live simulated fleet (gateway +
simulated vLLM worker, API keys on). Checks: no 5xx (streams included), only documented status
codes, content types and response bodies that match the schemas (JSON answers; a stream is
text). The fleet must still be healthy afterwards. ``LMGW_FUZZ_EXAMPLES`` scales the run."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from fuzz_support import ADMIN_TOKEN, API_KEY, FUZZ_DEADLINE_S, LiveGateway, examples
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lmgw.api.openapi import build_spec

#: operations left out of the generated run, and why
SKIPPED = {
    # a generated worker that happens to be valid would join the fleet under test; adding
    # workers is covered by tests/integration/test_admin_api.py
    "POST /admin/workers",
    # a generated adapter would be loaded on the fleet under test (or, on these workers without
    # LoRA, fail as a 502 by design: no worker took it); covered by
    # tests/integration/test_lora_adapters.py
    "POST /admin/lora_adapters",
    "POST /v1/load_lora_adapter",
    # a generated route named like the fleet's model would send the other operations' requests
    # to models nobody serves; covered by tests/integration/test_model_routes.py
    "PUT /admin/model_routes/{name}",
}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveGateway]:
    with LiveGateway() as gw:
        yield gw


def test_the_served_document_is_the_spec(live: LiveGateway) -> None:
    status, headers, body = live.request("GET", "/openapi.json", auth=False)
    assert status == 200 and headers["content-type"] == "application/json"
    spec = json.loads(body)
    assert spec == json.loads(json.dumps(build_spec()))
    # every route the App serves is documented (prefix routes by their templates)
    app_paths = set(live.gateway.app.routes)  # type: ignore[union-attr]
    assert app_paths <= set(spec["paths"]), app_paths - set(spec["paths"])


def operations() -> list[tuple[str, GenerationMode]]:
    """Every operation with valid input; those that take input also with invalid input."""
    out = []
    for path, item in build_spec()["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            label = f"{method.upper()} {path}"
            out.append((label, GenerationMode.POSITIVE))
            if "requestBody" in op or "parameters" in op or "parameters" in item:
                out.append((label, GenerationMode.NEGATIVE))
    return out


@pytest.mark.parametrize(("label", "mode"), operations())
def test_schemathesis(live: LiveGateway, label: str, mode: GenerationMode) -> None:
    if label in SKIPPED:
        pytest.skip("see SKIPPED")
    schema = schemathesis.openapi.from_dict(build_spec())
    op = schema.find_operation_by_label(label)
    assert op is not None
    token = ADMIN_TOKEN if op.path.startswith("/admin/") else API_KEY
    headers = {"authorization": f"Bearer {token}"}

    @settings(
        max_examples=examples(8),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=live.url, headers=headers, timeout=FUZZ_DEADLINE_S)
        checks = [not_a_server_error, status_code_conformance]
        if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            checks += [content_type_conformance, response_schema_conformance]
        case.validate_response(response, checks=checks, headers=headers)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        pytest.skip("no invalid input can be written for this operation")
    live.assert_healthy()
