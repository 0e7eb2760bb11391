"""The subtasks of the pipeline, as thin functions over a Session: caption, index, retrieve, assemble.

Every task reuses the session's resident modules; none loads a model itself.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from atomkit.media.stitch import stitch
from atomkit.config import PENDING
from atomkit.errors import InputError, VideoError
from atomkit.pipeline.executor import auto_executor
from atomkit.io import output_set, sha256_file, write_json_atomic
from atomkit.decode.script import SCRIPT_ANSWER_PREFIX, Script, parse_script, script_messages
from atomkit.decode.structured import script_json
from atomkit.media.video import Clip, clips as cut_clips, frame_times, glance_frame, sample_frames
from atomkit.media.scan import find_videos, unique_ids


@dataclass
class Skipped:
    """An input that was left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass
class CaptionedClip:
    clip: Clip
    caption: str
    concepts: list[tuple[str, float]] = field(default_factory=list)
    vector: torch.Tensor | None = field(default=None, repr=False)  # the retriever's unit vector of the clip (if any)

    @property
    def id(self) -> str:
        return self.clip.id

    def to_dict(self) -> dict:
        return {**self.clip.to_dict(), "caption": self.caption, "captioned": self.caption != PENDING,
                "concepts": [{"label": c, "p": p} for c, p in self.concepts]}


@dataclass
class Captions:
    """The captioned clips of a batch of videos, and the inputs that were skipped."""

    model: str
    clips: list[CaptionedClip]
    skipped: list[Skipped]
    seconds: float = 0.0
    cancelled: bool = False  # captioning was stopped early; ``clips`` holds what was done until then

    def by_id(self) -> dict[str, CaptionedClip]:
        return {c.id: c for c in self.clips}

    def to_dict(self) -> dict:
        return {"model": self.model, "seconds": round(self.seconds, 3), "cancelled": self.cancelled,
                "clips": [c.to_dict() for c in self.clips], "skipped": [s.to_dict() for s in self.skipped]}


@dataclass
class Index:
    """The clips' retrieval vectors (unit, one row per clip), and the module whose text vectors they are compared
    with: ``embedder`` (captions fused with concepts) or ``retriever`` (a dual encoder's pooled frame vectors)."""

    captions: Captions
    vectors: torch.Tensor
    space: str = "embedder"

    def scores(self, session, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarities (len(texts), clips) of queries to the clips, in the index's space."""
        with session.use(self.space) as module:
            q = module.embed(list(texts))
        return q @ self.vectors.T


@dataclass
class Hit:
    clip: CaptionedClip
    score: float
    rank: int

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 4), **self.clip.to_dict()}


@dataclass
class Assembly:
    prompt: str
    hits: list[Hit]
    script: Script
    reel: Path
    reel_info: dict
    outputs: dict[str, Path]
    dropped: list[dict] = field(default_factory=list)  # clips left out of the reel: {"clip_id", "video", "reason"}


@dataclass
class _Work:
    """One clip on its way through the stages; ``error`` set means later stages pass it through."""

    clip: Clip
    frames: torch.Tensor | None = None
    encoded: object = None
    caption: str | None = None
    vector: torch.Tensor | None = None  # the retriever's (specs with a dual encoder)
    error: VideoError | None = None


