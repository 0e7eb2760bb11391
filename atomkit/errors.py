"""Typed errors. Each names the thing that failed and says what to do about it."""
from __future__ import annotations

from pathlib import Path


class AtomkitError(Exception):
    """Base class of every error atomkit raises on purpose."""


class VideoError(AtomkitError):
    """A video that cannot be opened, probed or decoded."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnknownModel(AtomkitError):
    """A model name that is not in the registry."""

    def __init__(self, name: str, valid: list[str]):
        self.name = name
        self.valid = list(valid)
        super().__init__(f"unknown model {name!r}; available models: {', '.join(self.valid)}")


class UnknownBackend(AtomkitError):
    """A decode backend name that is not in ``atomkit.decode.engine.BACKENDS``."""

    def __init__(self, name: str, valid: list[str]):
        self.name = name
        self.valid = list(valid)
        super().__init__(f"unknown decode backend {name!r}; available backends: {', '.join(self.valid)}")


class ModelNotFound(AtomkitError):
    """Weights that a model needs are not on disk."""

    def __init__(self, model: str, missing: str, fix: str):
        self.model = model
        self.missing = missing
        self.fix = fix
        super().__init__(f"{model}: {missing} not found. {fix}")


class SessionClosed(AtomkitError):
    """A call into a ``Session`` after its ``close()`` began."""

    def __init__(self, model: str):
        self.model = model
        super().__init__(f"the session for {model!r} is closed (close() was called); open a new "
                         f"atomkit.Session({model!r}) to go on")


class InputError(AtomkitError):
    """A user input (prompt, query, argument) that cannot be used as given."""


class ScriptError(AtomkitError):
    """Decoder output that is not a usable assembly script."""


class AssemblyError(AtomkitError):
    """The output video could not be written."""


class PipelineError(AtomkitError):
    """A stage of an executor failed; the original exception is the __cause__."""


class OutputError(AtomkitError):
    """An output that could not be written (a full disk); the user's file or folder is left as it was."""
