"""The assembly script: the decoder is shown the top-k clips and answers which to use, in what
order, with a narration line each. Small chat models are weak at JSON, so parsing is lenient and
every deviation is recorded in `Script.problems` instead of raised."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from atomkit.errors import InputError, ScriptError

_CLIP_KEYS = ("clip", "id", "clip_id", "handle")
_LINE_KEYS = ("line", "narration", "text", "caption")
_WRAPPER_KEYS = ("clips", "script", "order", "entries", "items")
_HANDLE_RE = re.compile(r"^(?:c|clip)?\s*#?\s*(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class ScriptEntry:
    clip_id: str
    narration: str


@dataclass
class Script:
    entries: list[ScriptEntry]
    source: str  # "decoder" or "fallback"
    problems: list[str] = field(default_factory=list)  # what was wrong with the decoder output
    raw: str = ""  # the decoder's raw text

    @property
    def order(self) -> list[str]:
        return [e.clip_id for e in self.entries]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "problems": list(self.problems),
            "raw": self.raw,
            "entries": [{"clip_id": e.clip_id, "narration": e.narration} for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Script":
        """Inverse of `to_dict` (e.g. a saved or hand-edited script); ScriptError if malformed."""
        try:
            entries = [ScriptEntry(str(e["clip_id"]), str(e.get("narration", ""))) for e in d["entries"]]
            return cls(entries, str(d.get("source", "decoder")), [str(p) for p in d.get("problems", [])],
                       str(d.get("raw", "")))
        except (KeyError, TypeError, AttributeError) as e:
            raise ScriptError(f"not a script: expected {{'entries': [{{'clip_id', 'narration'}}]}} ({e!r})") from e


EXAMPLE_LINES = ("short narration", "...")  # the narration of the format example in the prompt


def _copied(line: str, prompt: str | None) -> bool:
    """Whether a narration line only repeats the prompt's format example or the request itself."""
    norm = lambda t: " ".join(re.findall(r"\w+", t.lower()))  # noqa: E731
    said = norm(line)
    return said in {norm(x) for x in EXAMPLE_LINES} or (prompt is not None and said == norm(prompt))


def handles(n: int) -> list[str]:
    """The short handles shown to the decoder instead of real clip ids: c1, c2, ..."""
    return [f"c{i}" for i in range(1, n + 1)]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_clips(clips: list[tuple[str, str]]) -> None:
    if not clips:
        raise InputError("no clips to script")
    ids = [cid for cid, _ in clips]
    if len(set(ids)) != len(ids):
        raise InputError(f"duplicate clip ids in script input: {ids}")


