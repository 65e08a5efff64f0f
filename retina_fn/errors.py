"""Errors that a user can fix: bad input, not a bug.

Each is raised where input is checked (a config field, a flag, a file named by either, an annotation file, an
image, a weights file) and says what is wrong and how to put it right. The programs (`experiments.cli`) print
such an error as `error: <message>` and exit with status 2; every other exception keeps its traceback, so a
bug deep in the maths is never mistaken for a user's mistake.

Every class here also derives from the built-in exception a caller would catch without knowing this module
(ValueError, FileNotFoundError, ImportError, FileExistsError), so `except ValueError` keeps working. Classes
raised elsewhere derive from `UserError` too: `retina_fn.data.coco_schema.CocoFormatError` (through
`InputFormatError`), `retina_fn.data.images.ImageLoadError`, `retina_fn.interop.mapping.CheckpointMismatch`.

    raise errors.ConfigError("optim.lr must be > 0, got -1")
    except errors.UserError as err: print(f"error: {err}")
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors the user can fix; its message names the input at fault and the fix."""


class ConfigError(UserError, ValueError):
    """A config field or command-line value that cannot work as given (out of range, an unknown choice, or
    settings that do not go together)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that a flag, a config field or another file names does not exist."""


class InputFormatError(UserError, ValueError):
    """A file that exists but is not what it should be (an annotation file, an export folder's model.json)."""


class MissingDependencyError(UserError, ImportError):
    """An optional package that the requested feature needs is not installed; the message says how to add it."""


class OutputExistsError(UserError, FileExistsError):
    """An output location holds files that the program refuses to replace."""


class RunInterrupted(KeyboardInterrupt):
    """The user stopped a program (SIGINT: Ctrl-C); the message says what is kept and how to go on. Not a mistake:
    the programs print it as `interrupted: <message>` and exit with status 130 (128 + SIGINT), as a shell does."""
