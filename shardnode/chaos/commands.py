"""Running `ip`, `nft` and `tc` for the namespace mode and the network faults.

Every failure raises `NetworkCommandError` naming the command and what it
wrote to stderr, so that a test that cannot build its network, or a fault
that cannot be applied, says why in one line instead of leaving a half-made
network and a vague error.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

from ..errors import ShardnodeError

#: Long enough for `ip netns add` on a loaded machine; an `ip`, `nft` or
#: `tc` call that takes longer than this is stuck.
COMMAND_TIMEOUT_SECONDS = 30.0


class NetworkCommandError(ShardnodeError):
    """An `ip`, `nft` or `tc` command failed (or did not start, or hung)."""

    def __init__(self, command: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.command = tuple(command)
        self.returncode = returncode
        self.stderr = stderr.strip()
        status = "did not finish" if returncode is None else f"exited {returncode}"
        detail = " / ".join(line.strip() for line in self.stderr.splitlines() if line.strip()) or "no message"
        super().__init__(f"`{shlex.join(self.command)}` {status}: {detail}")


def run(command: Sequence[str], *, input: str | None = None, ok_errors: Sequence[str] = ()) -> str:
    """Run `command` and return its stdout.

    A failure whose stderr contains one of `ok_errors` counts as success
    (returns ""): that is how the idempotent steps (deleting what is already
    gone) say "nothing to do"."""
    try:
        done = subprocess.run(list(command), input=input, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    except FileNotFoundError:
        raise NetworkCommandError(command, 127, f"{command[0]}: command not found") from None
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise NetworkCommandError(command, None, f"timed out after {COMMAND_TIMEOUT_SECONDS:g} s {stderr}") from None
    if done.returncode != 0:
        if any(text in done.stderr for text in ok_errors):
            return ""
        raise NetworkCommandError(command, done.returncode, done.stderr)
    return done.stdout
