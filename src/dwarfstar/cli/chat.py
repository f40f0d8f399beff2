"""``ds4`` with no command: one answer (``ds4 -p PROMPT``) or an interactive chat (``ds4``).

A thin face of ``dwarfstar.engine.chat.Chat``: it reads lines, runs slash commands, and prints
the engine's events. On a terminal the reasoning is shown dimmed, prefill progress and a dim
statistics line go to stderr; piped, stdout carries the answer only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from dwarfstar.cli.common import add_model_arguments, model_path, open_model, open_tokenizer
from dwarfstar.cli.main import CommandError

if TYPE_CHECKING:
    from dwarfstar.engine import Generation, SamplingParams
    from dwarfstar.engine.chat import Chat
    from dwarfstar.engine.events import Event, Usage

HISTORY_LENGTH = 512
DIM, RESET = "\x1b[2m", "\x1b[0m"

THINKING_NOTES = {
    "think": "thinking on",
    "think-max": "thinking on, maximum effort",
    "nothink": "thinking off",
}
SESSION_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
# DeepSeek asks for at least 384K tokens of context for Think Max; ds4 gates it the same way.
THINK_MAX_MIN_CTX = 393216

HELP = """\
/help            this list
/think           think before answering (the default)
/think-max       think at maximum effort
/nothink         answer directly, no thinking
/system TEXT     set the system prompt (empty: none)
/read FILE       send a file's text as the next message
/ctx N           set the context size to N tokens
/clear           start a new conversation
/save NAME       keep this conversation (its decode state too) under NAME
/load NAME       continue a saved conversation, with no prefill
/sessions        list the saved conversations
/quit            leave (also /exit, Ctrl-D)
Ctrl-C stops an answer and keeps what was written."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to the model (the default command: `ds4 -p PROMPT`, or `ds4` for a conversation)",
        description="One answer with -p, or an interactive multi-turn chat without it.",
    )
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", help="answer this prompt and exit")
    source.add_argument("--prompt-file", type=Path, help="answer the text of this file and exit")
    p.add_argument("-s", "--system", default=None, help="system prompt")
    thinking = p.add_mutually_exclusive_group()
    thinking.add_argument(
        "--think", dest="thinking", action="store_const", const="think", help="think first (default)"
    )
    thinking.add_argument(
        "--nothink", dest="thinking", action="store_const", const="nothink", help="no thinking"
    )
    thinking.add_argument(
        "--think-max", dest="thinking", action="store_const", const="think-max", help="Think Max"
    )
    p.add_argument(
        "-n", "--tokens", type=int, default=None, help="most tokens per answer (default: the context)"
    )
    p.add_argument("-c", "--ctx", type=int, help="context size in tokens (default 32768)")
    p.add_argument("--temp", type=float, default=1.0, help="temperature (0 = greedy; default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (default 0: off)")
    p.add_argument(
        "--min-p", type=float, default=0.05, help="drop tokens under MIN_P x the top one (default 0.05)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same answer)")
    p.set_defaults(func=run, thinking="think")


def run(args: argparse.Namespace) -> int:
    from dwarfstar.engine import Engine, SamplingParams
    from dwarfstar.engine.chat import Chat

    try:
        sampling = SamplingParams(
            temperature=args.temp,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed,
            max_tokens=args.tokens,
        )
    except ValueError as err:
        raise CommandError(_option_names(str(err))) from None
    if args.ctx is not None and args.ctx < 2:
        raise CommandError(f"--ctx must be at least 2, not {args.ctx}")
    prompt = _read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    path = model_path(args)
    engine = Engine(
        open_model(path, device=args.device), open_tokenizer(path), **({"ctx": args.ctx} if args.ctx else {})
    )
    chat = Chat(engine, system=args.system or None, thinking=_thinking(args.thinking, engine.ctx))
    if prompt is not None:
        return _one_shot(chat, prompt, sampling)
    return _interactive(chat, sampling, path)


def _option_names(message: str) -> str:
    """SamplingParams speaks of fields; the user typed options."""
    names = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p"}
    names |= {"max_tokens": "-n/--tokens", "seed": "--seed"}
    field = message.split(" ", 1)[0]
    return names.get(field, field) + message[len(field) :]


