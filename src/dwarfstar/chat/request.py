"""OpenAI chat and Anthropic messages requests, mapped onto one ``Conversation``.

Both APIs end in the official encoder's form: one leading system message carrying the
system text, the tools and the response format; tool results as ``tool`` messages. Where
the APIs say more than the prompt format can, the choices are:

- every ``system`` and ``developer`` message (Claude Code puts system messages inside
  ``messages``, pi sends its system prompt as ``developer``) joins the system text, in
  order, a blank line apart. V4's own developer role renders as a user turn and is dropped
  from history, which would lose a system prompt;
- Anthropic system blocks starting ``x-anthropic-`` (Claude Code's per-request billing
  header) are left out, so the prompt prefix stays the same from one request to the next;
- several text parts of one message join with a blank line, as the official encoder joins
  the blocks of a user turn; a part that is not text (an image) becomes
  ``[Unsupported <type>]``, the official placeholder;
- ``tool_choice`` none withholds the tools; ``required`` (Anthropic ``any``) and a named
  function are binding: ``Conversation.forced_tool_call`` makes the engine open the call
  itself, and the system text asks for it too (a named function is then the only tool
  offered); tools other than functions are left out;
- a trailing assistant message (with no tool calls) is a prefill: the answer continues it
  (``Conversation.continue_final_message``), as the Anthropic API does;
- Responses ``input`` items: ``message`` (any role), ``reasoning`` (its text, summary or
  content, joins the next assistant turn), ``function_call`` (joins the assistant turn
  before it) and ``function_call_output``; ``previous_response_id`` is resolved by the
  caller, which passes that response's messages as ``history``.

Thinking: on by default. ``thinking`` (``{"type": "enabled"|"adaptive"|"disabled"}`` or a
bool), ``think`` (bool) and the effort ``none`` switch it explicitly; with no explicit
switch the model alias decides (``deepseek-chat`` off, anything else on). The effort
(``reasoning_effort``, or Anthropic's ``output_config.effort``) ``max`` selects Think Max.
"""

from __future__ import annotations

import json
from typing import Any

from dwarfstar.chat.conversation import Conversation, Message

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
THINKING_TYPES = ("enabled", "adaptive", "disabled")
REQUIRED_TOOL = "Answer by calling one or more of the tools above."
NAMED_TOOL = "Answer by calling the tool {name}."
RESPONSES_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


class RequestError(ValueError):
    """A request that cannot be rendered; the message names the field at fault."""


def parse_request(text: str | bytes) -> dict[str, Any]:
    """The JSON object of a request body."""
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, not {_json_type(body)}")
    return body


def from_openai(body: dict[str, Any]) -> Conversation:
    """Map an OpenAI ``/v1/chat/completions`` body."""
    system_texts: list[str] = []
    messages: list[Message] = []
    for index, message in enumerate(_messages(body)):
        where = f"messages[{index}]"
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system_texts.append(_text(content, f"{where}.content"))
        elif role == "user":
            messages.append({"role": "user", "content": _text(content, f"{where}.content")})
        elif role == "assistant":
            messages.append(_openai_assistant(message, where))
        elif role == "tool":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(message, "tool_call_id", where),
                    "content": _text(content, f"{where}.content"),
                }
            )
        else:
            raise _unknown_role(role, where, ("system", "developer", "user", "assistant", "tool"))

    tools, forced = _chosen_tools(
        _openai_tools(body.get("tools")), _openai_tool_choice(body.get("tool_choice")), system_texts
    )
    response_format = _optional(body, "response_format", dict, "an object")
    if response_format is not None and response_format.get("type") == "text":
        response_format = None
    effort = _optional(body, "reasoning_effort", str, "a string")
    return _conversation(
        body, system_texts, messages, (tools, forced), response_format, effort, "reasoning_effort"
    )


def from_anthropic(body: dict[str, Any]) -> Conversation:
    """Map an Anthropic ``/v1/messages`` body."""
    system_texts = _anthropic_system(body.get("system"))
    messages: list[Message] = []
    for index, message in enumerate(_messages(body)):
        where = f"messages[{index}]"
        role = message.get("role")
        if role == "system":
            system_texts.append(_text(message.get("content"), f"{where}.content"))
        elif role == "user":
            messages.extend(_anthropic_user(message.get("content"), where))
        elif role == "assistant":
            messages.append(_anthropic_assistant(message.get("content"), where))
        else:
            raise _unknown_role(role, where, ("user", "assistant", "system"))

    tools, forced = _chosen_tools(
        _anthropic_tools(body.get("tools")), _anthropic_tool_choice(body.get("tool_choice")), system_texts
    )
    output_config = _optional(body, "output_config", dict, "an object") or {}
    response_format = _optional(output_config, "format", dict, "an object", "output_config.")
    if "effort" in output_config:
        effort = _optional(output_config, "effort", str, "a string", "output_config.")
        effort_field = "output_config.effort"
    else:
        effort = _optional(body, "reasoning_effort", str, "a string")
        effort_field = "reasoning_effort"
    return _conversation(body, system_texts, messages, (tools, forced), response_format, effort, effort_field)


