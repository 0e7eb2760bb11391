"""Annotation files a user brings for ``atomkit eval``: text queries with the videos they should find, and
reference captions per video. Nothing is downloaded; each loader reads the public format as distributed.

Formats (``load(path, fmt="auto")``):

* ``msrvtt``: the MSR-VTT annotation JSON (``{"videos": [{"video_id": ...}], "sentences": [{"video_id": ...,
  "caption": ...}]}``) or a test-split CSV with ``video_id`` and ``sentence`` columns (e.g. MSRVTT_JSFUSION_test.csv).
  Each sentence is a query whose relevant video is its own, and a reference caption of that video.
* ``msvd``: lines ``VIDEO_ID caption words ...`` (annotations.txt), or a CSV with ``VideoID``/``Description``
  (optionally ``Start``/``End``, giving ids ``VideoID_Start_End``, and ``Language``: English rows only).
* ``didemo``: a JSON list of ``{"video": ..., "description": ..., "times": [[first, last], ...]}``; ``times`` index
  5-second segments, one pair per annotator: the most common pair is the query's moment in seconds.
* ``atomkit``: ``{"queries": [{"q": ..., "relevant": [video stems]}], "captions": {stem: [references]}}``
  (``captions`` optional); a query may add ``"moment": [start, end]`` (seconds in its one relevant video) and
  ``"part": "tuning"`` or ``"test"`` (the development set's split).

Videos are matched by file stem: ``video7020`` matches ``video7020.mp4``; a DiDeMo name with an extension
is reduced to its stem.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from atomkit.errors import InputError

FORMATS = ("msrvtt", "msvd", "didemo", "atomkit")
_FORMAT_NAMES = {"msrvtt": "an MSR-VTT", "msvd": "an MSVD", "didemo": "a DiDeMo", "atomkit": "an atomkit"}


@dataclass
class Query:
    text: str
    relevant: set[str]  # video stems
    moment: tuple[float, float] | None = None  # (start, end) seconds of what the query describes in its one video
    part: str | None = None  # which part of a set the query belongs to ("tuning", "test"), where the set has parts


@dataclass
class Annotations:
    queries: list[Query] = field(default_factory=list)
    references: dict[str, list[str]] = field(default_factory=dict)  # video stem -> reference captions
    format: str = ""
    source: str = ""
    protocol: dict | None = None  # a set's own statement of which part choices are made on (atomkit json)

    def videos(self) -> set[str]:
        return set(self.references) | {v for q in self.queries for v in q.relevant}

    def restricted_to(self, stems: set[str]) -> "Annotations":
        """Only the queries with a relevant video among ``stems`` (and their references): a user's folder
        usually holds a subset of a dataset's videos."""
        qs = [replace(q, relevant=q.relevant & stems) for q in self.queries if q.relevant & stems]
        refs = {k: v for k, v in self.references.items() if k in stems}
        return Annotations(qs, refs, self.format, self.source, self.protocol)

    def parts(self) -> list[str]:
        """The parts its queries name, in order of first appearance ([] for a set without parts)."""
        return list(dict.fromkeys(q.part for q in self.queries if q.part))

    def only(self, *, part: str | None = None, moments: bool | None = None) -> "Annotations":
        """The queries of one part, and/or only those with (``moments=True``) or without a moment."""
        qs = [q for q in self.queries if (part is None or q.part == part)
              and (moments is None or (q.moment is not None) == moments)]
        return Annotations(qs, self.references, self.format, self.source, self.protocol)


def _stem(name: str) -> str:
    return Path(str(name).strip()).stem if "." in str(name) else str(name).strip()


def _from_pairs(pairs: list[tuple[str, str]], fmt: str, source: str) -> Annotations:
    """(video, sentence) pairs: each sentence is a query for its video and a reference caption of it."""
    ann = Annotations(format=fmt, source=source)
    for vid, text in pairs:
        text = " ".join(str(text).split())
        if not text:
            continue
        vid = _stem(vid)
        ann.queries.append(Query(text, {vid}))
        ann.references.setdefault(vid, []).append(text)
    return ann


def _items(path: Path, items, where: str, vid: str, text: str) -> list[tuple[str, str]]:
    """(video, sentence) of each entry of a JSON list; an entry without both as text is an error that names
    its position (1-based)."""
    if not isinstance(items, list):
        raise InputError(f"{path}: {where} must be a JSON list of {{{vid}, {text}}}, got {type(items).__name__}")
    pairs = []
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), (str, int)) for k in (vid, text)):
            raise InputError(f"{path}: entry {n} of {where} needs {vid!r} and {text!r} as text, got {item!r:.120}")
        pairs.append((str(item[vid]), str(item[text])))
    return pairs


