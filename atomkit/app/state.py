"""The app's state as plain objects, apart from any widget: the edit of one reel (``ReelEdit``) and what the
page shows around it (``AppState``). Widgets only render these and call their methods; tests drive them
directly."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from atomkit.errors import InputError
from atomkit.decode.script import Script, ScriptEntry
from atomkit.pipeline.tasks import Captions, CaptionedClip, Hit, Index, Skipped

_MIN_CUT_S = 0.1  # the shortest trimmed clip the editor allows


@dataclass
class Cut:
    """One retrieved clip in the edit: in the reel or not, its narration line, its in and out points."""

    clip_id: str
    line: str
    start_s: float
    end_s: float
    included: bool = True
    rank: int = 0  # retrieval rank (1 = best)
    score: float = 0.0  # retrieval score (cosine similarity)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict:
        return {"clip_id": self.clip_id, "line": self.line, "start_s": self.start_s, "end_s": self.end_s,
                "included": self.included, "rank": self.rank, "score": round(self.score, 4)}


class ReelEdit:
    """The reel being edited: the retrieved clips in reel order, each included or not, with a line and a trim.

    Starts in rank order with each clip's caption as its line. ``apply_script`` takes the decoder's draft
    (its order and lines; clips it left out are excluded and kept at the end). Every change is checked and
    raises ``InputError`` with what was wrong. ``script()`` and ``cuts_s()`` are exactly what the render uses.

    Args:
        prompt: What the reel is for.
        hits: The retrieved clips, best first.
        duration: Source video -> its duration in seconds (bounds for trimming).
    """

    def __init__(self, prompt: str, hits: Sequence[Hit], duration: Callable[[Path], float]):
        if not hits:
            raise InputError("no clips were retrieved, so there is nothing to edit")
        self.prompt = prompt
        self.hits = list(hits)
        self._clips: dict[str, CaptionedClip] = {h.clip.id: h.clip for h in self.hits}
        self._duration = duration
        self.cuts = [Cut(h.clip.id, h.clip.caption, h.clip.clip.start_s, h.clip.clip.end_s, True, h.rank, h.score)
                     for h in self.hits]
        self.source = "ranked"  # where the order and lines came from: ranked, decoder, fallback; "+edited" after edits
        self.drafts = 0  # how many scripts were applied (each may change every line)

    # -- lookups ---------------------------------------------------------------------------------------
    def cut(self, clip_id: str) -> Cut:
        for c in self.cuts:
            if c.clip_id == clip_id:
                return c
        raise InputError(f"clip {clip_id!r} is not in this reel; its clips are {', '.join(self.ids())}")

    def ids(self) -> list[str]:
        return [c.clip_id for c in self.cuts]

    def clip(self, clip_id: str) -> CaptionedClip:
        self.cut(clip_id)
        return self._clips[clip_id]

    def chosen(self) -> list[Cut]:
        """The included cuts, in reel order."""
        return [c for c in self.cuts if c.included]

    def bounds(self, clip_id: str) -> tuple[float, float]:
        """Where a clip's in and out points may go: its whole source video."""
        return 0.0, float(self._duration(self.clip(clip_id).clip.video))

    # -- edits -----------------------------------------------------------------------------------------
    def _edited(self) -> None:
        if not self.source.endswith("+edited"):
            self.source += "+edited"

    def include(self, clip_id: str, included: bool = True) -> None:
        cut = self.cut(clip_id)
        if cut.included != bool(included):
            cut.included = bool(included)
            self._edited()

    def move(self, clip_id: str, delta: int) -> None:
        """Move a clip ``delta`` places later (negative: earlier) in the reel order, clamped to the ends."""
        self.cut(clip_id)  # a clear error for an unknown id
        i = self.ids().index(clip_id)
        j = max(0, min(len(self.cuts) - 1, i + int(delta)))
        if i != j:
            self.cuts.insert(j, self.cuts.pop(i))
            self._edited()

    def reorder(self, clip_ids: Sequence[str]) -> None:
        """Put the clips in this order (every clip of the reel, each once)."""
        if sorted(clip_ids) != sorted(self.ids()):
            raise InputError(f"a new order must name every clip of the reel once: got {list(clip_ids)}, "
                             f"the reel has {self.ids()}")
        if list(clip_ids) != self.ids():
            by_id = {c.clip_id: c for c in self.cuts}
            self.cuts = [by_id[i] for i in clip_ids]
            self._edited()

    def set_line(self, clip_id: str, line: str) -> None:
        text = " ".join(str(line).split())
        cut = self.cut(clip_id)
        if cut.line != text:
            cut.line = text
            self._edited()

    def trim(self, clip_id: str, start_s: float, end_s: float) -> None:
        """Move a clip's in and out points; they stay inside its source video and at least 0.1 s apart."""
        lo, hi = self.bounds(clip_id)
        start_s, end_s = float(start_s), float(end_s)
        if not (lo - 1e-6 <= start_s and end_s <= hi + 1e-6):
            raise InputError(f"clip {clip_id}: in/out {start_s:.2f}-{end_s:.2f} s must lie inside its video "
                             f"(0-{hi:.2f} s)")
        if end_s - start_s < _MIN_CUT_S:
            raise InputError(f"clip {clip_id}: the out point must be at least {_MIN_CUT_S} s after the in point "
                             f"(got {start_s:.2f}-{end_s:.2f} s)")
        cut = self.cut(clip_id)
        if (cut.start_s, cut.end_s) != (start_s, end_s):
            cut.start_s, cut.end_s = max(lo, start_s), min(hi, end_s)
            self._edited()

    def apply_script(self, script: Script) -> None:
        """Take a drafted script: its clips first, in its order, with its lines; the others excluded, after."""
        drafted = [e for e in script.entries if e.clip_id in self._clips]
        order = [e.clip_id for e in drafted]
        rest = [c for c in self.cuts if c.clip_id not in order]
        by_id = {c.clip_id: c for c in self.cuts}
        for e in drafted:
            by_id[e.clip_id].included = True
            line = " ".join(e.narration.split())
            if any(ch.isalnum() for ch in line):  # a draft line of only "..." (the prompt's example) keeps the old one
                by_id[e.clip_id].line = line
        for c in rest:
            c.included = False
        self.cuts = [by_id[i] for i in order] + rest
        self.source = script.source
        self.drafts += 1

    # -- what the render uses --------------------------------------------------------------------------
    def script(self) -> Script:
        """The included clips in reel order with their lines."""
        chosen = self.chosen()
        if not chosen:
            raise InputError("every clip is excluded; include at least one clip in the reel")
        return Script([ScriptEntry(c.clip_id, c.line) for c in chosen], self.source)

    def cuts_s(self) -> dict[str, tuple[float, float]]:
        """clip id -> (in, out) seconds in its source video, for every included clip."""
        return {c.clip_id: (c.start_s, c.end_s) for c in self.chosen()}

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "source": self.source, "cuts": [c.to_dict() for c in self.cuts]}


