"""The request bodies, as ``/openapi.json`` describes them and as the server checks their types.

The models check the top-level fields and the shape of messages strictly (a string where a
number belongs is a 400 naming the field); unknown fields are allowed and ignored. What the
prompt needs from message contents is checked by the mappings in ``dwarfstar.chat.request``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Sampling(Body):
    model: str | None = Field(None, description="deepseek-v4-flash; deepseek-chat turns thinking off")
    temperature: float | None = Field(None, ge=0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 is off")
    min_p: float | None = Field(None, ge=0, le=1, description="default 0.05")
    seed: int | None = Field(None, ge=0)
    stream: bool | None = None


class StreamOptions(Body):
    include_usage: bool | None = None


class Thinking(Body):
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = None


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(Body):
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDefinition(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatTool(Body):
    type: str = Field(description="function; other kinds are ignored")
    function: FunctionDefinition | None = None


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = Field(None, description="none, auto, required or a function")
    response_format: dict[str, Any] | None = None
    thinking: bool | Thinking | None = None
    think: bool | None = None
    reasoning_effort: str | None = Field(None, description="none, minimal, low, medium, high, xhigh, max")
    n: int | None = Field(None, ge=1, description="only 1")
    logprobs: bool | None = Field(None, description="each content token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token; needs logprobs")


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] = Field(
        description="raw prompt text (special tokens count) or token ids"
    )
    max_tokens: int | None = Field(None, ge=0, description="default 16")
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="only 1")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities with N alternatives")


class AnthropicBlock(Body):
    type: str


class AnthropicMessage(Body):
    role: Literal["user", "assistant", "system"]
    content: str | list[AnthropicBlock]


class AnthropicTool(Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class AnthropicToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class OutputConfig(Body):
    effort: str | None = None
    format: dict[str, Any] | None = None


class CountTokensRequest(Body):
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[ContentPart] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=0)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = None


class Reasoning(Body):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(Sampling):
    input: str | list[dict[str, Any]] = Field(
        description="a string, or message, reasoning, function_call and function_call_output items"
    )
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="function tools; other kinds are ignored")
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=0)
    reasoning: Reasoning | None = None
    previous_response_id: str | None = None
    store: bool | None = None