def _csv_rows(path: Path, columns: set[str], fmt: str) -> list[dict]:
    """The rows of a CSV whose header has ``columns``; a row with a cell missing or one too many is an error
    that names its line."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if not columns <= set(header):
            raise InputError(f"{path}: {_FORMAT_NAMES[fmt]} CSV needs the columns {', '.join(sorted(columns))}; its "
                             f"header has {', '.join(header) or 'nothing'}")
        rows = []
        for row in reader:
            if None in row.values() or None in row:
                fewer = None in row.values()
                raise InputError(f"{path}:{reader.line_num}: this row has {'fewer' if fewer else 'more'} cells than "
                                 f"the header ({', '.join(header)}); fix or remove it")
            rows.append(row)
        return rows


def load_msrvtt(path: Path) -> Annotations:
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, {"video_id", "sentence"}, "msrvtt")
        return _from_pairs([(r["video_id"], r["sentence"]) for r in rows], "msrvtt", str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "sentences" not in data:
        raise InputError(f"{path}: an MSR-VTT JSON needs a 'sentences' list of {{video_id, caption}}")
    return _from_pairs(_items(path, data["sentences"], "sentences", "video_id", "caption"), "msrvtt", str(path))


def load_msvd(path: Path) -> Annotations:
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, {"VideoID", "Description"}, "msvd")
        pairs = []
        for r in rows:
            if r.get("Language", "English") != "English":
                continue
            vid = r["VideoID"] + (f"_{r['Start']}_{r['End']}" if r.get("Start") and r.get("End") else "")
            pairs.append((vid, r["Description"]))
        return _from_pairs(pairs, "msvd", str(path))
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        vid, _, text = line.strip().partition(" ")
        if not text:
            raise InputError(f"{path}:{n}: an MSVD line is 'VIDEO_ID caption words', got {line.strip()!r}")
        pairs.append((vid, text))
    return _from_pairs(pairs, "msvd", str(path))


DIDEMO_SEGMENT_S = 5.0  # DiDeMo's times index 5-second segments: [[first, last], ...] one pair per annotator


def didemo_moment(times) -> tuple[float, float] | None:
    """The annotators' most common [first, last] segment pair as seconds ([2, 3] -> (10, 20)); None without one."""
    pairs = [tuple(t) for t in times or [] if isinstance(t, (list, tuple)) and len(t) == 2
             and all(isinstance(x, (int, float)) for x in t) and 0 <= t[0] <= t[1]]
    if not pairs:
        return None
    first, last = max(pairs, key=pairs.count)  # ties: the first annotator's
    return (first * DIDEMO_SEGMENT_S, (last + 1) * DIDEMO_SEGMENT_S)


def load_didemo(path: Path) -> Annotations:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise InputError(f"{path}: a DiDeMo file is a JSON list of {{video, description, times}}")
    ann = _from_pairs(_items(path, data, "the list", "video", "description"), "didemo", str(path))
    texts = [" ".join(str(item["description"]).split()) for item in data]
    moments = [didemo_moment(item.get("times")) for item, t in zip(data, texts) if t]
    for q, m in zip(ann.queries, moments):
        q.moment = m
    return ann


def _moment(path: Path, n: int, text: str, q: dict, rel: list) -> tuple[float, float] | None:
    m = q.get("moment")
    if m is None:
        return None
    if (not isinstance(m, list) or len(m) != 2 or not all(isinstance(x, (int, float)) for x in m)
            or not 0 <= m[0] < m[1]):
        raise InputError(f"{path}: query {n} ({text[:40]!r}) needs 'moment' as [start, end] seconds with "
                         f"0 <= start < end, got {m!r}")
    if len(rel) != 1:
        raise InputError(f"{path}: query {n} ({text[:40]!r}) has a moment, so 'relevant' names its one video; got {rel!r}")
    return (float(m[0]), float(m[1]))


def load_atomkit(path: Path) -> Annotations:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("queries"), list):
        raise InputError(f'{path}: an atomkit annotation file is {{"queries": [{{"q": ..., "relevant": [video stems]}}]}}')
    ann = Annotations(format="atomkit", source=str(path))
    for n, q in enumerate(data["queries"], start=1):
        text = q.get("q") if isinstance(q, dict) else None
        rel = q.get("relevant") if isinstance(q, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}: query {n} needs a non-empty text 'q', got {q!r}")
        if not isinstance(rel, list) or not rel or not all(isinstance(v, str) and v.strip() for v in rel):
            raise InputError(f"{path}: query {n} ({text.strip()[:40]!r}) needs 'relevant' as a non-empty list of "
                             f"video names, e.g. [\"bikes\"], got {rel!r}")
        part = q.get("part")
        if part is not None and (not isinstance(part, str) or not part.strip()):
            raise InputError(f"{path}: query {n} ({text.strip()[:40]!r}) has 'part' {part!r}; a part is a name")
        ann.queries.append(Query(" ".join(text.split()), {_stem(v) for v in rel}, _moment(path, n, text, q, rel), part))
    if isinstance(data.get("protocol"), dict):
        ann.protocol = data["protocol"]
    for vid, refs in (data.get("captions") or {}).items():
        ann.references[_stem(vid)] = [refs] if isinstance(refs, str) else list(refs)
    return ann


def sniff(path: Path) -> str:
    """The format of an annotation file, from its suffix and first bytes."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header = path.read_text(encoding="utf-8").splitlines()[:1]
        return "msvd" if header and "VideoID" in header[0] else "msrvtt"
    if suffix == ".txt":
        return "msvd"
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return "didemo"
    if isinstance(data, dict) and "sentences" in data:
        return "msrvtt"
    if isinstance(data, dict) and "queries" in data:
        return "atomkit"
    raise InputError(f"{path}: not a known annotation format; pass --format one of {', '.join(FORMATS)}")


def load(path: str | Path, fmt: str = "auto") -> Annotations:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"annotation file {path} not found")
    loaders = {"msrvtt": load_msrvtt, "msvd": load_msvd, "didemo": load_didemo, "atomkit": load_atomkit}
    if fmt != "auto" and fmt not in loaders:
        raise InputError(f"unknown annotation format {fmt!r}; one of auto, {', '.join(FORMATS)}")
    try:
        fmt = sniff(path) if fmt == "auto" else fmt
        ann = loaders[fmt](path)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        what = "annotation file" if fmt == "auto" else f"{fmt} annotation file"
        raise InputError(f"{path}: cannot read it as an {what} ({type(e).__name__}: {e})") from e
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not laid out as {_FORMAT_NAMES[fmt]} annotation file ({type(e).__name__}: "
                         f"{e}); pass --format to choose another of {', '.join(FORMATS)}") from e
    if not ann.queries:
        raise InputError(f"{path}: no queries in it")
    return ann
