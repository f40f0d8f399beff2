"""Run a command with its stderr on a pseudo-terminal, as a user's shell would, and read what it showed."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import termios


def run_with_terminal_stderr(command: list[str], **kwargs: object) -> tuple[int, str, str]:
    """(exit status, stdout, what appeared on the terminal) for ``command`` with stderr on a pty."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal's size
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=follower, text=True, **kwargs)
    finally:
        os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return result.returncode, result.stdout, b"".join(chunks).decode(errors="replace")
