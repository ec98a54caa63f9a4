"""The one entry-point wrapper of every mfer-jax command (main.py, tools, data_prep).

``cli.run(main)`` parses absl flags and runs ``main(argv)``, so that a user's mistake prints
one line and a documented exit code (`mfer_jax.errors`), never a traceback:

* a bad flag, config file, config argument or config key (with ml_collections' "did you
  mean" hint) -> ``error: ...`` and exit 2;
* a `errors.UserError` raised by the command -> ``error: <its message>`` and its exit code
  (1 for data and run errors, 2 for usage errors);
* `errors.Preempted` (a run stopped by SIGTERM/SIGINT after saving) -> ``preempted: ...``
  and exit 143;
* Ctrl-C outside a handler of the command's own -> exit 130.

Anything else is a bug of ours and keeps its traceback. ``--help`` prints the usage and
exits 0.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging

from mfer_jax import errors

_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def fail(message: str, code: int = errors.EXIT_ERROR, prefix: str = "error") -> NoReturn:
  """Prints ``<prefix>: <message>`` as one line to stderr and exits with ``code``."""
  sys.stderr.write(f"{prefix}: {errors.one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(code)


def _innermost(e: BaseException) -> BaseException:
  """The original exception under absl's and ml_collections' re-raises."""
  seen = set()
  while id(e) not in seen:
    seen.add(id(e))
    nxt = e.__cause__ or e.__context__
    if nxt is None:
      break
    e = nxt
  return e


def _offending_arg(argv: Sequence[str], key: str) -> str | None:
  """The command-line argument that mentions config key ``key``."""
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if re.search(rf"\.{re.escape(key)}(\.|$)", name):
      return arg
  return None


def _config_key_message(e: BaseException, argv: Sequence[str]) -> str:
  """One line for an unknown config key, keeping ml_collections' did-you-mean hint."""
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  names = re.findall(r"'([A-Za-z_][\w]*)'", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  key = names[0] if names else "?"
  arg = _offending_arg(argv, key)
  where = f"{arg}: " if arg else ""
  msg = f"{where}unknown config key {key!r}"
  if hint:
    msg += f"; did you mean {hint.group(1)!r}?"
  return msg + " (every key and its meaning: mfer_jax/config_lib.py and mfer_jax/data/config.py)"


def _flag_error_message(e: BaseException, argv: Sequence[str]) -> str:
  inner = _innermost(e)
  if isinstance(inner, (KeyError, AttributeError)) and inner is not e:
    return _config_key_message(inner, argv)
  if inner is not e and isinstance(inner, (ValueError, TypeError)):
    # A config file's get_config rejected its argument: absl's message holds a traceback.
    flag = re.match(r"flag (--[^=]+)=(\S+):", str(e))
    where = f"{flag.group(1)}={flag.group(2)}: " if flag else ""
    return where + str(inner)
  return str(e)


def _check_config_files() -> None:
  """A config file flag that failed to load is an error now, not at first use."""
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      cause = object.__getattribute__(value, "_error")
      path = flags.FLAGS[name].serialize().split("=", 1)[-1]
      detail = "no such file" if isinstance(cause, FileNotFoundError) or "No such file" in str(
          cause) else errors.one_line(str(cause))
      raise errors.UsageError(f"--{name}={path}: cannot load the config file ({detail}); "
                              "name a file such as configs/abaw.py")


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses absl flags; on a bad flag or config prints one line and exits 2."""
  try:
    rest = flags.FLAGS(list(argv))
    _check_config_files()
    return rest
  except SystemExit as e:
    if any(a.split("=", 1)[0] in _HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None   # absl exits 1 after --help; help is not an error
    raise e
  except errors.UserError as e:
    fail(str(e), e.exit_code)
  except flags.Error as e:
    fail(_flag_error_message(e, argv), errors.EXIT_USAGE)
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    # ml_collections raises these while applying --config.a.b=v overrides.
    fail(_flag_error_message(e, argv) if not isinstance(e, (KeyError, AttributeError))
         else _config_key_message(e, argv), errors.EXIT_USAGE)


def run(main: Callable[[], Any], argv: Sequence[str] | None = None) -> NoReturn:
  """Runs a command with one-line user errors and documented exit codes.

  Flags are parsed first (`parse_flags`); positional arguments are a usage error, since every
  mfer-jax command takes flags only. absl logging stays at WARNING unless ``--verbosity`` is
  given, because Orbax and Grain log every file operation at INFO (our progress goes through
  `mfer_jax.console`).

  Args:
    main: the command; returns None or an exit code, or raises.
    argv: the command line; default ``sys.argv``.
  """

  def guarded(args: list[str]) -> Any:
    if len(args) > 1:
      fail(f"unexpected arguments {args[1:]}: this command takes --flags only (see --help)",
           errors.EXIT_USAGE)
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main()
    except errors.Preempted as e:
      fail(str(e), e.exit_code, prefix="preempted")
    except errors.UserError as e:
      fail(str(e), e.exit_code)
    except app.UsageError as e:
      fail(str(e), errors.EXIT_USAGE)
    except KeyboardInterrupt:
      fail("interrupted (Ctrl-C); rerun the same command to continue",
           errors.EXIT_INTERRUPTED)

  app.run(guarded, argv=list(sys.argv if argv is None else argv), flags_parser=parse_flags)