def _batches(items: list, size: int) -> list[list]:
    """Consecutive groups of ``size`` (the last may be shorter): the same grouping on every executor and path."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def caption(session, paths: Iterable[str | Path], *, executor=None, progress: bool = False,
            on_progress: Callable[[int, int], None] | None = None,
            cancel: threading.Event | None = None, glance: bool = False) -> Captions:
    """Cut every video into clips and caption each with the session's encoder and decoder.

    The executor's stages (decode frames, encode, caption) run on groups of ``session.decode.caption_batch``
    consecutive clips, and a group's captions are decoded as one batch; the grouping depends on the inputs
    only, so every executor writes the same captions. Unreadable inputs do not stop the batch: they are
    returned in ``skipped`` with the reason (a clip whose frames fail leaves the rest of its group captioned).

    ``on_progress(done, total)`` is called with clip counts as groups finish (``(0, total)`` once the videos
    are cut). When ``cancel`` is set, captioning stops after the group in flight and the clips done so far
    are returned with ``cancelled=True``.

    ``glance=True``: a first look for search-first indexing: one frame a clip (``glance_frame``) through the encoder
    (without the detector) and the retriever, no decoder; every caption is ``PENDING`` (empty).
    """
    t0 = time.perf_counter()
    videos, problems = find_videos(paths)
    skipped = [Skipped(str(p), r) for p, r in problems]
    todo: list[Clip] = []
    names = unique_ids(videos)  # day1/GOPR0001 and day2/GOPR0001 get ids that tell them apart
    for v in videos:
        try:
            cut = cut_clips(v, session.window)
        except VideoError as e:
            skipped.append(Skipped(str(e.path), e.reason))
            continue
        if names[Path(v)] != Path(v).stem:
            cut = [replace(c, uid=f"{names[Path(v)]}#{c.index:02d}") for c in cut]
        todo.extend(cut)
    return caption_clips(session, todo, skipped=skipped, executor=executor, progress=progress, on_progress=on_progress,
                         cancel=cancel, glance=glance, t0=t0)


def caption_clips(session, todo: list[Clip], *, skipped: list[Skipped] | None = None, executor=None,
                  progress: bool = False, on_progress: Callable[[int, int], None] | None = None,
                  cancel: threading.Event | None = None, glance: bool = False, t0: float | None = None) -> Captions:
    """``caption``'s work on clips already cut (the captions that follow a search-first index caption the
    pending clips of a library this way, in the groups ``caption`` makes of a video's clips)."""
    t0 = time.perf_counter() if t0 is None else t0
    skipped = [] if skipped is None else skipped
    window = replace(session.window, frames=1) if glance else session.window
    read = glance_frame if glance else sample_frames

    def load(group: list[Clip]) -> list[_Work]:
        work = []
        for clip in group:
            try:
                work.append(_Work(clip, frames=read(clip, window)))
            except VideoError as e:
                work.append(_Work(clip, error=e))
        return work

    def encode(group: list[_Work]) -> list[_Work]:
        ok = [w for w in group if w.error is None]
        with session.use("encoder") as enc:
            for w in ok:
                w.encoded = enc.encode(w.frames, detect=not glance)
                w.encoded.times = [t - w.clip.start_s for t in frame_times(w.clip, w.frames.shape[2])]  # the clip's clock
                w.encoded.duration_s = w.clip.duration_s
        if session.spec.retriever is not None and ok:  # a dual encoder ranks: one pooled vector per clip
            with session.use("retriever") as ret:
                for w in ok:
                    w.vector = ret.embed_clip(w.frames)
        for w in ok:
            w.frames = None
        return group

    def decode_stage(group: list[_Work]) -> list[_Work]:
        ok = [w for w in group if w.error is None]
        if glance:
            for w in ok:
                w.caption = PENDING
        elif ok:
            with session.use("decoder") as dec:
                for w, text in zip(ok, dec.captions([w.encoded for w in ok], session.decode)):
                    w.caption = text
        return group

    done: list[CaptionedClip] = []
    executor = executor or auto_executor(session.options.device)
    bar = tqdm(total=len(todo), desc=f"captioning ({executor.name})", unit="clip", disable=not progress)
    cancelled, finished = False, 0
    if on_progress:
        on_progress(0, len(todo))
    try:
        for group in executor.map(_batches(todo, session.decode.caption_batch), [load, encode, decode_stage]):
            bar.update(len(group))
            finished += len(group)
            if on_progress:
                on_progress(finished, len(todo))
            for w in group:
                if w.error is not None:
                    where = f"{w.clip.video} [{w.clip.start_s:.1f}-{w.clip.end_s:.1f} s]"
                    skipped.append(Skipped(where, w.error.reason))
                else:
                    done.append(CaptionedClip(w.clip, w.caption, list(w.encoded.concepts), w.vector))
            if cancel is not None and cancel.is_set() and finished < len(todo):
                cancelled = True
                break  # the executor's generator cleanup stops its workers
    finally:
        bar.close()
    return Captions(session.model, done, skipped, time.perf_counter() - t0, cancelled)


