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

from atomkit.models.detector import PEOPLE_LABELS, labels as detector_label_list
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
    """"an Egyptian cat", "a tabby"; a plural ("people", "two people") takes none."""
    if is_plural(noun):
        return noun
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def is_plural(noun: str) -> bool:
    return noun.lower() in PEOPLE_LABELS and noun.lower() != "person"


@lru_cache(maxsize=1)
def detector_labels() -> frozenset[str]:
    return frozenset(detector_label_list())


def head(name: str) -> str:
    """The head noun of a class name: its last word, lower case ("Windsor tie" -> "tie")."""
    return name.strip().lower().split()[-1]


@lru_cache(maxsize=1)
def object_words() -> frozenset[str]:
    """Every word that names an object atomkit could report: class heads, broader words' heads, people."""
    words = {head(n) for n in imagenet_labels()} | {head(w) for ws in broader_table().values() for w in ws}
    return frozenset(words | PEOPLE | {head(n) for n in detector_labels()})


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def allowed_words(concepts) -> set[str]:
    """Words a caption may use to name objects, given the clip's concepts [(label, prob), ...]."""
    out: set[str] = set()
    for label, _ in concepts:
        out.update(_words(label))
        for b in broader(label):
            out.update(_words(b))
        if label.lower() in PEOPLE_LABELS:  # the detector saw a person: any word for people names them
            out.update(PEOPLE)
    return out


@lru_cache(maxsize=1)
def _names_re() -> re.Pattern:
    counts = set(PEOPLE_LABELS) - {"person", "people"}  # "two people": a number unless the clip's own label says it
    names = set(imagenet_labels()) | {w for ws in broader_table().values() for w in ws} | PEOPLE | (detector_labels() - counts)
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

# Words a caption may add without claiming anything about the clip: articles, prepositions, conjunctions, the
# grounded form's own words ("a kind of", "or perhaps", "with") and the words captions use for the clip itself.
FUNCTION_WORDS = frozenset("""
a an the of or and with without in on at to into onto from by for as near next beside behind under over above
its it is are was were be being been has have this that these those there here some any another other others
kind sort type perhaps maybe possibly probably likely either also while
clip clips video videos frame frames shot scene image picture photo view shows showing show shown seen
nothing classifier recognises recognizes mainly
""".split())


def has_number(text: str, concepts=()) -> bool:
    """Digits (probabilities, ids, counts) or number words in a caption; a class name that holds one
    ("three-toed sloth", "four-poster") is a name, and so is a count the detector reported ("two people")."""
    text = _names_re().sub(" ", _without_labels(text.lower(), concepts))
    return bool(re.search(r"\d", text) or _NUMBER_WORDS.search(text))


def _without_labels(text: str, concepts) -> str:
    for label, _ in concepts:
        text = re.sub(r"\b" + re.escape(str(label).split(",")[0].lower()) + r"\b", " ", text)
    return text


def unsupported_words(caption: str, concepts) -> list[str]:
    """Every content word a caption adds that nothing the encoder reported supports: not a function word, not a
    word of a concept's name or of a broader word for one, not a number (counted apart). "A streetcar, a classic
    Japanese film noir." over [streetcar, ...] adds classic, japanese, film, noir: genres, places, eras and
    adjectives of kind are claims as much as objects are."""
    allowed = allowed_words(concepts)
    out = []
    for w in _words(_without_labels(caption.lower(), concepts)):
        if w in FUNCTION_WORDS or w in allowed or _NUMBER_WORDS.fullmatch(w):
            continue
        if w.endswith("s") and (w[:-1] in allowed or w[:-2] in allowed):  # plurals of a name
            continue
        if w not in out:
            out.append(w)
    return out


def grounding(caption: str, concepts) -> dict:
    """{"named": object words in the caption, "invented": those not grounded in the concepts, "unsupported": every
    content word the concepts do not support (``unsupported_words``), "number": bool, "grounded": none of these}."""
    allowed = allowed_words(concepts)
    named = named_objects(caption)
    invented = [n for n in named if not set(_words(n)) <= allowed and head(n) not in allowed]
    extra = unsupported_words(caption, concepts)
    number = has_number(caption, concepts)
    return {"named": named, "invented": invented, "unsupported": extra, "number": number,
            "grounded": not invented and not extra and not number}


def grounding_table(pairs) -> dict:
    """Over [(caption, concepts), ...]: the share of named objects that are grounded, captions with an invented
    object, an unsupported word or a number, captions that pass every check, and a few examples."""
    named = invented = with_invented = with_unsupported = with_number = grounded = 0
    examples: list[str] = []
    unsupported: list[str] = []
    n = 0
    for caption, concepts in pairs:
        n += 1
        g = grounding(caption, concepts)
        named += len(g["named"])
        invented += len(g["invented"])
        with_invented += bool(g["invented"])
        with_unsupported += bool(g["unsupported"])
        with_number += g["number"]
        grounded += g["grounded"]
        examples += [w for w in g["invented"] if w not in examples]
        unsupported += [w for w in g["unsupported"] if w not in unsupported]
    return {"captions": n, "object_words": named, "grounded_share": (named - invented) / named if named else None,
            "captions_with_invented_object": with_invented, "captions_with_unsupported_word": with_unsupported,
            "captions_with_number": with_number, "captions_grounded": grounded,
            "invented_examples": examples[:12], "unsupported_examples": unsupported[:12]}
