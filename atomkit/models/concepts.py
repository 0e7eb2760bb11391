"""What the encoder's concepts mean in plain words: broader words for ImageNet classes, English noun
phrases, and a measure of whether a caption names only what the encoder saw.

A caption is *grounded* when every object it names is one of the clip's concepts or a broader word for one
("a dog" for "pug", "coffee" for "espresso"). Object words are the head nouns of the 1000 class names, the
broader words of ``data/imagenet_broader.txt`` and words for people (which ImageNet has almost no class
for, so a captioner that writes "a man" has invented him unless the encoder saw a groom or a diver).
"""
from __future__ import annotations

import re
from functools import lru_cache

from atomkit.models.encoder import DATA_DIR, imagenet_labels

PEOPLE = {"person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "baby", "player",
          "lady", "guy", "kid", "kids"}


@lru_cache(maxsize=1)
def broader_table() -> dict[str, list[str]]:
    """{class name: its broader words, most specific first} from ``data/imagenet_broader.txt``."""
    labels = imagenet_labels()
    index = {name: i for i, name in enumerate(labels)}
    groups: list[tuple[str, list[int]]] = []
    for n, line in enumerate((DATA_DIR / "imagenet_broader.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        word, _, members = line.partition(":")
        ids: list[int] = []
        for m in (x.strip() for x in members.split(";")):
            if re.fullmatch(r"\d+(-\d+)?", m):
                lo, _, hi = m.partition("-")
                ids += range(int(lo), int(hi or lo) + 1)
            elif m in index:
                ids.append(index[m])
            else:
                raise ValueError(f"{DATA_DIR / 'imagenet_broader.txt'}:{n}: {m!r} is not an ImageNet class name")
        groups.append((word.strip(), ids))
    groups.sort(key=lambda g: len(g[1]))  # the smallest group is the most specific word
    table: dict[str, list[str]] = {}
    for word, ids in groups:
        for i in ids:
            if word.lower() != labels[i].lower():
                table.setdefault(labels[i], []).append(word)
    return table


def broader(label: str) -> list[str]:
    """Broader plain words for a class name, most specific first ([] for a name outside ImageNet)."""
    return list(broader_table().get(label, []))


def with_article(noun: str) -> str:
    """"an Egyptian cat", "a tabby"."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def head(name: str) -> str:
    """The head noun of a class name: its last word, lower case ("Windsor tie" -> "tie")."""
    return name.strip().lower().split()[-1]


@lru_cache(maxsize=1)
def object_words() -> frozenset[str]:
    """Every word that names an object atomkit could report: class heads, broader words' heads, people."""
    words = {head(n) for n in imagenet_labels()} | {head(w) for ws in broader_table().values() for w in ws}
    return frozenset(words | PEOPLE)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def allowed_words(concepts) -> set[str]:
    """Words a caption may use to name objects, given the clip's concepts [(label, prob), ...]."""
    out: set[str] = set()
    for label, _ in concepts:
        out.update(_words(label))
        for b in broader(label):
            out.update(_words(b))
    return out


@lru_cache(maxsize=1)
def _names_re() -> re.Pattern:
    names = set(imagenet_labels()) | {w for ws in broader_table().values() for w in ws} | PEOPLE
    alternatives = sorted((re.escape(n.lower()) for n in names), key=len, reverse=True)  # longest name first
    return re.compile(r"\b(" + "|".join(alternatives) + r")(?:e?s)?\b")


def named_objects(caption: str) -> list[str]:
    """The objects a caption names, in order: whole class names first ("tiger cat" is one object, not a
    tiger and a cat), then any other object word ("cats" -> "cat")."""
    text = caption.lower()
    out = [m.group(1) for m in _names_re().finditer(text)]
    rest = _names_re().sub(" ", text)
    vocab = object_words()
    for w in _words(rest):
        if w not in vocab and w.endswith("s") and w[:-1] in vocab:
            w = w[:-1]
        if w in vocab:
            out.append(w)
    return out


_NUMBER_WORDS = re.compile(r"\b(zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|"
                           r"hundred|thousand|percent)\b", re.IGNORECASE)


def has_number(text: str) -> bool:
    """Digits (probabilities, ids, counts) or number words in a caption; a class name that holds one
    ("three-toed sloth", "four-poster") is a name, not a number."""
    return bool(re.search(r"\d", text) or _NUMBER_WORDS.search(_names_re().sub(" ", text.lower())))


def grounding(caption: str, concepts) -> dict:
    """{"named": object words in the caption, "invented": those not grounded in the concepts, "number": bool}."""
    allowed = allowed_words(concepts)
    named = named_objects(caption)
    invented = [n for n in named if not set(_words(n)) <= allowed and head(n) not in allowed]
    return {"named": named, "invented": invented, "number": has_number(caption)}


def grounding_table(pairs) -> dict:
    """Over [(caption, concepts), ...]: the share of named objects that are grounded, captions with an
    invented object or a number, and a few examples of invented words."""
    named = invented = with_invented = with_number = 0
    examples: list[str] = []
    n = 0
    for caption, concepts in pairs:
        n += 1
        g = grounding(caption, concepts)
        named += len(g["named"])
        invented += len(g["invented"])
        with_invented += bool(g["invented"])
        with_number += g["number"]
        examples += [w for w in g["invented"] if w not in examples]
    return {"captions": n, "object_words": named, "grounded_share": (named - invented) / named if named else None,
            "captions_with_invented_object": with_invented, "captions_with_number": with_number,
            "invented_examples": examples[:12]}