def _as_captions(session, source, progress: bool) -> Captions | Index:
    if isinstance(source, (Captions, Index)):
        return source
    if isinstance(source, (str, Path)):
        source = [source]
    return caption(session, source, progress=progress)


def index(session, captions: Captions) -> Index:
    """Embed every clip once; retrieval for any number of prompts reuses the index. A spec with a retriever (a dual
    encoder) ranks on the clips' pooled frame vectors, made when they were captioned; the others on the caption
    fused with its concepts (``atomkit.retrieval.ranking``)."""
    if session.spec.retriever is not None:
        missing = [c.id for c in captions.clips if c.vector is None]
        if missing:
            raise InputError(f"{session.model} ranks with its retriever, and clips {', '.join(missing[:3])} were "
                             "captioned without it (another model's captions): caption them with this session")
        dim = captions.clips[0].vector.shape[0] if captions.clips else 0
        vectors = torch.stack([c.vector for c in captions.clips]) if captions.clips else torch.zeros(0, dim)
        return Index(captions, vectors, space="retriever")
    from atomkit.retrieval.ranking import clip_vectors

    with session.use("embedder") as emb:
        vectors = clip_vectors(emb, captions.clips)
    return Index(captions, vectors)


def check_text(text: str, what: str) -> str:
    """``text`` stripped; an InputError when it is not a string or only whitespace."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what} is empty; give a sentence such as 'make a highlight reel'")
    return text.strip()


def retrieve(session, source, query: str, *, k: int = 5, progress: bool = False) -> list[Hit]:
    """Rank clips by cosine similarity between the query and their captions; the top ``k``.

    ``source`` is an ``Index``, ``Captions``, or video paths (captioned first).
    """
    query = check_text(query, "query")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    idx = _as_captions(session, source, progress)
    if isinstance(idx, Captions):
        idx = index(session, idx)
    if not idx.captions.clips:
        return []
    scores = idx.scores(session, [query])[0]
    top = torch.topk(scores, min(k, len(scores)))
    return [Hit(idx.captions.clips[i], float(s), r + 1)
            for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]


def write_script(session, prompt: str, hits: Sequence[Hit]) -> Script:
    """The resident decoder, text only, orders the retrieved clips and narrates each (``atomkit.decode.structured``: the
    program writes the JSON, the decoder picks the order and writes a line per clip); where no stepper runs
    (``hf``, beam-search scripts) it decodes the script freely and it is parsed leniently; bad output falls back
    to rank order."""
    clips = [(h.clip.id, h.clip.caption) for h in hits]
    cfg, messages = session.decode, script_messages(prompt, clips)
    with session.use("decoder") as dec, dec.generation(), torch.inference_mode():
        stepper = dec.stepper(cfg.backend) if cfg.script_num_beams == 1 else None
        if stepper is not None:
            raw = script_json(dec, stepper, prompt, [c for _, c in clips], cfg.backend)
        else:
            raw = dec.chat(messages, max_new_tokens=cfg.script_max_new_tokens, num_beams=cfg.script_num_beams,
                           answer_prefix=SCRIPT_ANSWER_PREFIX, backend=cfg.backend)
    return grounded_narration(parse_script(raw, clips, prompt), hits)


def grounded_narration(script: Script, hits: Sequence[Hit]) -> Script:
    """A narration line is shown in the reel: one that names an object its clip's encoder did not report, adds a
    word nothing it reported supports (``atomkit.models.concepts.grounding``), or carries a number, is replaced
    by the clip's caption, and the replacement is listed in ``problems``."""
    from dataclasses import replace

    from atomkit.models.concepts import grounding

    by_id = {h.clip.id: h.clip for h in hits}
    entries = []
    for e in script.entries:
        clip = by_id.get(e.clip_id)
        if clip is None or not clip.concepts or not e.narration:
            entries.append(e)
            continue
        g = grounding(e.narration, clip.concepts)
        if not g["grounded"]:
            why = (f"names {', '.join(g['invented'])}, which its clip's encoder did not report" if g["invented"]
                   else f"says {', '.join(g['unsupported'])}, which nothing its clip's encoder reported supports"
                   if g["unsupported"] else "has a number")
            script.problems.append(f"narration for {e.clip_id} {why}: its caption is used instead")
            e = replace(e, narration=clip.caption)
        entries.append(e)
    script.entries = entries
    return script


