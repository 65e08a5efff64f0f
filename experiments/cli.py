"""How the programs end on a user's mistake: one line, `error: <message>`, and exit status 2; anything else
keeps its traceback.

    if __name__ == "__main__":
        cli.run(main)                          # an absl program: flags parsed and main run as below
    sys.exit(cli.call(main, argv))             # any other entry point (make_synthetic's argparse)

A user's mistake is:
- a `retina_fn.errors.UserError` (raised where input is checked: config values, missing files, annotation
  files, images, weights and checkpoints) or absl's `app.UsageError` (flags that do not go together);
- a flag that does not parse: an unknown flag, a value of the wrong type, a missing required flag, a config
  file that does not exist, or an override naming no config field (`--config.optim.lrr=0.1`: the line names
  the nearest fields). These happen before main runs, while absl parses the command line.

Nothing else is caught: an unexpected ValueError deep in the maths is a bug and ends in its traceback.
`RETINA_FN_DEBUG=1` in the environment shows the traceback of a user's mistake too.

Ctrl-C (SIGINT) is not a mistake either: it ends in one line, `interrupted: <what is kept and how to go on>`
(`retina_fn.errors.RunInterrupted`'s message; training names the checkpoint the same command resumes from), and
exit status 130, as a shell reports a program stopped by SIGINT.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections.config_flags import config_flags as ml_config_flags

from retina_fn import errors

DEBUG_ENV = "RETINA_FN_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
USER_ERRORS = (errors.UserError, app.UsageError)
_CONFIG_PATH_MODULE = "ml_collections.config_flags.config_path"  # resolves `--config.a.b` overrides


def debugging() -> bool:
    """Whether RETINA_FN_DEBUG asks for tracebacks of user errors too (set, and not '', '0', 'false', 'no')."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_message(err: BaseException) -> str:
    """The text after 'error: ': the exception's message. torch's DataLoader re-raises a worker's exception
    with the worker's traceback in front of its message ('Caught ImageLoadError in DataLoader worker process
    0. Original Traceback ...'); for such an exception, the worker's own message."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        name = f"\n{type(err).__module__}.{type(err).__qualname__}: "
        cut = text.rfind(name)
        if cut >= 0:
            return text[cut + len(name):].rstrip()
    return text


def report(message: str) -> int:
    """Prints 'error: <message>' to stderr; returns EXIT_USER_ERROR."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def report_interrupt(err: KeyboardInterrupt) -> int:
    """Prints 'interrupted: <message>' to stderr (a RunInterrupted's message, else that the program was stopped);
    returns EXIT_INTERRUPTED."""
    message = str(err) if isinstance(err, errors.RunInterrupted) and str(err) else "stopped by SIGINT (Ctrl-C)"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting adds no traceback
    sys.stdout.flush()
    print(f"interrupted: {message}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def call(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs), with a user's mistake and Ctrl-C printed as one line.

    Returns:
      fn's result; EXIT_USER_ERROR (2) after printing 'error: ...' when fn raised one of USER_ERRORS;
      EXIT_INTERRUPTED (130) after printing 'interrupted: ...' when it raised KeyboardInterrupt.

    Raises:
      Whatever else fn raises; USER_ERRORS and KeyboardInterrupt too when `debugging()`.
    """
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        if debugging():
            raise
        return report(error_message(err))
    except KeyboardInterrupt as err:
        if debugging():
            raise
        return report_interrupt(err)


def _config_flag_frame(tb) -> tuple[str, str] | None:
    """(flag name, file argument) of the config-file flag being parsed when the traceback was raised."""
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, flags.Flag) and ml_config_flags.is_config_flag(owner):
            argument = tb.tb_frame.f_locals.get("argument")
            if isinstance(argument, str):
                return owner.name, argument
        tb = tb.tb_next
    return None


def _override_frame(tb) -> tuple[str, Any] | None:
    """(override path, config) of the outermost frame of ml_collections' override resolution, if any."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == _CONFIG_PATH_MODULE:
            path = frame.f_locals.get("config_path", frame.f_locals.get("override"))
            if isinstance(path, str) and "config" in frame.f_locals:
                return path, frame.f_locals["config"]
        tb = tb.tb_next
    return None


def missing_config_file(name: str, argument: str) -> str | None:
    """'--config X: config file not found' when the file part of a config flag's value (before any ':') is
    not a file, else None."""
    path = argument.split(":", 1)[0]
    if os.path.isfile(path):
        return None
    return f"--{name} {argument}: config file not found (relative paths are taken from {os.getcwd()})"


def unknown_field(config, path: str, flag: str = "config") -> str | None:
    """What is wrong with an override path that names no field of `config`, with the nearest field names.

    Args:
      config: the loaded config (a ConfigDict or nested mappings).
      path: the dotted override path after '--config.', e.g. 'optim.lrr'.
      flag: the config flag's name.

    Returns:
      e.g. "--config.optim.lrr: optim has no field 'lrr'. Did you mean --config.optim.lr?", or None when
      every part of the path is a field (the problem is something else).
    """
    node, walked = config, []
    for part in path.split("."):
        where = ".".join(walked) or "the config"
        keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else None
        if keys is None:
            return f"--{flag}.{path}: {where} is a value ({type(node).__name__}), not a group of fields"
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
            prefix = f"--{flag}." + "".join(f"{w}." for w in walked)
            hint = (f"Did you mean {' or '.join(prefix + c for c in close)}?" if close
                    else f"Its fields: {', '.join(sorted(keys))}.")
            return f"--{flag}.{path}: {where} has no field {part!r}. {hint}"
        node = node[part]
        walked.append(part)
    return None


def _parse_problem(err: BaseException) -> str | None:
    """The user's mistake behind an exception raised while absl parsed the flags, or None for anything else."""
    if isinstance(err, flags.Error):
        return str(err)
    found = _config_flag_frame(err.__traceback__)
    if found is not None:
        missing = missing_config_file(*found)
        if missing:
            return missing
    override = _override_frame(err.__traceback__)
    if override is not None and isinstance(err, (AttributeError, KeyError, IndexError)):
        return unknown_field(override[1], override[0], found[0] if found else "config")
    return None


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing, with a user's mistake printed as one line and exit status 2.

    Args:
      argv: the command line, program name first.
      flag_values: the flags to parse into (absl's global FLAGS by default).

    Returns:
      The arguments left after the flags (the program name first), as absl gives them to main.

    Raises:
      SystemExit(2): after printing 'error: ...' for a user's mistake (see the module docstring);
      any other exception from parsing, unchanged (all of them when `debugging()`).
    """
    try:
        rest = flag_values(list(argv))
    except Exception as err:  # noqa: BLE001 - only the user's mistakes are reported; the rest re-raised
        problem = _parse_problem(err)
        if problem is None or debugging():
            raise
        sys.exit(report(problem))
    for name in list(flag_values):
        flag = flag_values[name]
        if ml_config_flags.is_config_flag(flag) and flag.present:
            missing = missing_config_file(name, ml_config_flags.get_config_filename(flag))
            if missing and not debugging():
                sys.exit(report(missing))
    return rest


def run(main: Callable[[list[str]], Any]) -> None:
    """absl's app.run(main) with `parse_flags` and `call`: a user's mistake, in the flags or in main, ends in
    one 'error: ...' line and exit status 2."""
    app.run(lambda argv: call(main, argv), flags_parser=parse_flags)


def parse_canvas(text: str) -> tuple[int, int]:
    """A --canvas value: 'HxW' with positive integers, e.g. '512x768' -> (512, 768).

    Raises:
      ConfigError: naming --canvas, when the text is not of that form.
    """
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise errors.ConfigError(f"--canvas must be HxW with positive integers, e.g. 512x512; got {text!r}")
    return int(parts[0]), int(parts[1])
