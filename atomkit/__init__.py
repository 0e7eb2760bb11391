"""atomkit: ATOM-style video-language pipelines with resident, reusable modules.

    >>> import atomkit
    >>> with atomkit.Session("default") as s:                 # doctest: +SKIP
    ...     reel = s.assemble(atomkit.sample_videos(), "make a highlight reel", "out/")

Names are imported on first use (PEP 562), so ``import atomkit`` and the command line's thin paths (a call
answered by ``atomkit serve``) do not pay for torch; ``atomkit.Session`` loads it.
"""
from __future__ import annotations

import importlib
import importlib.util

from atomkit.version import __version__ as __version__  # re-exported

_WHERE = {
    "atomkit.config": ("DecodeConfig", "WindowConfig"),
    "atomkit.errors": ("AssemblyError", "AtomkitError", "InputError", "ModelNotFound", "OutputError", "PipelineError",
                       "ScriptError", "SessionClosed", "UnknownBackend", "UnknownModel", "VideoError"),
    "atomkit.media.video": ("Clip", "VideoInfo", "clips", "probe", "sample_frames"),
    "atomkit.media.scan": ("sample_videos",),
    "atomkit.models.registry": ("available_models", "get_spec"),
    "atomkit.pipeline.executor": ("PipelinedExecutor", "SequentialExecutor"),
    "atomkit.pipeline.session": ("Session",),
    "atomkit.pipeline.tasks": ("Assembly", "CaptionedClip", "Captions", "Hit", "Index", "Skipped", "assemble",
                               "caption", "index", "retrieve"),
    "atomkit.retrieval.library": ("Library", "LibraryError"),
    "atomkit.serve.client": ("connect",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted([*_MODULE_OF, "__version__", "io"])


def __getattr__(name: str):
    if name == "io":
        return importlib.import_module("atomkit.io")
    module = _MODULE_OF.get(name)
    if module is None:
        if importlib.util.find_spec(f"atomkit.{name}") is not None:  # a subpackage: atomkit.retrieval.library, ...
            return importlib.import_module(f"atomkit.{name}")
        raise AttributeError(f"module 'atomkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
