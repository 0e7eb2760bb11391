"""atomkit: ATOM-style video-language pipelines with resident, reusable modules.

    >>> import atomkit
    >>> with atomkit.Session("default") as s:                 # doctest: +SKIP
    ...     reel = s.assemble(atomkit.sample_videos(), "make a highlight reel", "out/")
"""
from atomkit import io
from atomkit.config import DecodeConfig, WindowConfig
from atomkit.errors import (AssemblyError, AtomkitError, InputError, ModelNotFound, OutputError, PipelineError,
                            ScriptError, SessionClosed, UnknownBackend, UnknownModel, VideoError)
from atomkit.media.video import Clip, VideoInfo, clips, probe, sample_frames
from atomkit.media.scan import sample_videos
from atomkit.models.registry import available_models, get_spec
from atomkit.pipeline.executor import PipelinedExecutor, SequentialExecutor
from atomkit.pipeline.session import Session
from atomkit.pipeline.tasks import (Assembly, CaptionedClip, Captions, Hit, Index, Skipped, assemble, caption, index,
                                    retrieve)
from atomkit.retrieval.library import Library, LibraryError
from atomkit.version import __version__

__all__ = [
    "AssemblyError", "Assembly", "AtomkitError", "CaptionedClip", "Captions", "Clip", "DecodeConfig", "Hit", "Index",
    "InputError", "Library", "LibraryError", "ModelNotFound", "OutputError", "PipelineError", "PipelinedExecutor",
    "ScriptError", "SequentialExecutor", "Session", "SessionClosed", "Skipped", "UnknownBackend", "UnknownModel",
    "VideoError", "VideoInfo", "WindowConfig", "__version__", "assemble", "available_models", "caption", "clips",
    "get_spec", "index", "io", "probe", "retrieve", "sample_frames", "sample_videos",
]
