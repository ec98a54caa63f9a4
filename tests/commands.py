"""Runs mfer-jax commands in a subprocess, as a user would, and checks their error contract."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(target: str, *args: str, cwd: str | os.PathLike = ROOT, timeout: float = 900,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs ``python -m <target> args`` (or ``python <target> args`` for a .py path).

  The child gets the repository on PYTHONPATH, so it imports this checkout's code whatever
  its working directory.
  """
  command = [sys.executable, str(target)] if target.endswith(".py") else [
      sys.executable, "-m", target]
  child_env = dict(os.environ if env is None else env)
  child_env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return subprocess.run(command + list(args), cwd=cwd, env=child_env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def assert_user_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
  """Asserts the documented error contract: exit ``code``, one ``error:`` line naming the
  fragments, and no traceback. Returns that line."""
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]