def _thinking(choice: str, ctx: int) -> str:
    if choice == "think-max" and ctx < THINK_MAX_MIN_CTX:
        _note(f"Think Max needs a context of at least {THINK_MAX_MIN_CTX} tokens (-c); thinking normally")
        return "think"
    return choice


def _read_prompt_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CommandError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None


# ---- answering ----------------------------------------------------------------------------------


def _one_shot(chat: Chat, prompt: str, sampling: SamplingParams) -> int:
    from dwarfstar.chat.tokens import BOS
    from dwarfstar.engine import ContextLengthError

    try:
        if prompt.startswith(BOS):  # an already rendered prompt: sent as written
            generation = chat.engine.generate(prompt, sampling, session=chat.session)
            events: Iterator[Event] = iter(generation)
        else:
            generation = chat.send(prompt, sampling)
            events = chat.reply(generation)
    except ContextLengthError as err:
        raise CommandError(str(err)) from None
    Printer().show(generation, events)
    return 130 if generation.cancelled else 0


def _interactive(chat: Chat, sampling: SamplingParams, path: Path) -> int:
    terminal = sys.stdin.isatty()
    if terminal:
        _start_history()
        _note(f"ds4: chatting with {path} (context {chat.engine.ctx}); /help for commands, Ctrl-D to leave")
    printer = Printer()
    while True:
        try:
            line = input("ds4> ") if terminal else sys.stdin.readline()
        except KeyboardInterrupt:  # at the prompt; while an answer runs, Ctrl-C cancels it instead
            print()
            continue
        except EOFError:
            line = ""
        if not line:  # Ctrl-D or the end of piped input
            if terminal:
                print()
            return 0
        command, _, argument = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        text = _command(chat, command, argument.strip()) if command.startswith("/") else line.strip()
        if text:
            _answer(chat, text, sampling, printer)


def _answer(chat: Chat, text: str, sampling: SamplingParams, printer: Printer) -> None:
    from dwarfstar.engine import ContextLengthError

    try:
        generation = chat.send(text, sampling)
    except ContextLengthError as err:
        _note(f"error: {err}; /clear starts over, /ctx N sets the context")
        return
    printer.show(generation, chat.reply(generation))


def _command(chat: Chat, command: str, argument: str) -> str | None:
    """Run a slash command; returns a message to send, if the command makes one."""
    if command == "/help":
        _note(HELP)
    elif command in ("/think", "/think-max", "/nothink"):
        chat.thinking = _thinking(command[1:], chat.engine.ctx)
        _note(THINKING_NOTES[chat.thinking])
    elif command == "/system":
        chat.system = argument or None
        _note(f"system prompt: {argument}" if argument else "system prompt cleared")
    elif command == "/read":
        if not argument:
            _note("usage: /read FILE")
            return None
        try:
            text = Path(argument).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            _note(f"error: cannot read {argument}: {getattr(err, 'strerror', None) or err}")
            return None
        _note(f"read {argument}: {len(text)} characters")
        return text
    elif command == "/ctx":
        if not argument.isdigit() or int(argument) < 2:
            _note("usage: /ctx N (N >= 2 tokens)")
        else:
            chat.engine.ctx = int(argument)
            _note(f"context: {chat.engine.ctx} tokens")
    elif command == "/clear":
        chat.clear()
        _note("conversation cleared")
    elif command in ("/save", "/load"):
        _save_or_load(chat, command, argument)
    elif command == "/sessions":
        _list_sessions()
    else:
        _note(f"unknown command {command}; /help lists them")
    return None


def sessions_dir() -> Path:
    """Where /save keeps conversations: ``DS4_SESSIONS_DIR``, else the user's data folder."""
    override = os.environ.get("DS4_SESSIONS_DIR")
    if override:
        return Path(override)
    import platformdirs

    return platformdirs.user_data_path("dwarfstar", appauthor=False) / "sessions"


