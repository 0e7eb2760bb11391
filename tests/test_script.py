"""The assembly script: prompt building and lenient parsing of small-model output."""
from __future__ import annotations

import json

import pytest

from atomkit.errors import InputError, ScriptError
from atomkit.decode.script import Script, ScriptEntry, handles, parse_script, script_messages

CLIPS = [
    ("beach#00", "a dog runs on the beach"),
    ("beach#01", "waves crash on rocks"),
    ("city#03", "cars drive through a city at night"),
]
IDS = [cid for cid, _ in CLIPS]
CAPTION = dict(CLIPS)


def test_handles():
    assert handles(3) == ["c1", "c2", "c3"]
    assert handles(0) == []


def test_script_messages_lists_every_handle_caption_and_the_prompt():
    msgs = script_messages("a calm day at the sea", CLIPS)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "a calm day at the sea" in user
    for h, (cid, cap) in zip(handles(len(CLIPS)), CLIPS):
        assert f"{h}: {cap}" in user
        assert cid not in user  # the model sees handles, not real ids
    assert '"clip"' in user and '"line"' in user  # the one-line format example
    # the handles are listed in ranked order
    assert user.index("c1:") < user.index("c2:") < user.index("c3:")


def test_script_messages_rejects_empty_input():
    with pytest.raises(InputError):
        script_messages("a prompt", [])
    with pytest.raises(InputError):
        script_messages("   ", CLIPS)


def test_valid_array_of_objects():
    raw = '[{"clip": "c3", "line": "Night falls."}, {"clip": "c1", "line": "A dog plays."}]'
    s = parse_script(raw, CLIPS)
    assert s.source == "decoder"
    assert s.order == ["city#03", "beach#00"]
    assert s.entries[0] == ScriptEntry("city#03", "Night falls.")
    assert s.raw == raw
    # c2 was left out: informational problem, not appended
    assert s.problems == ["omitted clips: c2=beach#01"]


def test_all_clips_used_means_no_problems():
    s = parse_script('[{"clip":"c2","line":"x"},{"clip":"c1","line":"y"},{"clip":"c3","line":"z"}]', CLIPS)
    assert s.source == "decoder"
    assert s.order == ["beach#01", "beach#00", "city#03"]
    assert s.problems == []


def test_fenced_json():
    raw = 'Sure!\n```json\n[{"clip": "c2", "line": "Waves."}]\n```'
    s = parse_script(raw, CLIPS)
    assert s.source == "decoder"
    assert s.order == ["beach#01"]
    assert s.entries[0].narration == "Waves."


def test_prose_around_json_even_with_brackets_in_prose():
    raw = 'Here is the script [final]: [{"clip": "c1", "line": "Dog."}] Hope it helps!'
    s = parse_script(raw, CLIPS)
    assert s.order == ["beach#00"]
    assert not any(p.startswith("malformed") for p in s.problems)


def test_bare_string_handles_take_captions_as_narration():
    s = parse_script('["c3", "C1", "2"]', CLIPS)
    assert s.order == ["city#03", "beach#00", "beach#01"]
    assert [e.narration for e in s.entries] == [CAPTION[i] for i in s.order]
    assert s.problems == []


def test_int_indices_are_one_based():
    s = parse_script("[2, 3]", CLIPS)
    assert s.order == ["beach#01", "city#03"]


def test_real_ids_and_alternative_keys():
    raw = '[{"clip_id": "city#03", "narration": "City."}, {"id": "beach#00", "text": "Dog."}, {"handle": "c2"}]'
    s = parse_script(raw, CLIPS)
    assert s.order == ["city#03", "beach#00", "beach#01"]
    assert [e.narration for e in s.entries] == ["City.", "Dog.", CAPTION["beach#01"]]


def test_unknown_ids_are_skipped_and_recorded():
    s = parse_script('[{"clip": "c9", "line": "?"}, {"clip": "c1", "line": "Dog."}, 0, "bogus#07"]', CLIPS)
    assert s.source == "decoder"
    assert s.order == ["beach#00"]
    assert "unknown clip 'c9'" in s.problems
    assert "unknown clip '0'" in s.problems
    assert "unknown clip 'bogus#07'" in s.problems


def test_repeated_ids_are_skipped_and_recorded():
    s = parse_script('[{"clip": "c2", "line": "one"}, {"clip": "c2", "line": "two"}, "2"]', CLIPS)
    assert s.order == ["beach#01"]
    assert s.entries[0].narration == "one"
    assert "repeated clip 'c2'" in s.problems
    assert "repeated clip '2'" in s.problems


def test_malformed_json_falls_back_to_ranked_order():
    raw = '[{"clip": "c1", "line": "a"'
    s = parse_script(raw, CLIPS)
    assert s.source == "fallback"
    assert s.order == IDS
    assert any(p.startswith("malformed JSON: ") for p in s.problems)
    assert "no valid clips in decoder output; using ranked order" in s.problems


