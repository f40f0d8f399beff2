"""DeepSeek V4's prompt format, byte for byte as DeepSeek's official encoder writes it.

The model was trained on exactly these bytes, so every rule of the official encoder is kept,
including the odd ones: tool results become ``<tool_result>`` blocks in a user turn (sorted
into the order of the calls), consecutive user turns merge with a blank line between them,
reasoning before the last user turn is dropped unless some message offers tools, and a
developer message before the last user turn is dropped with it.

``render_parts`` gives the same text as consecutive parts, each marked as the template's own
markup or as text from the request (message content, reasoning, tool results, tool schemas,
names, tool-call arguments). The tokenizer recognises special tokens only in the markup, so
text from a request can never open a turn, close thinking or end the sequence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dwarfstar.chat.conversation import Conversation, Message
from dwarfstar.chat.tokens import (
    ASSISTANT,
    BOS,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    LATEST_REMINDER,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TASK_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
    TOOL_RESULT_CLOSE,
    TOOL_RESULT_OPEN,
    USER,
)

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
REASONING_EFFORTS = (None, "high", "max")

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, "
    "and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

TOOLS_SECTION = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "{TOOL_CALLS_OPEN}" block like the following:

{TOOL_CALLS_OPEN}
{INVOKE_OPEN} name="$TOOL_NAME">
{PARAMETER_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN} name="$TOOL_NAME2">
...
{INVOKE_CLOSE}
{TOOL_CALLS_CLOSE}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_OPEN}), you MUST output your complete reasoning inside {THINK_OPEN}...{THINK_CLOSE} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_CLOSE} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501 (the model's own text, one paragraph a line)

RESPONSE_FORMAT_SECTION = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)

# A piece of the prompt: its text, and True when it is the template's own markup (where special
# tokens count), False when it came from the request (where they are plain text).
Part = tuple[str, bool]


def _markup(text: str) -> list[Part]:
    return [(text, True)]


def _text(text: str) -> list[Part]:
    return [(text, False)]


def _joined(pieces: Sequence[list[Part]], separator: str) -> list[Part]:
    """``separator.join`` over pieces of parts; the separator is markup."""
    out: list[Part] = []
    for index, piece in enumerate(pieces):
        if index:
            out += _markup(separator)
        out += piece
    return out


def render(conversation: Conversation) -> str:
    """The prompt for ``conversation``, ending where the model starts writing."""
    return "".join(text for text, _ in render_parts(conversation))


def render_parts(conversation: Conversation, replay: Mapping[str, str] | None = None) -> list[Part]:
    """The prompt of ``render`` as consecutive ``(text, is_markup)`` parts, for the tokenizer.

    ``replay`` maps tool-call ids to the exact ``invoke`` text the model wrote for them: a call
    sent back with a known id is rendered as written, whatever its arguments' serialization.
    """
    return render_message_parts(
        conversation.messages,
        thinking_mode=conversation.thinking_mode,
        reasoning_effort=conversation.reasoning_effort,
        drop_thinking=conversation.drop_thinking,
        continue_final_message=conversation.continue_final_message,
        replay=replay,
    )


def render_messages(
    messages: Sequence[Message],
    thinking_mode: str = "thinking",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
) -> str:
    """Render official-form messages (see ``dwarfstar.chat.conversation``) to prompt text.

    When the last turn is a user (or developer) turn, the prompt ends with the opening of
    the assistant's answer: ``<｜Assistant｜><think>`` in thinking mode, ``<｜Assistant｜></think>``
    in chat mode.
    """
    parts = render_message_parts(messages, thinking_mode, reasoning_effort, drop_thinking)
    return "".join(text for text, _ in parts)


def render_message_parts(
    messages: Sequence[Message],
    thinking_mode: str = "thinking",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    continue_final_message: bool = False,
    replay: Mapping[str, str] | None = None,
) -> list[Part]:
    """``render_messages`` as parts: adjacent parts of the same kind merged, none empty.

    ``continue_final_message``: a last assistant turn is left open (no end of sentence), so
    the prompt ends inside it; its thinking block is closed.
    """
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', not {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be None, 'high' or 'max', not {reasoning_effort!r}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a message dict, not {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(
                f"messages[{index}]: unknown role {message.get('role')!r}; expected one of {', '.join(ROLES)}"
            )

    turns = _sort_tool_results(_merge_tool_results(messages))
    thinking = thinking_mode == "thinking"
    # Offering tools keeps every turn's reasoning: the model reasons across a whole tool loop.
    drop = drop_thinking and not any(turn.get("tools") for turn in turns)
    if thinking and drop:
        turns = _drop_old_turns(turns)

    last_user = _last_user_index(turns)
    parts = _markup(BOS)
    if turns and thinking and reasoning_effort == "max":
        parts += _markup(THINK_MAX_PREFIX)
    for index in range(len(turns)):
        turn_parts = _render_turn(index, turns, thinking, drop, last_user, replay or {})
        if continue_final_message and index == len(turns) - 1 and turns[index]["role"] == "assistant":
            assert turn_parts[-1] == (EOS, True)
            turn_parts = turn_parts[:-1]
        parts += turn_parts
        parts += _markup(_next_turn_opening(index, turns, thinking, drop, last_user))
    merged: list[Part] = []
    for text, is_markup in parts:
        if not text:
            continue
        if merged and merged[-1][1] == is_markup:
            merged[-1] = (merged[-1][0] + text, is_markup)
        else:
            merged.append((text, is_markup))
    return merged


def _merge_tool_results(messages: Sequence[Message]) -> list[Message]:
    """Fold tool messages, and runs of user messages, into single user turns of blocks.

    V4 has no tool role: a tool result is a ``<tool_result>`` block in a user turn. A tool
    result always joins the user turn before it; a user message does unless that turn
    carries a task.
    """
    turns: list[Message] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id") or "",
                "content": message.get("content"),
            }
            if turns and "blocks" in turns[-1]:
                turns[-1]["blocks"].append(block)
            else:
                turns.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": message.get("content") or ""}
            if turns and "blocks" in turns[-1] and turns[-1].get("task") is None:
                turns[-1]["blocks"].append(block)
            else:
                turn = {"role": "user", "blocks": [block]}
                if message.get("task") is not None:
                    turn["task"] = message["task"]
                turns.append(turn)
        else:
            turns.append(dict(message))
    return turns


def _sort_tool_results(turns: list[Message]) -> list[Message]:
    """Put each user turn's tool results in the order of the preceding assistant's calls.

    Results whose id matches no call sort as if they answered the first call; text blocks
    keep their places.
    """
    call_order: dict[str, int] = {}
    for turn in turns:
        if turn["role"] == "assistant" and turn.get("tool_calls"):
            call_order = {}
            for position, call in enumerate(turn["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    call_order[call_id] = position
        elif "blocks" in turn and call_order:
            results = [block for block in turn["blocks"] if block["type"] == "tool_result"]
            if len(results) > 1:
                ordered = iter(sorted(results, key=lambda block: call_order.get(block["tool_use_id"], 0)))
                turn["blocks"] = [
                    next(ordered) if block["type"] == "tool_result" else block for block in turn["blocks"]
                ]
    return turns


def _drop_old_turns(turns: list[Message]) -> list[Message]:
    """Before the last user turn: strip assistant reasoning and drop developer turns."""
    last_user = _last_user_index(turns)
    kept = []
    for index, turn in enumerate(turns):
        if index >= last_user or turn["role"] in ("system", "user", "latest_reminder"):
            kept.append(turn)
        elif turn["role"] == "assistant":
            kept.append({key: value for key, value in turn.items() if key != "reasoning_content"})
    return kept


def _last_user_index(turns: Sequence[Message]) -> int:
    return max((i for i, turn in enumerate(turns) if turn["role"] in ("user", "developer")), default=-1)


def _render_turn(
    index: int,
    turns: Sequence[Message],
    thinking: bool,
    drop: bool,
    last_user: int,
    replay: Mapping[str, str],
) -> list[Part]:
    turn = turns[index]
    role = turn["role"]
    if role == "system":
        return _text(turn.get("content") or "") + _tools_and_format(turn)
    if role == "developer":
        if not turn.get("content"):
            raise ValueError(f"developer message at turn {index} has no content")
        return _markup(USER) + _text(turn["content"]) + _tools_and_format(turn)
    if role == "user":
        return _markup(USER) + _joined([_render_block(block) for block in turn["blocks"]], "\n\n")
    if role == "latest_reminder":
        return _markup(LATEST_REMINDER) + _text(turn.get("content") or "")

    parts: list[Part] = []
    follows_task = index > 0 and turns[index - 1].get("task") is not None
    if thinking and not follows_task and (not drop or index > last_user):
        parts += _text(turn.get("reasoning_content") or "") + _markup(THINK_CLOSE)
    parts += _text(turn.get("content") or "")
    if turn.get("tool_calls"):
        invokes = _joined(
            [
                _markup(replay[call["id"]])
                if call.get("id") in replay
                else _render_tool_call(call["function"])
                for call in turn["tool_calls"]
            ],
            "\n",
        )
        parts += tool_calls_opening() + invokes + _markup(f"\n{TOOL_CALLS_CLOSE}")
    return parts + _markup(EOS)


def _next_turn_opening(
    index: int, turns: Sequence[Message], thinking: bool, drop: bool, last_user: int
) -> str:
    """What opens the assistant's turn after ``turns[index]``, if one comes next or is due."""
    if index + 1 < len(turns) and turns[index + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    turn = turns[index]
    task = turn.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_TOKENS)}")
        if task != "action":
            return TASK_TOKENS[task]
        return ASSISTANT + (THINK_OPEN if thinking else THINK_CLOSE) + TASK_TOKENS[task]
    if turn["role"] not in ("user", "developer"):
        return ""
    opens_thinking = thinking and (not drop or index >= last_user)
    return ASSISTANT + (THINK_OPEN if opens_thinking else THINK_CLOSE)


