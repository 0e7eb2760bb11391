"""What the decoder is asked for a caption: the system line and the concept bridge's user turn (free captions,
grounded captions, the decode benchmark and export checks share them)."""
from __future__ import annotations


CAPTION_SYSTEM = "You describe short video clips in one plain sentence."


def concept_prompt(concepts: list[tuple[str, float]]) -> str:
    """The user turn of the concept bridge: what the classifier saw, then the request."""
    seen = ", ".join(f"{label} ({p:.2f})" for label, p in concepts) or "nothing recognisable"
    return (f"A classifier looked at six frames of a video clip and saw: {seen}. "
            "Write one short sentence describing what the clip shows.")


# The concepts EfficientNet-Lite0 reports for the first clip of bikes.mp4: a real caption prompt.
CONCEPTS = [("mountain bike", 0.41), ("bicycle-built-for-two", 0.12), ("unicycle", 0.05),
            ("crash helmet", 0.04), ("alp", 0.02)]


def caption_ids(decoder, concepts=CONCEPTS):
    """The token ids of a real caption prompt (``concepts``) as ``decoder`` renders it: a fixed input for timing
    and for checking an exported decoder against eager."""
    msgs = [{"role": "system", "content": CAPTION_SYSTEM}, {"role": "user", "content": concept_prompt(concepts)}]
    return decoder._ids(decoder.render(msgs))