def assemble(session, source, prompt: str, out_dir: str | Path, *, k: int = 5, progress: bool = False,
             reel_name: str = "reel.mp4") -> Assembly:
    """Prompt -> top-k clips -> script -> stitched mp4, with ``captions.json`` and ``script.json`` beside it.

    The three outputs are published as one set: an interrupted run leaves the previous set (or none).
    """
    prompt = check_text(prompt, "prompt")
    src = _as_captions(session, source, progress)
    captions = src.captions if isinstance(src, Index) else src
    hits = retrieve(session, src, prompt, k=k)
    if not hits:
        raise InputError("no clip could be captioned, so there is nothing to assemble; see the skipped inputs: "
                         + "; ".join(f"{s.path}: {s.reason}" for s in captions.skipped))
    script = write_script(session, prompt, hits)
    return render(session, captions, prompt, hits, script, out_dir, reel_name=reel_name,
                  logger="bar" if progress else None)


def render(session, captions: Captions, prompt: str, hits: Sequence[Hit], script: Script, out_dir: str | Path, *,
           cuts: dict[str, tuple[float, float]] | None = None, reel_name: str = "reel.mp4", logger=None) -> Assembly:
    """Stitch the clips of ``script`` in its order into ``out_dir/reel_name`` and write ``captions.json`` and
    ``script.json`` beside it, published as one set (``atomkit.io.output_set``: a reader sees all three files
    of this run or all three of the previous one, whenever the process is killed; ``script.json`` records the
    SHA-256 of the reel and of ``captions.json``). ``cuts`` maps a clip id to trimmed ``(start_s, end_s)`` in
    its source video (the clip's own window otherwise); ``logger`` goes to moviepy (a proglog logger, "bar"
    or None). The script's clip ids must be clips of ``captions``, each at most once. A clip that cannot be
    stitched is left out of the reel and listed under ``"dropped"`` in ``script.json`` and the ``Assembly``."""
    by_id = captions.by_id()
    unknown = [cid for cid in script.order if cid not in by_id]
    if unknown:
        raise InputError(f"the script names clips that are not in the library: {', '.join(unknown)}")
    if len(set(script.order)) != len(script.order):
        raise InputError(f"the script uses a clip more than once: {script.order}")
    if not script.order:
        raise InputError("the script has no clips; include at least one clip in the reel")
    cuts = cuts or {}
    chosen = [replace(by_id[cid].clip, start_s=cuts[cid][0], end_s=cuts[cid][1]) if cid in cuts
              else by_id[cid].clip for cid in script.order]
    out_dir = Path(out_dir)
    names = {"reel": reel_name, "captions": "captions.json", "script": "script.json"}
    with output_set(out_dir, names.values()) as stage:  # the three files appear together or not at all
        info = stitch(chosen, stage / reel_name, logger=logger)
        dropped = info.pop("dropped")
        info["path"] = str(out_dir / reel_name)
        info["sha256"] = sha256_file(stage / reel_name)
        write_json_atomic(stage / names["captions"], captions.to_dict())
        write_json_atomic(stage / names["script"], {
            "prompt": prompt, "model": session.model, "random_weights": session.random_weights,
            "retrieved": [h.to_dict() for h in hits], **script.to_dict(), "reel": info, "dropped": dropped,
            "captions_sha256": sha256_file(stage / names["captions"]),
        })
    outputs = {k: out_dir / name for k, name in names.items()}
    return Assembly(prompt, list(hits), script, outputs["reel"], info, outputs, dropped)