@dataclass
class AppState:
    """Everything the page shows, as plain data. Written by the app's actions (one at a time), read by the view."""

    paths: list[str] = field(default_factory=list)  # what the library was opened from
    captions: Captions | None = None
    index: Index | None = None
    edit: ReelEdit | None = None
    busy: str = ""  # the action running in the background ("" when idle)
    progress: tuple[int, int] = (0, 0)  # (done, total) of the running action
    started: float = 0.0  # time.perf_counter() when the running action started
    message: str = ""  # the last thing the page should tell the user
    error: bool = False  # whether ``message`` is an error
    last_action: tuple[str, float] | None = None  # (name, seconds) of the last finished action
    outputs: dict[str, Path] = field(default_factory=dict)  # reel, script, captions of the last render
    reel_info: dict | None = None
    preview: str | None = None  # clip id whose preview plays
    page: int = 0  # which page of the clip browser is shown

    @property
    def clips(self) -> list[CaptionedClip]:
        return self.captions.clips if self.captions else []

    @property
    def skipped(self) -> list[Skipped]:
        return self.captions.skipped if self.captions else []

    def say(self, message: str, *, error: bool = False) -> None:
        self.message, self.error = message, error

    def eta_s(self) -> float | None:
        """Seconds the running action still needs at its pace so far (None before its first step)."""
        done, total = self.progress
        if not self.busy or done <= 0 or total <= done:
            return None
        return (time.perf_counter() - self.started) * (total - done) / done

    def finish(self, name: str, t0: float) -> None:
        self.last_action = (name, time.perf_counter() - t0)
