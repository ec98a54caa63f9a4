"""The errors a user can cause, and the exit codes every command maps them to.

A `UserError`'s message is one line that names the thing at fault (file and line, config key,
flag, value) and says how to fix it. Commands run through `mfer_jax.cli.run`, which prints
``error: <message>`` and exits with the error's code, with no traceback: a traceback means a
bug of ours. Domain errors subclass `UserError` (and, where it helps callers, a builtin such
as FileNotFoundError or ValueError).

Exit codes (documented in the README):
  0    success
  1    a data, file or run error (`UserError`)
  2    a usage error: bad flag, config key or value (`UsageError`)
  130  interrupted by Ctrl-C before anything could be saved
  143  preempted (SIGTERM/SIGINT) after saving a checkpoint; rerun the same command to resume
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_PREEMPTED = 143


class UserError(Exception):
  """An error the user can fix; its message says what and how, on one line."""

  exit_code = EXIT_ERROR


class UsageError(UserError):
  """A bad flag, config key or config value."""

  exit_code = EXIT_USAGE


class Preempted(UserError):
  """SIGTERM/SIGINT stopped a run after it saved a checkpoint; rerunning resumes it.

  Not a mistake: commands print it as ``preempted: <message>`` (not ``error:``) and exit 143,
  so a scheduler or script can tell a preempted run from a finished (0) or failed (1) one.
  """

  exit_code = EXIT_PREEMPTED


def one_line(message: str) -> str:
  """Joins a message's lines into one ('; ' between them) for a one-line error."""
  parts = [p.strip() for p in str(message).splitlines() if p.strip()]
  return "; ".join(parts)
