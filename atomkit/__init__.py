"""atomkit: ATOM-style video-language pipelines with resident, reusable modules.

    >>> import atomkit
    >>> with atomkit.Session("default") as s:                 # doctest: +SKIP
    ...     reel = s.assemble(atomkit.sample_videos(), "make a highlight reel", "out/")
"""
from . import io
from .config import DecodeConfig, WindowConfig
from .errors import (AssemblyError, AtomkitError, InputError, ModelNotFound, PipelineError, ScriptError,
                     SessionClosed, UnknownBackend, UnknownModel, VideoError)
from .executor import PipelinedExecutor, SequentialExecutor
from .registry import available_models, get_spec
from .session import Session
from .tasks import Assembly, Captions, CaptionedClip, Hit, Index, Skipped, assemble, caption, index, retrieve
from .video import Clip, VideoInfo, clips, probe, sample_frames, sample_videos

__version__ = "0.1.0"

__all__ = [
    "AssemblyError", "Assembly", "AtomkitError", "CaptionedClip", "Captions", "Clip", "DecodeConfig", "Hit",
    "Index", "InputError", "ModelNotFound", "PipelineError", "PipelinedExecutor", "ScriptError", "SequentialExecutor", "Session",
    "SessionClosed", "Skipped", "UnknownBackend", "UnknownModel", "VideoError", "VideoInfo", "WindowConfig", "assemble", "available_models",
    "caption", "clips", "get_spec", "index", "io", "probe", "retrieve", "sample_frames", "sample_videos",
]
