"""``schemathesis`` against ``/openapi.json`` of a live ``ds4 serve``: no generated request gets a 5xx.

Answers are capped at a few tokens (``--max-tokens``) and examples per operation are bounded, so
the whole module takes well under a minute."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings


@pytest.fixture(scope="module")
def server(serve):
    return serve("--max-tokens", "2", "--ctx", "512")


def test_no_request_makes_the_server_fail(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)

        check()


def test_the_schema_describes_the_request_bodies(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    chat = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"messages", "max_tokens", "tools", "stream_options", "reasoning_effort"} <= set(
        chat["properties"]
    )
    assert set(spec["paths"]) >= {
        "/v1/models",
        "/health",
        "/metrics",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
    }
