"""Every error a user can cause, in one module that imports nothing.

One hierarchy: the CLIs (`pipeline/run.py`, `separate`, `sweep`, `compare.py`, `musicsep-benchmark`) catch
`UserError` and print its message, one line `<where>: <problem>; <fix>`, with exit code 2. Anything else
is a bug and keeps its traceback. The subclasses say which layer found the problem; the built-in base
each also has (`ValueError`, `RuntimeError`) keeps `except ValueError` callers of a layer working.
"""


class UserError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A configuration value (a Sacred key, a family knob) that cannot work; the message names the key."""


class StageError(UserError, RuntimeError):
    """A stage cannot run or finish on what it was given (missing or bad input, artifact, data, file)."""


class LockedError(StageError):
    """Another run holds the artifacts directory."""


class CheckpointError(UserError, ValueError):
    """A released checkpoint (or a name/shape mapping to it) that does not fit the family's model."""


class SeparateError(UserError):
    """`separate`: a problem with one input file, the output folder or the model to load."""


class SweepError(UserError):
    """`sweep` / `compare.py`: a bad grid, point or budget."""