def test_truncated_array_keeps_its_complete_elements():
    # greedy decoding with a token cap often cuts the array off mid-element
    raw = '[{"clip": "c3", "line": "Night."}, {"clip": "c1", "line": "Do'
    s = parse_script(raw, CLIPS)
    assert s.source == "decoder"
    assert s.order == ["city#03"]
    assert any(p.startswith("malformed JSON: ") for p in s.problems)
    assert "recovered 1 element(s) from malformed JSON" in s.problems


@pytest.mark.parametrize("raw", ["", "   \n\t"])
def test_empty_output(raw):
    s = parse_script(raw, CLIPS)
    assert s.source == "fallback"
    assert s.order == IDS
    assert s.problems[0] == "empty decoder output"
    assert s.problems[-1] == "no valid clips in decoder output; using ranked order"


def test_no_json_at_all():
    s = parse_script("I would start with the dog, then the waves.", CLIPS)
    assert s.source == "fallback"
    assert "malformed JSON: no JSON array found" in s.problems


@pytest.mark.parametrize("key", ["clips", "script", "order"])
def test_object_wrapper(key):
    raw = json.dumps({key: [{"clip": "c2", "line": "Waves."}, "c1"]})
    s = parse_script(raw, CLIPS)
    assert s.source == "decoder"
    assert s.order == ["beach#01", "beach#00"]


def test_bare_objects_without_brackets():
    s = parse_script('{"clip": "c2", "line": "Waves."}, {"clip": "c3", "line": "City."}', CLIPS)
    assert s.source == "decoder"
    assert s.order == ["beach#01", "city#03"]
    assert "expected a JSON array; read bare objects" in s.problems


def test_all_invalid_falls_back_with_captions():
    s = parse_script('[{"clip": "c7"}, "x", {"line": "no clip"}, null]', CLIPS)
    assert s.source == "fallback"
    assert s.entries == [ScriptEntry(cid, cap) for cid, cap in CLIPS]
    assert "unknown clip 'c7'" in s.problems
    assert "unknown clip 'x'" in s.problems
    assert any(p.startswith("entry 3 has no clip reference") for p in s.problems)
    assert any(p.startswith("entry 4 is not a clip reference") for p in s.problems)
    assert s.problems[-1] == "no valid clips in decoder output; using ranked order"


def test_empty_array_falls_back():
    s = parse_script("[]", CLIPS)
    assert s.source == "fallback"
    assert s.problems == ["empty JSON array", "no valid clips in decoder output; using ranked order"]


def test_narrations_default_to_captions():
    raw = '[{"clip": "c1", "line": ""}, {"clip": "c2", "line": 42}, {"clip": "c3", "line": "  Night\\n falls. "}]'
    s = parse_script(raw, CLIPS)
    assert [e.narration for e in s.entries] == [CAPTION["beach#00"], CAPTION["beach#01"], "Night falls."]
    assert "narration for c2 is not text; using its caption" in s.problems


def test_trailing_comma_is_tolerated():
    s = parse_script('[{"clip": "c1", "line": "a"}, {"clip": "c2", "line": "b"},]', CLIPS)
    assert s.order == ["beach#00", "beach#01"]


def test_no_clips_is_an_input_error():
    with pytest.raises(InputError, match="no clips to script"):
        parse_script('["c1"]', [])


def test_to_dict_round_trips_through_json():
    s = parse_script('Ok: [{"clip": "c2", "line": "Vagues — été"}, "c9"]', CLIPS)
    d = json.loads(json.dumps(s.to_dict(), ensure_ascii=False))
    assert d == {
        "source": "decoder",
        "problems": ["unknown clip 'c9'", "omitted clips: c1=beach#00, c3=city#03"],
        "raw": 'Ok: [{"clip": "c2", "line": "Vagues — été"}, "c9"]',
        "entries": [{"clip_id": "beach#01", "narration": "Vagues — été"}],
    }
    back = Script.from_dict(d)
    assert back == s


def test_from_dict_rejects_non_scripts():
    with pytest.raises(ScriptError):
        Script.from_dict({"entries": [{"narration": "no id"}]})
    with pytest.raises(ScriptError):
        Script.from_dict({"source": "decoder"})


def test_narration_copied_from_the_prompt_is_replaced_by_the_caption():
    raw = ('[{"clip": "c2", "line": "Short narration."}, {"clip": "c1", "line": "Make a highlight reel!"},'
           ' {"clip": "c3", "line": "..."}]')
    s = parse_script(raw, CLIPS, prompt="make a highlight reel")
    assert [e.narration for e in s.entries] == [CAPTION["beach#01"], CAPTION["beach#00"], CAPTION["city#03"]]
    assert len(s.problems) == 3 and all("copies the prompt" in p for p in s.problems)
    own = parse_script('[{"clip": "c1", "line": "A highlight of the dog."}]', CLIPS, prompt="make a highlight reel")
    assert own.entries[0].narration == "A highlight of the dog."  # its own line, though it shares words
