"""AssemblyApp: the interactive reel editor over one resident Session.

The app's actions (open a library, search, write a script, preview a clip, render) change an ``AppState``;
long ones run on one background thread at a time with progress and a cancel flag, so the page stays
responsive. Each action catches what goes wrong and puts it in ``state.message``: the page never shows a
traceback. ``widget`` is the whole UI (``atomkit.app.view``); everything it does can be driven from Python:

    >>> app = AssemblyApp(session, atomkit.sample_videos())        # doctest: +SKIP
    >>> app.wait(); app.search("a man wearing a tie", k=3)
    >>> app.edit.include(app.edit.ids()[1], False); app.edit.move(app.edit.ids()[2], -1)
    >>> app.render("out/app"); app.wait(); app.state.outputs["reel"]
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from atomkit.errors import AssemblyError, AtomkitError, InputError, VideoError
from atomkit.io import count
from atomkit.pipeline.tasks import Captions, CaptionedClip, Index, caption, index, render, retrieve, write_script
from atomkit.media.preview import preview as cut_preview, thumbnail
from atomkit.media.video import probe
from atomkit.media.scan import sample_videos
from atomkit.app.state import AppState, ReelEdit

log = logging.getLogger(__name__)

PAGE_SIZE = 12  # clips per page of the browser
PREVIEW_WIDTH = 320  # clip previews are small mp4s (video.preview), sent to the page as bytes


class Cancelled(AtomkitError):
    """The user pressed Cancel."""


def _render_progress(report: Callable[[int, int], None], cancel: threading.Event):
    """A proglog logger for moviepy that reports the video frames written and stops on cancel."""
    from proglog import ProgressBarLogger

    class Logger(ProgressBarLogger):
        def bars_callback(self, bar, attr, value, old_value=None):
            if cancel.is_set():
                raise Cancelled("render cancelled")
            if bar == "frame_index" and attr == "index":
                report(int(value) + 1, int(self.bars[bar]["total"] or 0))

    return Logger()


class AssemblyApp:
    """An interactive editor of highlight reels on one resident ``Session``.

    Args:
        session: The resident modules; the app never loads or reloads one itself.
        source: Video files or folders to open now (captioned in the background), a ``Captions`` or an
            ``Index`` already made, or None to start empty.
        out_dir: Where renders go (the page lets the user change it).
        k: How many clips a search returns.
        library: A ``Library``: opening a folder then captions only the clips it does not hold yet, and
            everything else is read from it.
    """

    def __init__(self, session, source=None, *, out_dir: str | Path = "out/app", k: int = 5, library=None):
        self.session = session
        self.library = library  # an atomkit.retrieval.library.Library: open() captions only what it does not hold
        self.state = AppState()
        self.out_dir = Path(out_dir)
        self.k = int(k)
        self._job: threading.Thread | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thumbs: dict[str, bytes] = {}
        self._durations: dict[Path, float] = {}
        self._scratch = Path(tempfile.mkdtemp(prefix="atomkit-app-"))
        self.preview_bytes: bytes | None = None
        self.reel_bytes: bytes | None = None
        self._view = None
        self._listeners: list[Callable[[], None]] = []
        if isinstance(source, (Captions, Index)):
            self._set_library(source if isinstance(source, Index) else index(session, source))
        elif source is not None:
            self.open(source)

    # -- the page --------------------------------------------------------------------------------------
    @property
    def widget(self):
        """The whole UI (built on first use)."""
        if self._view is None:
            from atomkit.app.view import AppView

            self._view = AppView(self)
            self._listeners.append(self._view.refresh)
            self._view.refresh()
        return self._view.root

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def changed(self) -> None:
        """Tell the view that the state changed (called by every action)."""
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # a view that fails to draw must not break the action that changed the state
                log.exception("the app view failed to refresh")

    @property
    def edit(self) -> ReelEdit | None:
        return self.state.edit

    @property
    def busy(self) -> bool:
        return self._job is not None and self._job.is_alive()

    # -- background actions ----------------------------------------------------------------------------
    def _start(self, name: str, work: Callable[[], None]) -> bool:
        """Run ``work`` on the background thread, unless another action is running (then say so)."""
        with self._lock:
            if self.busy:
                self.state.say(f"{self.state.busy} is still running; wait for it or press Cancel", error=True)
                self.changed()
                return False
            self._cancel.clear()
            self.state.busy, self.state.progress, self.state.started = name, (0, 0), time.perf_counter()
            self._job = threading.Thread(target=self._run, args=(name, work), name=f"atomkit-app-{name}", daemon=True)
        self.state.say(f"{name}…")
        self.changed()
        self._job.start()
        return True

    def _guarded(self, name: str, work: Callable[[], None]) -> bool:
        """Run ``work``; what goes wrong becomes the state's message (never a traceback in the page; the log
        keeps unexpected ones). False if it failed or was cancelled."""
        try:
            work()
            return True
        except Cancelled as e:
            self.state.say(str(e))
        except AtomkitError as e:
            self.state.say(str(e), error=True)
        except Exception as e:
            log.exception("%s failed", name)
            self.state.say(f"{name} failed: {type(e).__name__}: {e}", error=True)
        return False

    def _run(self, name: str, work: Callable[[], None]) -> None:
        try:
            self._guarded(name, work)
        finally:
            self.state.busy = ""
            self.state.finish(name, self.state.started)
            self.changed()

    def _progress(self, done: int, total: int) -> None:
        self.state.progress = (done, total)
        self.changed()

    def wait(self, timeout: float | None = None) -> AppState:
        """Block until the running action has finished (for scripts and tests); returns the state."""
        job = self._job
        if job is not None:
            job.join(timeout)
        return self.state

    def cancel(self) -> None:
        """Ask the running action to stop (captioning stops after the clips in flight, a render at once)."""
        if self.busy and not self._cancel.is_set():
            self._cancel.set()
            self.state.say(f"cancelling {self.state.busy}…")
            self.changed()

    def _sync(self, name: str, fn: Callable[[], None], *, timed: bool = True) -> bool:
        """Run a quick action on the caller's thread with the same error handling; False if it failed."""
        t0 = time.perf_counter()
        try:
            return self._guarded(name, fn)
        finally:
            if timed:
                self.state.finish(name, t0)
            self.changed()

    # -- the library -----------------------------------------------------------------------------------
    def open(self, paths: str | Path | Sequence[str | Path] | None = None) -> bool:
        """Caption the videos under ``paths`` (None: the sample videos) in the background."""
        if paths is None:
            paths = sample_videos()
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        paths = [Path(str(p).strip()).expanduser() for p in paths if str(p).strip()]
        if not paths:
            self.state.say("give a folder of videos (or press Sample videos)", error=True)
            self.changed()
            return False

        def work():
            if self.library is not None:
                stored = self._from_library(paths)
                caps = stored.captions
            else:
                stored = None
                caps = caption(self.session, paths, on_progress=self._progress, cancel=self._cancel)
            self.state.paths = [str(p) for p in paths]
            if not caps.clips:
                self.state.captions, self.state.index, self.state.edit = caps, None, None
                raise InputError("no clip could be captioned" + (" (cancelled)" if caps.cancelled else "")
                                 + f"; {len(caps.skipped)} input(s) skipped, listed below")
            self._set_library(stored if stored is not None else index(self.session, caps))
            for c in self.page_clips():  # the first page's thumbnails, while still in the background
                self.thumbnail(c.id)
            for video in {c.clip.video for c in caps.clips}:  # trim bounds, so a search needs no probe
                self.duration(video)
            videos = len({c.clip.video for c in caps.clips})
            what = f"{count(len(caps.clips), 'clip')} from {count(videos, 'video')} captioned in {caps.seconds:.1f} s"
            if caps.cancelled:
                what = f"cancelled: {what}, the rest left out"
            elif self._cancel.is_set():
                what += " (Cancel came when the last clips were already being captioned)"
            self.state.say(what + (f"; {len(caps.skipped)} skipped" if caps.skipped else ""))

        return self._start("captioning", work)

    def _from_library(self, paths: list[Path]) -> Index:
        """Index what the library lacks, then read the clips of ``paths`` from it (progress counts videos)."""
        from atomkit.retrieval.indexing import load_index, update

        t0 = time.perf_counter()
        report = update(self.session, self.library, paths, on_progress=self._progress, cancel=self._cancel)
        idx = load_index(self.session, self.library, report.videos)
        return Index(Captions(self.session.model, idx.captions.clips, report.skipped, time.perf_counter() - t0,
                              report.cancelled), idx.vectors, idx.space)

    def _set_library(self, idx: Index) -> None:
        self.state.captions, self.state.index, self.state.edit = idx.captions, idx, None
        self.state.page, self.state.preview, self.preview_bytes = 0, None, None

    def clip(self, clip_id: str) -> CaptionedClip:
        for c in self.state.clips:
            if c.id == clip_id:
                return c
        raise InputError(f"no clip {clip_id!r} in the library")

    def page_clips(self, page: int | None = None) -> list[CaptionedClip]:
        page = self.state.page if page is None else page
        return self.state.clips[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]

    def pages(self) -> int:
        return max(1, -(-len(self.state.clips) // PAGE_SIZE))

    def turn_page(self, delta: int) -> None:
        self.state.page = max(0, min(self.pages() - 1, self.state.page + int(delta)))
        self.changed()

    def thumbnail(self, clip_id: str) -> bytes:
        """A JPEG of the frame in the middle of the clip (cached); empty when that frame cannot be decoded
        (the clip was captioned, so its frames mostly can: the page shows it without a picture)."""
        if clip_id not in self._thumbs:
            clip = self.clip(clip_id).clip
            try:
                self._thumbs[clip_id] = thumbnail(clip.video, (clip.start_s + clip.end_s) / 2)
            except VideoError as e:
                log.warning("no thumbnail for %s: %s", clip_id, e)
                self._thumbs[clip_id] = b""
        return self._thumbs[clip_id]

    def duration(self, video: Path) -> float:
        video = Path(video)
        if video not in self._durations:
            self._durations[video] = probe(video).duration_s
        return self._durations[video]

    # -- search and edit -------------------------------------------------------------------------------
    def search(self, prompt: str, k: int | None = None) -> bool:
        """Rank the library's clips against ``prompt`` and start a new edit of the top ``k`` (quick: only the
        query is embedded). Runs on the caller's thread."""
        def work():
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError("the prompt is empty; type what the reel should show, e.g. 'a man wearing a tie'")
            if self.busy and self.state.busy == "captioning":
                raise InputError("the library is still being captioned; search when it is done")
            if self.state.index is None:
                raise InputError("open a library first (a folder of videos, or Sample videos)")
            if k is not None:
                self.k = int(k)
            hits = retrieve(self.session, self.state.index, prompt, k=self.k)
            self.state.edit = ReelEdit(prompt.strip(), hits, self.duration)
            self.state.say(f"{count(len(hits), 'clip')} for “{prompt.strip()}”, best first")

        return self._sync("search", work)

    def change(self, fn: Callable[..., None], *args) -> bool:
        """Apply one edit (e.g. ``app.change(app.edit.move, clip_id, -1)``); a bad edit becomes a message."""
        def work():
            if self.state.edit is None:
                raise InputError("search first: the edit starts from the clips a prompt retrieves")
            fn(*args)
            self.state.say("")

        return self._sync("edit", work, timed=False)

    def write_script(self) -> bool:
        """Ask the resident decoder (text only) to draft the order and the narration, in the background."""
        edit = self.state.edit
        if edit is None:
            self.state.say("search first: the script orders the clips a prompt retrieves", error=True)
            self.changed()
            return False

        def work():
            script = write_script(self.session, edit.prompt, edit.hits)
            if self.state.edit is not edit:
                raise InputError("a new search replaced the edit while the script was written; write it again")
            edit.apply_script(script)
            note = "" if script.source == "decoder" else " (the decoder's answer was unusable: rank order)"
            self.state.say(f"drafted by the decoder{note}: {count(len(script.entries), 'clip')}; edit the order and the lines")

        return self._start("writing script", work)

    # -- preview and render ----------------------------------------------------------------------------
    def preview(self, clip_id: str) -> bool:
        """Cut a small mp4 of the clip (with its trim, if it is in the edit) to play in the page."""
        from dataclasses import replace

        try:
            clip = self.clip(clip_id).clip
        except InputError as e:
            self.state.say(str(e), error=True)
            self.changed()
            return False
        edit = self.state.edit
        if edit is not None and clip_id in edit.ids():
            cut = edit.cut(clip_id)
            clip = replace(clip, start_s=cut.start_s, end_s=cut.end_s)

        def work():
            path = cut_preview(clip.video, clip.start_s, clip.end_s, self._scratch / "preview.mp4", width=PREVIEW_WIDTH)
            self.preview_bytes, self.state.preview = path.read_bytes(), clip_id
            path.unlink()
            self.state.say(f"playing {clip_id} ({clip.start_s:.1f}-{clip.end_s:.1f} s of {Path(clip.video).name})")

        return self._start("preview", work)

    def render(self, out_dir: str | Path | None = None) -> bool:
        """Stitch the edited reel with moviepy in the background; ``reel.mp4``, ``script.json`` and
        ``captions.json`` are written (atomically) into ``out_dir``."""
        if out_dir is not None and str(out_dir).strip():
            self.out_dir = Path(str(out_dir).strip()).expanduser()
        edit = self.state.edit
        try:
            if edit is None:
                raise InputError("search first: a reel is made of the clips a prompt retrieves")
            script, cuts = edit.script(), edit.cuts_s()
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise InputError(f"{self.out_dir} is a file, not a folder; choose an output folder")
        except InputError as e:
            self.state.say(str(e), error=True)
            self.changed()
            return False
        out = self.out_dir

        def work():
            try:
                done = render(self.session, self.state.captions, edit.prompt, edit.hits, script, out, cuts=cuts,
                              logger=_render_progress(self._progress, self._cancel))
            except AssemblyError as e:
                if isinstance(e.__cause__, Cancelled):
                    raise Cancelled("render cancelled; the previous reel (if any) is unchanged") from e
                raise
            self.reel_bytes = done.reel.read_bytes()
            self.state.outputs, self.state.reel_info = done.outputs, done.reel_info
            dropped = "".join(f"; dropped {d['clip_id']}: {d['reason']}" for d in done.dropped)
            self.state.say(f"rendered {count(done.reel_info['n_clips'], 'clip')}, {done.reel_info['duration_s']:.1f} s, "
                           f"into {out}{dropped}")

        return self._start("rendering", work)

    # -- the status line ---------------------------------------------------------------------------------
    def status(self) -> str:
        """Each module's load count and time, and how long the last action took."""
        report = self.session.load_report()
        mods = ", ".join(f"{m} {r['loads']}× load ({r['seconds']:.1f} s)" for m, r in report.items()) or "no module loaded yet"
        last = self.state.last_action
        tail = f" · last action: {last[0]} {last[1]:.2f} s" if last else ""
        return f"{self.session.model}: {mods}{tail}"

    def close(self) -> None:
        """Stop listening; the caller keeps (and closes) the Session."""
        self._listeners.clear()
        import shutil

        shutil.rmtree(self._scratch, ignore_errors=True)
