"""Every error path, in each API's own shape and status, against a live ``ds4 serve`` with an API
key, a small context, a small body limit and CORS for one origin."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

KEY = "sekrit-key"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def server(serve):
    return serve(
        "--api-key", KEY, "--ctx", "64", "--max-body-mb", "0.002", "--cors", ORIGIN, "--alias", "my-model"
    )


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
MESSAGES = {"max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return error


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]["message"]


def test_the_key_is_required_and_checked(server, http):
    assert httpx.get(server.url + "/health").status_code == 200  # public
    assert "missing API key" in openai_error(httpx.get(server.url + "/v1/models"), 401)["message"]
    wrong = httpx.post(server.url + "/v1/messages", json=MESSAGES, headers={"x-api-key": "nope"})
    assert "invalid API key" in anthropic_error(wrong, 401, "authentication_error")
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert (
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list().data[0].id
        == "deepseek-v4-flash"
    )


def test_malformed_json_and_wrong_types_name_the_field(http):
    error = openai_error(http.post("/v1/chat/completions", content=b"{not json"), 400)
    assert "not valid JSON" in error["message"]
    error = openai_error(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": "many"}), 400)
    assert error["message"].startswith("max_tokens:") and error["param"] == "max_tokens"
    error = openai_error(http.post("/v1/chat/completions", json={**CHAT, "temperature": -1}), 400)
    assert error["message"].startswith("temperature:")
    error = openai_error(http.post("/v1/chat/completions", json={"messages": [{"role": "wizard"}]}), 400)
    assert error["message"].startswith("messages[0].role:")
    message = anthropic_error(
        http.post("/v1/messages", json={**MESSAGES, "stop_sequences": "x"}), 400, "invalid_request_error"
    )
    assert message.startswith("stop_sequences:")
    error = openai_error(
        http.post("/v1/responses", json={"input": [{"type": "item_reference", "id": "x"}]}), 400
    )
    assert "'item_reference' are not supported" in error["message"]
    error = openai_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    assert "JSON object" in error["message"]


def test_unsupported_features_are_named(http):
    assert "n:" in openai_error(http.post("/v1/chat/completions", json={**CHAT, "n": 2}), 400)["message"]
    assert (
        "top_logprobs"
        in openai_error(http.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400)["message"]
    )
    assert (
        "echo"
        in openai_error(http.post("/v1/completions", json={"prompt": "x", "echo": True}), 400)["message"]
    )


def test_unknown_model_and_endpoint_are_404(http):
    error = openai_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]
    anthropic_error(http.post("/v1/messages", json={**MESSAGES, "model": "claude-x"}), 404, "not_found_error")
    assert openai_error(http.get("/v1/models/gpt-9"), 404)["code"] == "model_not_found"
    assert "no endpoint" in openai_error(http.get("/v1/nothing"), 404)["message"]
    assert http.get("/v1/models/my-model").json()["id"] == "deepseek-v4-flash"  # --alias
    assert "my-model" in http.get("/v1/models").json()["data"][0]["aliases"]


def test_context_exceeded_gives_both_sizes(http):
    long = {"messages": [{"role": "user", "content": "word " * 200}]}
    error = openai_error(http.post("/v1/chat/completions", json=long), 400)
    assert (
        error["code"] == "context_length_exceeded" and error["n_ctx"] == 64 and error["n_prompt_tokens"] > 64
    )
    body = anthropic_error(
        http.post("/v1/messages", json={**MESSAGES, **long, "stream": True}), 400, "invalid_request_error"
    )
    assert "context holds 64" in body
    with pytest.raises(anthropic.BadRequestError):
        anthropic.Anthropic(base_url=str(http.base_url), api_key=KEY, max_retries=0).messages.create(
            model="deepseek-v4-flash", max_tokens=1, **long
        )


def test_a_body_over_the_limit_is_413(http):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert openai_error(http.post("/v1/chat/completions", json=big), 413)["message"].startswith(
        "the request body is larger"
    )
    anthropic_error(http.post("/v1/messages", json={**MESSAGES, **big}), 413, "request_too_large")

    def chunked():
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"y" * 5000
        yield b'"}]}'

    assert http.post("/v1/chat/completions", content=chunked()).status_code == 413


def test_cors_is_for_the_given_origin_only(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    response = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        server.url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_the_server_still_answers_after_every_error(http, server):
    answer = http.post(
        "/v1/chat/completions", json={**CHAT, "model": "deepseek-chat"}, headers={"x-ds4-script": '"ok"'}
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "ok"
    metrics = http.get("/metrics").text
    assert "ds4_queue_length 0.0" in metrics and "ds4_generations_failed_total 0.0" in metrics
