"""The chat test data in tests/data/chat: DeepSeek's own encoder cases and the reference renders."""

from __future__ import annotations

import json
from pathlib import Path

from dwarfstar.chat.tokens import DSML

DATA = Path(__file__).parent / "data/chat"

# 80 conversations rendered by DeepSeek's reference encoder (see tests/data/chat).
RENDER_VECTORS = [
    json.loads(line) for line in (DATA / "render_vectors.jsonl").read_text(encoding="utf-8").splitlines()
]

# DeepSeek's own encoder tests: cases 1-3 in thinking mode, case 4 (a quick-instruction task) in chat mode.
OFFICIAL_CASES = [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")]


def official_case(case: int) -> tuple[list[dict], str]:
    """The messages and expected prompt of an official encoder case. Case 1 keeps its tools beside
    the messages; the official test puts them on the system message."""
    data = json.loads((DATA / f"official/test_input_{case}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    return messages, (DATA / f"official/test_output_{case}.txt").read_text(encoding="utf-8")


# One OpenAI function tool and the answer that calls it, as the model samples it (the engine and
# KV cache tests script this answer token by token).
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def weather_call(days: str = "2") -> str:
    """A short preamble, then get_weather(city="Rome", days=<days>) in DSML."""
    return (
        f'Checking.\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true">Rome</{DSML}parameter>\n'
        f'<{DSML}parameter name="days" string="false">{days}</{DSML}parameter>\n'
        f"</{DSML}invoke>\n</{DSML}tool_calls>"
    )