def _conversation(
    body: dict[str, Any],
    system_texts: list[str],
    messages: list[Message],
    chosen_tools: tuple[list[dict[str, Any]], bool | str],
    response_format: dict[str, Any] | None,
    effort: str | None,
    effort_field: str,
) -> Conversation:
    tools, forced_tool_call = chosen_tools
    system_texts = [text for text in system_texts if text]
    if system_texts or tools or response_format:
        system: Message = {"role": "system", "content": "\n\n".join(system_texts)}
        if tools:
            system["tools"] = tools
        if response_format:
            system["response_format"] = response_format
        messages.insert(0, system)
    thinking = _thinking_enabled(body, effort, effort_field)
    last = messages[-1] if messages else {}
    prefill = last.get("role") == "assistant" and not last.get("tool_calls")
    if not thinking:
        return Conversation(
            messages, thinking_mode="chat", continue_final_message=prefill, forced_tool_call=forced_tool_call
        )
    return Conversation(
        messages,
        thinking_mode="thinking",
        reasoning_effort=_effort_level(effort),
        continue_final_message=prefill,
        forced_tool_call=forced_tool_call,
    )


def from_responses(body: dict[str, Any], history: list[Message] | None = None) -> Conversation:
    """Map an OpenAI ``/v1/responses`` body; ``history`` is the conversation of its
    ``previous_response_id`` (without system messages), which the caller looked up."""
    instructions = _optional(body, "instructions", str, "a string")
    system_texts = [instructions] if instructions else []
    messages: list[Message] = list(history or [])
    items = body.get("input")
    if items is None:
        raise RequestError("input: missing")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list):
        raise RequestError(f"input must be a string or an array of items, not {_json_type(items)}")
    reasoning: list[str] = []  # waits for the assistant turn it belongs to
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object, not {_json_type(item)}")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _responses_text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                system_texts.append(text)
            elif role == "user":
                messages.append({"role": "user", "content": text})
            elif role == "assistant":
                messages.append(_with_reasoning({"role": "assistant", "content": text}, reasoning))
            else:
                raise _unknown_role(role, where, ("system", "developer", "user", "assistant"))
        elif kind == "reasoning":
            parts = [*(item.get("summary") or []), *(item.get("content") or [])]
            reasoning.append(_responses_text(parts, f"{where}.summary"))
        elif kind == "function_call":
            call = _tool_call(
                _string(item, "call_id", where),
                _string(item, "name", where),
                _string(item, "arguments", where),
            )
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not reasoning:
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append(
                    _with_reasoning({"role": "assistant", "content": "", "tool_calls": [call]}, reasoning)
                )
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", where),
                    "content": output
                    if isinstance(output, str)
                    else _responses_text(output, f"{where}.output"),
                }
            )
        else:
            raise RequestError(
                f"{where}.type: input items of type {kind!r} are not supported; "
                "expected message, reasoning, function_call or function_call_output"
            )
    if not messages:
        raise RequestError("input must hold at least one message")
    tools, forced = _chosen_tools(
        _responses_tools(body.get("tools")), _openai_tool_choice(body.get("tool_choice")), system_texts
    )
    reasoning_options = _optional(body, "reasoning", dict, "an object") or {}
    effort = _optional(reasoning_options, "effort", str, "a string", "reasoning.")
    return _conversation(body, system_texts, messages, (tools, forced), None, effort, "reasoning.effort")


def _with_reasoning(message: Message, reasoning: list[str]) -> Message:
    if reasoning:
        message["reasoning_content"] = "\n\n".join(reasoning)
        reasoning.clear()
    return message