def _tools_and_format(turn: Message) -> list[Part]:
    parts: list[Part] = []
    if turn.get("tools"):
        before, after = TOOLS_SECTION.split("{schemas}")
        schemas = _joined([_text(_to_json(tool["function"])) for tool in turn["tools"]], "\n")
        parts += _markup("\n\n" + before) + schemas + _markup(after)
    if turn.get("response_format"):
        parts += _markup("\n\n" + RESPONSE_FORMAT_SECTION) + _text(_to_json(turn["response_format"]))
    return parts


def _render_block(block: dict[str, Any]) -> list[Part]:
    if block["type"] == "text":
        return _text(block["text"])
    content = block["content"]
    if isinstance(content, list):
        content = "\n\n".join(
            part.get("text", "") if part.get("type") == "text" else f"[Unsupported {part.get('type')}]"
            for part in content
        )
    return _markup(TOOL_RESULT_OPEN) + _text(content or "") + _markup(TOOL_RESULT_CLOSE)


def _render_tool_call(function: dict[str, Any]) -> list[Part]:
    """One ``invoke``: string arguments raw, every other value as JSON."""
    raw = function["arguments"]
    try:
        arguments = json.loads(raw)
    except (TypeError, ValueError):
        arguments = None
    if not isinstance(arguments, dict):
        arguments = {"arguments": raw}
    parameters = [
        _markup(f'{PARAMETER_OPEN} name="')
        + _text(str(key))
        + _markup(f'" string="{"true" if isinstance(value, str) else "false"}">')
        + _text(value if isinstance(value, str) else _to_json(value))
        + _markup(PARAMETER_CLOSE)
        for key, value in arguments.items()
    ]
    return _invoke_opening(str(function["name"])) + _joined(parameters, "\n") + _markup(f"\n{INVOKE_CLOSE}")


def tool_calls_opening(name: str | None = None) -> list[Part]:
    """How an answer's tool-calls block opens, through the first call's name when ``name`` is
    given: spelled as history renders it, so a forced call (``Conversation.forced_tool_call``)
    is written exactly as the model would write it."""
    opening = _markup(f"\n\n{TOOL_CALLS_OPEN}\n")
    return opening if name is None else opening + _invoke_opening(name)


def _invoke_opening(name: str) -> list[Part]:
    return _markup(f'{INVOKE_OPEN} name="') + _text(name) + _markup('">\n')


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
