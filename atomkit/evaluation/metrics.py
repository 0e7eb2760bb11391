"""Agreement between two runs of a pipeline (e.g. fp32 vs int8): captions and retrieval rankings; and the ranking
metrics of ``atomkit eval`` (the rank of the first relevant item, R@k).

Captions are scored with pycocoevalcap (BLEU-4, CIDEr, optionally METEOR), each reference caption
being the single reference of its clip, after PTB tokenization with the Stanford tokenizer jar that
pycocoevalcap ships (Java). Without Java, captions are lower-cased and split into words instead and
the result's ``"tokenizer"`` says so.
"""
from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from atomkit.errors import InputError

if TYPE_CHECKING:
    import torch

_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"


def _evalcap_dir() -> Path:
    return Path(find_spec("pycocoevalcap").submodule_search_locations[0])


def _ptb_tokenize(texts: list[str]) -> list[str] | None:
    """PTB-tokenize, lower-case and drop punctuation like pycocoevalcap's PTBTokenizer, but with the
    temporary file in a temp folder (the package folder may be read-only); None when it cannot run."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    jar = _evalcap_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    if shutil.which("java") is None or not jar.is_file():
        return None
    lines = [" ".join(t.split()) for t in texts]
    todo = [i for i, line in enumerate(lines) if line]  # empty captions stay empty
    out = [""] * len(lines)
    if not todo:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_text("\n".join(lines[i] for i in todo) + "\n", encoding="utf-8")
        try:
            proc = subprocess.run(["java", "-cp", str(jar), _PTB_CLASS, "-preserveLines", "-lowerCase", str(src)],
                                  capture_output=True, timeout=120, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
    tokenized = proc.stdout.decode("utf-8").split("\n")
    if len(tokenized) < len(todo):
        return None
    for i, line in zip(todo, tokenized):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w and w not in PUNCTUATIONS)
    return out


def _simple_tokenize(texts: list[str]) -> list[str]:
    return [" ".join(re.findall(r"[\w']+", t.lower())) for t in texts]


def _same_ids(references: dict, candidates: dict, what: str) -> None:
    if set(references) != set(candidates):
        missing = sorted(set(references) - set(candidates))[:5]
        extra = sorted(set(candidates) - set(references))[:5]
        raise InputError(f"references and candidates must have the same {what}; missing {missing}, extra {extra}")


def caption_agreement(references: dict[str, str], candidates: dict[str, str], *, meteor: bool = False) -> dict:
    """How closely ``candidates`` reproduce ``references`` (same clip ids as keys).

    Returns {"bleu4", "cider", "meteor", "identical_share", "n", "tokenizer"}: corpus BLEU-4 and
    CIDEr-D with each reference as the single reference of its clip; METEOR only when ``meteor`` is
    set (it starts a Java process, a few seconds), else None; identical_share is the fraction of
    captions equal after ``strip()``. CIDEr's IDF comes from the references scored, so it needs
    several different clips: with one clip (or all references equal) it is 0 whatever the captions.
    """
    _same_ids(references, candidates, "clip ids")
    keys = sorted(references)
    result = {"bleu4": None, "cider": None, "meteor": None, "identical_share": None, "n": len(keys), "tokenizer": None}
    if not keys:
        return result
    result["identical_share"] = sum(references[k].strip() == candidates[k].strip() for k in keys) / len(keys)
    scores = caption_scores({k: [references[k]] for k in keys}, candidates, meteor=meteor, rouge=False)
    result.update({m: scores[m] for m in ("bleu4", "cider", "meteor", "tokenizer")})
    return result


def caption_scores(references: dict[str, list[str]], candidates: dict[str, str], *, meteor: bool = True,
                   rouge: bool = True) -> dict:
    """The captioning metrics of the paper's Tables 1-2 (pycocoevalcap): corpus BLEU-4, METEOR, ROUGE-L and
    CIDEr-D of ``candidates`` (one caption per key) against ``references`` (one or more per key).

    METEOR needs Java (None without it, or when ``meteor`` is False). Returns the scores, ``n`` and the
    tokenizer used (PTB through Java, else lower-cased words)."""
    _same_ids(references, candidates, "ids")
    keys = sorted(references)
    result = {"bleu4": None, "meteor": None, "rouge_l": None, "cider": None, "n": len(keys), "tokenizer": None}
    if not keys:
        return result
    if any(not references[k] for k in keys):
        raise InputError(f"every id needs at least one reference caption; none for {[k for k in keys if not references[k]][:5]}")
    texts = [r for k in keys for r in references[k]] + [candidates[k] for k in keys]
    tokens = _ptb_tokenize(texts)
    result["tokenizer"] = "ptb"
    if tokens is None:
        tokens = _simple_tokenize(texts)
        result["tokenizer"] = "simple (lowercase words; Java or the PTB jar is not available)"
    # A caption with no words left after tokenization (punctuation only, empty output) would crash
    # pycocoevalcap's CIDEr; it is scored as one out-of-vocabulary word instead.
    tokens = [t if t.strip() else "<empty>" for t in tokens]
    gts, i = {}, 0
    for k in keys:
        gts[k] = tokens[i:i + len(references[k])]
        i += len(references[k])
    res = {k: [tokens[i + j]] for j, k in enumerate(keys)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result["bleu4"] = float(bleu[3])
    result["cider"] = float(Cider().compute_score(gts, res)[0])
    if rouge:
        from pycocoevalcap.rouge.rouge import Rouge

        result["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if meteor and shutil.which("java") is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            result["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    return result


def rank_agreement(ref_order: list[str], test_order: list[str], k: int) -> dict:
    """Agreement of two rankings of the same items (best first), e.g. retrieval with fp32 vs int8.

    Returns {"top1": 1.0 if the first items match else 0.0, "topk_overlap": |top-k(ref) & top-k(test)| / k,
    "kendall_tau": Kendall's tau over the items both lists hold (None with fewer than 2),
    "shared": how many items both hold, "k": k}. Repeated items count at their first position.
    """
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    ref = list(dict.fromkeys(ref_order))
    test = list(dict.fromkeys(test_order))
    top1 = float(bool(ref) and bool(test) and ref[0] == test[0])
    overlap = len(set(ref[:k]) & set(test[:k])) / k
    pos = {item: i for i, item in enumerate(test)}
    shared = [pos[item] for item in ref if item in pos]  # test positions, in reference order
    m = len(shared)
    tau = None
    if m >= 2:
        score = sum((1 if shared[i] < shared[j] else -1) for i in range(m) for j in range(i + 1, m))
        tau = score / (m * (m - 1) / 2)
    return {"top1": top1, "topk_overlap": overlap, "kendall_tau": tau, "shared": m, "k": k}


# -- ranking ---------------------------------------------------------------------------------------------------
def rank_of_first_relevant(scores: torch.Tensor, relevant: torch.Tensor) -> int:
    """1 + items scoring above the best relevant item + irrelevant items tied with it (pessimistic ties)."""
    if not bool(relevant.any()):
        raise InputError("no relevant item to rank")
    best = scores[relevant].max()
    return int((scores > best).sum()) + int(((scores == best) & ~relevant).sum()) + 1


def recall_table(ranks: list[int]) -> dict:
    """R@1/5/10 (shares of queries whose first relevant item ranks within k), median and mean rank."""
    n = len(ranks)
    if n == 0:
        return {"n": 0, "r1": None, "r5": None, "r10": None, "median_rank": None, "mean_rank": None}
    return {"n": n, **{f"r{k}": sum(r <= k for r in ranks) / n for k in (1, 5, 10)},
            "median_rank": float(statistics.median(ranks)), "mean_rank": sum(ranks) / n}