def _responses_text(content: Any, where: str) -> str:
    """A Responses message's text: a string, or parts (``input_text``, ``output_text``, ...)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError(
            f"{where} must be a string or an array of content parts, not {_json_type(content)}"
        )
    texts = []
    for index, part in enumerate(content):
        part_where = f"{where}[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"{part_where} must be a content part object with a string 'type'")
        if part["type"] in RESPONSES_TEXT_PARTS:
            texts.append(_string(part, "text", part_where))
        else:
            texts.append(f"[Unsupported {part['type']}]")
    return "\n\n".join(texts)


def _responses_tools(tools: Any) -> list[dict[str, Any]]:
    """Responses function tools (flat: name, description, parameters) in the chat shape."""
    kept = []
    for index, tool in enumerate(_array(tools, "tools")):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where} must be an object, not {_json_type(tool)}")
        if tool.get("type") != "function":
            continue
        function: dict[str, Any] = {"name": _string(tool, "name", where)}
        if tool.get("description") is not None:
            function["description"] = _string(tool, "description", where)
        if tool.get("parameters") is not None:
            function["parameters"] = _optional(tool, "parameters", dict, "an object", f"{where}.")
        kept.append({"type": "function", "function": function})
    return kept


def _openai_tool_choice(choice: Any) -> str | None:
    """``none``, ``auto`` or ``required`` as given, a named function as its name."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "allowed_tools"):
        if choice["type"] == "allowed_tools":
            return choice.get("mode", "auto") if choice.get("mode") in ("auto", "required") else "auto"
        function = choice.get("function")
        if isinstance(function, dict):  # chat completions
            return "function:" + _string(function, "name", "tool_choice.function")
        return "function:" + _string(choice, "name", "tool_choice")  # responses
    raise RequestError(
        "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", ...}, "
        f"not {json.dumps(choice)[:80]}"
    )


def _anthropic_tool_choice(choice: Any) -> str | None:
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise RequestError("tool_choice.type: expected one of auto, any, tool, none")
    if choice["type"] == "tool":
        return "function:" + _string(choice, "name", "tool_choice")
    return {"any": "required"}.get(choice["type"], choice["type"])


def _chosen_tools(
    tools: list[dict[str, Any]], choice: str | None, system_texts: list[str]
) -> tuple[list[dict[str, Any]], bool | str]:
    """The tools ``choice`` leaves offered, and the call it forces (``forced_tool_call``); a
    required call is also asked for in the system text."""
    if choice == "none" or not tools:
        return [], False
    if choice == "required":
        system_texts.append(REQUIRED_TOOL)
        return tools, True
    if choice is not None and choice.startswith("function:"):
        name = choice.removeprefix("function:")
        tools = [tool for tool in tools if tool["function"]["name"] == name]
        if not tools:
            raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools")
        system_texts.append(NAMED_TOOL.format(name=name))
        return tools, name
    return tools, False


def _thinking_enabled(body: dict[str, Any], effort: str | None, effort_field: str) -> bool:
    if effort is not None and effort not in EFFORTS:
        raise RequestError(f"{effort_field}: unknown level {effort!r}; expected one of {', '.join(EFFORTS)}")
    switches = []
    thinking = body.get("thinking")
    if isinstance(thinking, bool):
        switches.append(thinking)
    elif isinstance(thinking, dict):
        if thinking.get("type") not in THINKING_TYPES:
            raise RequestError(
                f"thinking.type: expected one of {', '.join(THINKING_TYPES)}, not {thinking.get('type')!r}"
            )
        switches.append(thinking["type"] != "disabled")
    elif thinking is not None:
        raise RequestError(f"thinking must be an object or a boolean, not {_json_type(thinking)}")
    think = _optional(body, "think", bool, "a boolean")
    if think is not None:
        switches.append(think)
    if effort == "none":
        switches.append(False)
    if switches:
        return all(switches)
    return _optional(body, "model", str, "a string") != "deepseek-chat"


def _effort_level(effort: str | None) -> str | None:
    if effort is None:
        return None
    return "max" if effort == "max" else "high"


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("messages: missing")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object, not {_json_type(message)}")
        if "role" not in message:
            raise RequestError(f"messages[{index}].role: missing")
    return messages