def script_messages(prompt: str, clips: list[tuple[str, str]]) -> list[dict]:
    """Chat messages (one system, one user) asking for the assembly script.

    `clips` is the ranked list of (clip_id, caption); the model sees them as c1..ck in that order.
    """
    _check_clips(clips)
    if not prompt or not prompt.strip():
        raise InputError("empty prompt: say what the reel should show")
    hs = handles(len(clips))
    listing = "\n".join(f"{h}: {_one_line(cap) or '(no caption)'}" for h, (_, cap) in zip(hs, clips))
    example = json.dumps([{"clip": hs[-1], "line": EXAMPLE_LINES[0]}, {"clip": hs[0], "line": EXAMPLE_LINES[1]}])
    system = ("You are a video editor. You pick and order clips for a short reel. "
              "You answer only with JSON.")
    user = (f"Request: {_one_line(prompt)}\n"
            f"Clips:\n{listing}\n"
            "Choose clips and order them to best serve the request. Use each clip at most once. "
            "Give each a one-sentence narration line. "
            "Answer ONLY a JSON array, no other text. Format example:\n"
            f"{example}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def order_messages(prompt: str, captions: list[str]) -> list[dict]:
    """Chat messages asking only for the order of the ranked clips (their ``captions``, shown as c1..ck), as a
    JSON array of handles; the answer is started with ``ORDER_ANSWER_PREFIX`` (``atomkit.decode.structured`` writes the
    rest)."""
    if not captions:
        raise InputError("no clips to order")
    if not prompt or not prompt.strip():
        raise InputError("empty prompt: say what the reel should show")
    hs = handles(len(captions))
    listing = "\n".join(f"{h}: {_one_line(cap) or '(no caption)'}" for h, cap in zip(hs, captions))
    system = "You are a video editor. You order clips for a short reel. You answer only with JSON."
    user = (f"Request: {_one_line(prompt)}\n"
            f"Clips:\n{listing}\n"
            "Put the clips in the order that best serves the request. "
            f"Answer ONLY a JSON array of all {len(captions)} handles, for example {json.dumps(hs[::-1][:2])}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def narration_messages(prompt: str, caption: str) -> list[dict]:
    """Chat messages asking for one narration sentence for a clip of the reel, given its caption."""
    cap = _one_line(caption) or "a scene"
    return [{"role": "system", "content": "You narrate highlight reels. Answer with one short sentence."},
            {"role": "user", "content": f"Reel: {_one_line(prompt)}.\n"
                                        f"Write the narration for a clip that shows {cap[:1].lower() + cap[1:]}"}]


ORDER_ANSWER_PREFIX = '["c'  # the order array is started for the decoder (atomkit.decode.structured)

# ---------------------------------------------------------------- parsing

# The decoder's answer is started for it: a 135M model given the opening of the array continues
# in JSON far more often than one asked for JSON in the instructions alone.
SCRIPT_ANSWER_PREFIX = '[{"clip": "c'

_DECODER = json.JSONDecoder()


def _is_entry(obj) -> bool:
    return isinstance(obj, dict) and any(k in obj for k in _CLIP_KEYS)


def _scan_values(text: str, pos: int) -> tuple[list, bool, str]:
    """Lenient array body: JSON values separated by commas/whitespace from `pos` until ']'.

    Returns (values, closed, error): the complete values read, whether a closing ']' was found,
    and why reading stopped otherwise. Tolerates trailing commas and truncation."""
    values: list = []
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
            pos += 1
        if pos >= len(text):
            return values, False, "unterminated array (output cut off?)"
        if text[pos] == "]":
            return values, True, ""
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            return values, False, f"{e.msg} at char {e.pos}"
        values.append(value)


def _extract(raw: str) -> tuple[list | None, list[str]]:
    """Find the script array in `raw`. Returns (items or None, problems)."""
    text = raw.strip()
    first_arr, first_obj = text.find("["), text.find("{")
    # An object before any array: a wrapper {"clips": [...]} or bare entry objects without [ ].
    if first_obj != -1 and (first_arr == -1 or first_obj < first_arr):
        try:
            obj, _ = _DECODER.raw_decode(text, first_obj)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            for key in _WRAPPER_KEYS:
                if isinstance(obj.get(key), list):
                    return obj[key], []
            if _is_entry(obj):
                values, _, _ = _scan_values(text, first_obj)
                return [v for v in values if _is_entry(v)], ["expected a JSON array; read bare objects"]
    if first_arr == -1:
        return None, ["malformed JSON: no JSON array found"]
    starts = [m.start() for m in re.finditer(r"\[", text)]
    first_error, found_empty = "", False
    for p in starts:  # prose may contain brackets before the real array
        try:
            value, _ = _DECODER.raw_decode(text, p)
        except json.JSONDecodeError as e:
            first_error = first_error or f"{e.msg} at char {e.pos}"
            continue
        if isinstance(value, list) and value:
            return value, []
        found_empty = found_empty or value == []
    if found_empty and not first_error:
        return [], ["empty JSON array"]
    problems = [f"malformed JSON: {first_error or 'no non-empty JSON array found'}"]
    for p in starts:  # salvage the complete elements of a truncated / sloppy array
        values, _, _ = _scan_values(text, p + 1)
        if values:
            problems.append(f"recovered {len(values)} element(s) from malformed JSON")
            return values, problems
    return None, problems


def _first(d: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in d:
            return d[k]
    return None


def parse_script(raw: str, clips: list[tuple[str, str]], prompt: str | None = None) -> Script:
    """Parse and validate decoder output against the ranked `clips` [(clip_id, caption)].

    A narration line that is missing, not text, or only repeats the prompt's format example or the request
    (``prompt``) is replaced by the clip's caption, and the replacement is listed in ``problems``.

    Never raises for bad output: problems are recorded and, if nothing usable remains, the script
    falls back to all clips in ranked order narrated by their captions. Raises InputError only if
    `clips` itself is empty or has duplicate ids."""
    _check_clips(clips)
    raw = raw if isinstance(raw, str) else ("" if raw is None else str(raw))
    hs = handles(len(clips))
    index_of = {cid: i for i, (cid, _) in enumerate(clips)}
    index_of_lower = {cid.lower(): i for i, (cid, _) in enumerate(clips)}

    def resolve(ref) -> int | None:
        if isinstance(ref, float) and ref.is_integer():
            ref = int(ref)
        if isinstance(ref, int) and not isinstance(ref, bool):
            return ref - 1 if 1 <= ref <= len(clips) else None
        if not isinstance(ref, str):
            return None
        s = ref.strip()
        if s in index_of:
            return index_of[s]
        m = _HANDLE_RE.match(s)
        if m:
            i = int(m.group(1))
            return i - 1 if 1 <= i <= len(clips) else None
        return index_of_lower.get(s.lower())

    problems: list[str] = []
    items: list | None = None
    if not raw.strip():
        problems.append("empty decoder output")
    else:
        items, found = _extract(raw)
        problems.extend(found)

    entries: list[ScriptEntry] = []
    used: set[int] = set()
    for n, item in enumerate(items or [], start=1):
        line = None
        if isinstance(item, dict):
            ref = _first(item, _CLIP_KEYS)
            if ref is None:
                problems.append(f"entry {n} has no clip reference: {json.dumps(item, ensure_ascii=False)[:80]}")
                continue
            line = _first(item, _LINE_KEYS)
        elif isinstance(item, (str, int, float)) and not isinstance(item, bool):
            ref = item
        else:
            problems.append(f"entry {n} is not a clip reference: {json.dumps(item, ensure_ascii=False)[:80]}")
            continue
        i = resolve(ref)
        if i is None:
            problems.append(f"unknown clip '{ref}'")
            continue
        if i in used:
            problems.append(f"repeated clip '{ref}'")
            continue
        used.add(i)
        cid, caption = clips[i]
        if line is not None and not isinstance(line, str):
            problems.append(f"narration for {hs[i]} is not text; using its caption")
            line = None
        elif line is not None and _one_line(line) and _copied(line, prompt):
            problems.append(f"narration for {hs[i]} copies the prompt ({_one_line(line)!r}); using its caption")
            line = None
        entries.append(ScriptEntry(cid, _one_line(line or "") or _one_line(caption)))

    if not entries:
        problems.append("no valid clips in decoder output; using ranked order")
        entries = [ScriptEntry(cid, _one_line(cap)) for cid, cap in clips]
        return Script(entries, "fallback", problems, raw)
    omitted = [f"{hs[i]}={clips[i][0]}" for i in range(len(clips)) if i not in used]
    if omitted:
        problems.append(f"omitted clips: {', '.join(omitted)}")
    return Script(entries, "decoder", problems, raw)