def _save_or_load(chat: Chat, command: str, name: str) -> None:
    if not SESSION_NAME.fullmatch(name):
        _note(f"usage: {command} NAME (letters, digits, '.', '_', '-')")
        return
    path = sessions_dir() / f"{name}.kv"
    try:
        if command == "/save":
            path.parent.mkdir(parents=True, exist_ok=True)
            size = chat.save(path)
            _note(f"saved {name}: {len(chat.session.tokens)} tokens, {size / 2**20:.1f} MiB ({path})")
        elif not path.exists():
            _note(f"no saved conversation {name!r}; /sessions lists them")
        else:
            chat.load(path)
            _note(f"loaded {name}: {len(chat.messages)} messages, {len(chat.session.tokens)} tokens")
    except (OSError, ValueError) as err:  # a KVFileError is a ValueError
        _note(f"error: cannot {command[1:]} {name}: {getattr(err, 'strerror', None) or err}")


def _list_sessions() -> None:
    from dwarfstar.engine.kvfile import KVFileError, read_header

    paths = sorted(sessions_dir().glob("*.kv")) if sessions_dir().is_dir() else []
    if not paths:
        _note("no saved conversations (/save NAME keeps one)")
    for path in paths:
        try:
            header = read_header(path)
        except (KVFileError, OSError) as err:
            _note(f"{path.stem}: unusable ({err})")
            continue
        chat = (header.get("extra") or {}).get("chat") or {}
        saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        messages = len(chat.get("messages") or [])
        _note(f"{path.stem}: {messages} messages, {header.get('n_tokens')} tokens, {saved}")


class Printer:
    """Prints one answer's events: reasoning dimmed (on a terminal only), content, tool calls."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = self.out.isatty()
        self.show_reasoning = self.out.isatty()

    def show(self, generation: Generation, events: Iterator[Event]) -> Usage | None:
        from tqdm import tqdm

        from dwarfstar.engine import events as ev

        bar = None
        state = "start"  # start, reasoning, content
        with _interrupts_cancel(generation):
            for event in events:
                if isinstance(event, ev.PrefillProgress):
                    if bar is None:
                        bar = tqdm(
                            total=event.total, desc="prefill", unit="tok", disable=not self.err.isatty()
                        )
                    bar.update(event.done - bar.n)
                    continue
                if bar is not None:
                    bar.close()
                    bar = None
                if isinstance(event, ev.ReasoningDelta) and self.show_reasoning:
                    self._write(event.text, dim=True)
                    state = "reasoning"
                elif isinstance(event, ev.ContentDelta | ev.Malformed) and event.text:
                    if state == "reasoning":
                        self._write("\n\n")
                    self._write(event.text)
                    state = "content"
                elif isinstance(event, ev.ToolCallStart):
                    self._write(f"\n[tool call {event.name}(", dim=True)
                elif isinstance(event, ev.ToolCallArgumentsDelta):
                    self._write(event.text, dim=True)
                elif isinstance(event, ev.ToolCallEnd):
                    self._write(")]", dim=True)
                elif isinstance(event, ev.Finished):
                    if state != "start" or event.reason == "cancelled":
                        self._write("\n")
                    self._stats(event.usage, event.reason)
                    return event.usage
        return None

    def _write(self, text: str, dim: bool = False) -> None:
        if dim and self.color and text.strip():
            text = f"{DIM}{text}{RESET}"
        self.out.write(text)
        self.out.flush()

    def _stats(self, usage: Usage, reason: str) -> None:
        line = (
            f"prompt {usage.prompt_tokens} tokens ({usage.reused_tokens} reused), "
            f"prefill {usage.prefill_tps:.1f} tok/s, "
            f"generated {usage.generated_tokens} tokens, {usage.decode_tps:.1f} tok/s"
        )
        if reason != "stop":
            line += f" [{reason}]"
        _note(line)


def _note(text: str) -> None:
    """A line for the user on stderr, dim on a terminal."""
    if sys.stderr.isatty():
        text = f"{DIM}{text}{RESET}"
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _interrupts_cancel(generation: Generation) -> Iterator[None]:
    """While an answer runs, Ctrl-C cancels it (between two tokens) instead of raising."""
    previous = signal.signal(signal.SIGINT, lambda *_: generation.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_history() -> None:
    """Line editing and a history file (``DS4_HISTORY``, default ~/.ds4_history), as ds4 keeps."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input still works
        return
    import atexit

    path = Path(os.environ.get("DS4_HISTORY", "~/.ds4_history")).expanduser()
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    atexit.register(_save_history, readline, path)


def _save_history(readline: object, path: Path) -> None:
    with contextlib.suppress(OSError):
        readline.write_history_file(path)  # type: ignore[attr-defined]