def _text(content: Any, where: str) -> str:
    """A message's text: a string, null, or an array of parts (text parts kept, others marked)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(
            f"{where} must be a string or an array of content parts, not {_json_type(content)}"
        )
    return "\n\n".join(_part_text(part, f"{where}[{index}]") for index, part in enumerate(content))


def _part_text(part: Any, where: str) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(f"{where} must be a content part object with a string 'type'")
    if part["type"] != "text":
        return f"[Unsupported {part['type']}]"
    return _string(part, "text", where)


def _openai_assistant(message: dict[str, Any], where: str) -> Message:
    assistant: Message = {"role": "assistant", "content": _text(message.get("content"), f"{where}.content")}
    reasoning = _optional(message, "reasoning_content", str, "a string", f"{where}.")
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    tool_calls = _optional(message, "tool_calls", list, "an array", f"{where}.")
    if tool_calls:
        assistant["tool_calls"] = [
            _openai_tool_call(call, f"{where}.tool_calls[{index}]") for index, call in enumerate(tool_calls)
        ]
    return assistant


def _openai_tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise RequestError(f"{where} must be an object, not {_json_type(call)}")
    function = call.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"{where}.function: missing or not an object")
    return _tool_call(
        _string(call, "id", where),
        _string(function, "name", f"{where}.function"),
        _string(function, "arguments", f"{where}.function"),
    )


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _openai_tools(tools: Any) -> list[dict[str, Any]]:
    """The function tools, passed on as the client wrote them (the prompt shows their JSON)."""
    kept = []
    for index, tool in enumerate(_array(tools, "tools")):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where} must be an object, not {_json_type(tool)}")
        if tool.get("type") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function: missing or not an object")
        _string(function, "name", f"{where}.function")
        kept.append({"type": "function", "function": function})
    return kept


def _anthropic_system(system: Any) -> list[str]:
    if system is None:
        return []
    if isinstance(system, str):
        return [system]
    if not isinstance(system, list):
        raise RequestError(f"system must be a string or an array of text blocks, not {_json_type(system)}")
    texts = [_part_text(block, f"system[{index}]") for index, block in enumerate(system)]
    return [text for text in texts if not text.startswith("x-anthropic-")]


def _anthropic_user(content: Any, where: str) -> list[Message]:
    """A user message's blocks in order: runs of text become user messages, results tool messages."""
    if not isinstance(content, list):
        return [{"role": "user", "content": _text(content, f"{where}.content")}]
    messages: list[Message] = []
    texts: list[str] = []
    for index, block in enumerate(content):
        block_where = f"{where}.content[{index}]"
        if isinstance(block, dict) and block.get("type") == "tool_result":
            if texts:
                messages.append({"role": "user", "content": "\n\n".join(texts)})
                texts = []
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _engine_call_id(_string(block, "tool_use_id", block_where)),
                    "content": _text(block.get("content"), f"{block_where}.content"),
                }
            )
        else:
            texts.append(_part_text(block, block_where))
    if texts:
        messages.append({"role": "user", "content": "\n\n".join(texts)})
    return messages


def _engine_call_id(tool_use_id: str) -> str:
    """The engine's ``call_…`` id of a ``toolu_…`` id the server handed out (the inverse of
    ``server.anthropic.tool_id``), so the engine finds the exact text of the call it wrote."""
    return "call_" + tool_use_id.removeprefix("toolu_") if tool_use_id.startswith("toolu_") else tool_use_id


def _anthropic_assistant(content: Any, where: str) -> Message:
    if not isinstance(content, list):
        return {"role": "assistant", "content": _text(content, f"{where}.content")}
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        block_where = f"{where}.content[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_string(block, "text", block_where))
        elif kind == "thinking":
            reasoning.append(_string(block, "thinking", block_where))
        elif kind == "tool_use":
            arguments = block.get("input")
            if not isinstance(arguments, dict):
                raise RequestError(f"{block_where}.input: missing or not an object")
            calls.append(
                _tool_call(
                    _engine_call_id(_string(block, "id", block_where)),
                    _string(block, "name", block_where),
                    json.dumps(arguments, ensure_ascii=False),
                )
            )
        elif kind != "redacted_thinking":
            raise RequestError(
                f"{block_where}: unsupported assistant block {kind!r}; expected text, thinking or tool_use"
            )
    assistant: Message = {"role": "assistant", "content": "\n\n".join(texts)}
    if reasoning:
        assistant["reasoning_content"] = "\n\n".join(reasoning)
    if calls:
        assistant["tool_calls"] = calls
    return assistant


def _anthropic_tools(tools: Any) -> list[dict[str, Any]]:
    """Client tools in OpenAI's function shape; server tools (web search, ...) have no schema here."""
    kept = []
    for index, tool in enumerate(_array(tools, "tools")):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where} must be an object, not {_json_type(tool)}")
        if "input_schema" not in tool and tool.get("type", "custom") != "custom":
            continue
        function: dict[str, Any] = {"name": _string(tool, "name", where)}
        if "description" in tool:
            function["description"] = _string(tool, "description", where)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise RequestError(f"{where}.input_schema: missing or not an object")
        function["parameters"] = schema
        kept.append({"type": "function", "function": function})
    return kept


def _array(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"{where} must be an array, not {_json_type(value)}")
    return value


def _string(container: dict[str, Any], key: str, where: str) -> str:
    value = container.get(key)
    if value is None:
        raise RequestError(f"{where}.{key}: missing")
    if not isinstance(value, str):
        raise RequestError(f"{where}.{key} must be a string, not {_json_type(value)}")
    return value


def _optional(container: dict[str, Any], key: str, kind: type, described: str, prefix: str = "") -> Any:
    value = container.get(key)
    if value is not None and not isinstance(value, kind):
        raise RequestError(f"{prefix}{key} must be {described}, not {_json_type(value)}")
    return value


def _unknown_role(role: Any, where: str, expected: tuple[str, ...]) -> RequestError:
    return RequestError(f"{where}.role: unknown role {role!r}; expected one of {', '.join(expected)}")


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
