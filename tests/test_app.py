"""The assembly app without a browser: the edit state on hand-made clips, and the app's actions on the tiny
random-weight model (its captions are noise; these tests check ids, order, trims, messages and files)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from media import check_reel, duration

import atomkit
from atomkit.app import AssemblyApp, ReelEdit
from atomkit.decode.script import Script, ScriptEntry
from atomkit.pipeline.tasks import CaptionedClip, Hit


# -- ReelEdit on hand-made clips -------------------------------------------------------------------------
def _hits(n: int = 4) -> list[Hit]:
    clips = [CaptionedClip(atomkit.Clip(Path(f"/v/video{i}.mp4"), 0, 1.0 * i, 1.0 * i + 4), f"caption {i}")
             for i in range(n)]
    return [Hit(c, 1.0 - 0.1 * i, i + 1) for i, c in enumerate(clips)]


@pytest.fixture
def edit() -> ReelEdit:
    return ReelEdit("a prompt", _hits(), duration=lambda video: 20.0)


def test_edit_starts_in_rank_order_with_captions(edit):
    assert edit.ids() == ["video0#00", "video1#00", "video2#00", "video3#00"]
    assert [e.narration for e in edit.script().entries] == ["caption 0", "caption 1", "caption 2", "caption 3"]
    assert edit.cuts_s()["video2#00"] == (2.0, 6.0) and edit.source == "ranked"


def test_exclude_move_and_line_give_the_script(edit):
    edit.include("video1#00", False)
    edit.move("video3#00", -2)  # before video1
    edit.move("video0#00", +10)  # clamped to the end
    edit.set_line("video2#00", "  the   new\tline ")
    assert edit.ids() == ["video3#00", "video1#00", "video2#00", "video0#00"]
    script = edit.script()
    assert script.order == ["video3#00", "video2#00", "video0#00"]
    assert script.entries[1].narration == "the new line"
    assert set(edit.cuts_s()) == {"video3#00", "video2#00", "video0#00"}
    assert edit.source == "ranked+edited"
    edit.include("video1#00")
    assert edit.script().order == ["video3#00", "video1#00", "video2#00", "video0#00"]


def test_reorder_must_name_every_clip_once(edit):
    edit.reorder(["video2#00", "video0#00", "video3#00", "video1#00"])
    assert edit.ids() == ["video2#00", "video0#00", "video3#00", "video1#00"]
    for bad in (["video2#00", "video0#00"], ["video2#00"] * 4, [*edit.ids()[:3], "other#00"]):
        with pytest.raises(atomkit.InputError, match="every clip"):
            edit.reorder(bad)


def test_trim_stays_inside_the_source(edit):
    edit.trim("video1#00", 0.0, 12.5)  # past the window, inside the 20 s video
    assert edit.cuts_s()["video1#00"] == (0.0, 12.5) and edit.cut("video1#00").duration_s == 12.5
    with pytest.raises(atomkit.InputError, match="inside its video"):
        edit.trim("video1#00", 3.0, 21.0)
    with pytest.raises(atomkit.InputError, match="inside its video"):
        edit.trim("video1#00", -1.0, 3.0)
    with pytest.raises(atomkit.InputError, match="at least"):
        edit.trim("video1#00", 5.0, 5.05)
    assert edit.cuts_s()["video1#00"] == (0.0, 12.5)  # a rejected trim changes nothing


def test_draft_script_orders_and_excludes_the_rest(edit):
    edit.set_line("video0#00", "mine")
    draft = Script([ScriptEntry("video2#00", "second first"), ScriptEntry("video0#00", "then zero")], "decoder")
    edit.apply_script(draft)
    assert edit.ids() == ["video2#00", "video0#00", "video1#00", "video3#00"]
    assert edit.script().order == ["video2#00", "video0#00"]
    assert [e.narration for e in edit.script().entries] == ["second first", "then zero"]
    assert edit.source == "decoder" and edit.drafts == 1
    edit.apply_script(Script([ScriptEntry("video1#00", "..."), ScriptEntry("video2#00", " ")], "decoder"))
    assert [e.narration for e in edit.script().entries] == ["caption 1", "second first"]  # placeholders keep lines


def test_bad_edits_say_what_is_wrong(edit):
    with pytest.raises(atomkit.InputError, match="not in this reel"):
        edit.include("nope#00", False)
    for cid in edit.ids():
        edit.include(cid, False)
    with pytest.raises(atomkit.InputError, match="include at least one"):
        edit.script()
    with pytest.raises(atomkit.InputError, match="nothing to edit"):
        ReelEdit("p", [], duration=lambda v: 1.0)


def test_progress_estimate():
    import time

    from atomkit.app import AppState

    st = AppState(busy="captioning", progress=(1, 4), started=time.perf_counter() - 3.0)
    assert 8.9 < st.eta_s() < 9.5  # 3 s for 1 clip, 3 to go
    assert AppState(busy="captioning", progress=(0, 4)).eta_s() is None
    assert AppState(busy="", progress=(1, 4), started=time.perf_counter()).eta_s() is None


# -- the app on the tiny model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tiny_session, samples, tmp_path_factory):
    a = AssemblyApp(tiny_session, list(samples.values()), out_dir=tmp_path_factory.mktemp("app") / "out", k=4)
    a.wait(600)
    yield a
    a.close()


def test_open_captions_the_library_and_shows_clips(app, samples):
    st = app.state
    assert not st.error and "4 clips from 4 videos" in st.message, st.message
    assert sorted(c.id for c in st.clips) == sorted(f"{Path(p).stem}#00" for p in samples)
    thumbs = {c.id: app.thumbnail(c.id) for c in st.clips}
    assert all(t[:2] == b"\xff\xd8" for t in thumbs.values())  # JPEG
    assert len(set(thumbs.values())) == 4  # one picture per clip, not one for all
    w = app.widget
    assert len(app._view.grid.children) == 4 and w is app.widget


def test_search_edit_render_writes_the_edited_reel(app, samples, tmp_path):
    by_stem = {Path(p).stem: Path(p) for p in samples.values()}
    assert app.search("a man wearing a tie", k=4) and len(app.edit.ids()) == 4
    ids = app.edit.ids()
    drop = next(i for i in ids if i.startswith("carphone"))
    app.change(app.edit.include, drop, False)
    app.change(app.edit.move, ids[3], -1)
    order = [i for i in app.edit.ids() if i != drop]
    app.change(app.edit.set_line, order[0], "the first line")
    app.change(app.edit.trim, "bikes#00", 2.0, 7.0)
    out = tmp_path / "reel"
    assert app.render(out)
    app.wait(600)
    assert not app.state.error, app.state.message
    script = json.loads((out / "script.json").read_text())
    assert [e["clip_id"] for e in script["entries"]] == order
    assert script["entries"][0]["narration"] == "the first line" and script["prompt"] == "a man wearing a tie"
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions["clips"]) == 4
    spans = {i: (0.0, duration(by_stem[i.split("#")[0]])) for i in order}
    spans["bikes#00"] = (2.0, 7.0)
    check_reel(out / "reel.mp4", [(by_stem[i.split("#")[0]], *spans[i]) for i in order],
               [p for s, p in by_stem.items() if s != drop.split("#")[0]])
    assert app.reel_bytes == (out / "reel.mp4").read_bytes()


@pytest.mark.slow
def test_three_prompts_load_each_module_once(app, tmp_path):
    reels = []
    for n, prompt in enumerate(["a dog jumps", "people in a car", "a cartoon animal"]):
        assert app.search(prompt, k=2 + n % 2), app.state.message
        app.change(app.edit.move, app.edit.ids()[-1], -5)  # last to first
        assert app.render(tmp_path / f"r{n}")
        app.wait(600)
        assert not app.state.error, app.state.message
        reels.append(json.loads((tmp_path / f"r{n}" / "script.json").read_text()))
    assert [r["prompt"] for r in reels] == ["a dog jumps", "people in a car", "a cartoon animal"]
    assert [len(r["entries"]) for r in reels] == [2, 3, 2]
    assert {m: r["loads"] for m, r in app.session.load_report().items()} == {"encoder": 1, "decoder": 1, "embedder": 1}
    assert "encoder 1× load" in app.status() and "last action: rendering" in app.status()


def test_write_script_drafts_an_order_of_retrieved_clips(app):
    app.search("make a highlight reel", k=3)
    edit = app.edit
    assert app.write_script()
    app.wait(600)
    assert not app.state.error, app.state.message
    assert edit.drafts == 1 and edit.source in ("decoder", "fallback")
    assert set(edit.script().order) <= set(edit.ids()) and edit.script().order


def test_widget_buttons_drive_the_state(app):
    app.search("a dog jumps", k=3)
    w = app.widget
    before = app.edit.ids()
    rows = app._view.rows.children
    up = next(b for b in _walk(rows[2]) if "ak-up" in getattr(b, "_dom_classes", ()))
    up.click()
    assert app.edit.ids() == [before[0], before[2], before[1]]
    include = next(c for c in _walk(app._view.rows.children[0]) if "ak-include" in getattr(c, "_dom_classes", ()))
    include.value = False
    assert app.edit.script().order == [before[2], before[1]]
    line = next(c for c in _walk(app._view.rows.children[1]) if "ak-line" in getattr(c, "_dom_classes", ()))
    line.value = "typed in the page"
    assert app.edit.cut(before[2]).line == "typed in the page"  # row 1 shows before[2] after the move
    assert w is app.widget


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def test_bad_inputs_give_messages_not_tracebacks(app, tmp_path, samples):
    assert not app.search("   ")
    assert app.state.error and "prompt is empty" in app.state.message

    fresh = AssemblyApp(app.session, None, out_dir=tmp_path / "o")
    assert not fresh.search("anything") and "open a library first" in fresh.state.message
    assert not fresh.render() and "search first" in fresh.state.message
    assert not fresh.open("  ") and "give a folder" in fresh.state.message

    fresh.open(tmp_path / "no-such-folder")
    fresh.wait(120)
    assert fresh.state.error and "no clip could be captioned" in fresh.state.message
    assert [s.reason for s in fresh.state.skipped] == ["file not found"]

    empty = tmp_path / "empty"
    empty.mkdir()
    fresh.open(empty)
    fresh.wait(120)
    assert fresh.state.error and [s.reason for s in fresh.state.skipped] == ["no video files in folder"]

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "zero.mp4").write_bytes(b"")
    (corrupt / "text.mp4").write_text("not a video")
    (corrupt / "cut.mp4").write_bytes(samples["bikes.mp4"].read_bytes()[:3000])
    fresh.open(corrupt)
    fresh.wait(120)
    assert fresh.state.error and "no clip could be captioned" in fresh.state.message
    assert sorted(Path(s.path).name for s in fresh.state.skipped) == ["cut.mp4", "text.mp4", "zero.mp4"]
    assert fresh.state.index is None and fresh.state.edit is None
    fresh.close()

    app.search("a dog jumps", k=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert not app.render(blocker) and "is a file, not a folder" in app.state.message
    assert not app.change(app.edit.trim, app.edit.ids()[0], 0.0, 999.0) and "inside its video" in app.state.message


def test_cancel_keeps_the_clips_done_so_far(tiny_session, samples, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_session, "decode", replace(tiny_session.decode, caption_batch=1))
    app = AssemblyApp(tiny_session, None, out_dir=tmp_path)
    app._listeners.append(lambda: app.state.progress[0] >= 1 and app.cancel())  # Cancel after the first clip
    app.open(list(samples.values()))
    app.wait(600)
    caps = app.state.captions
    assert caps.cancelled and 1 <= len(caps.clips) < 4, app.state.message
    assert app.state.message.startswith("cancelled") and not app.state.error
    app.close()


def test_cancel_render_leaves_no_file(app, tmp_path):
    app.search("a dog jumps", k=2)
    out = tmp_path / "cancelled"
    stop = lambda: app.state.busy == "rendering" and app.state.progress[0] >= 3 and app.cancel()  # noqa: E731
    app._listeners.append(stop)
    try:
        app.render(out)
        app.wait(600)
    finally:
        app._listeners.remove(stop)
    assert "render cancelled" in app.state.message
    assert not out.exists() or not list(out.iterdir())  # no reel, no temp file, no script


def test_one_action_at_a_time(tiny_session, samples, tmp_path):
    app = AssemblyApp(tiny_session, None, out_dir=tmp_path)
    app.open(list(samples.values()))
    assert not app.open(list(samples.values())) and "still running" in app.state.message
    assert not app.search("a dog") and "still being captioned" in app.state.message
    app.wait(600)
    assert app.search("a dog") and not app.state.error
    app.close()


def test_page_shows_a_bad_setting_as_a_message(monkeypatch):
    import IPython.display

    from atomkit.app.serve import show_page

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    assert show_page({"model": "nope"}) is None  # displayed as HTML, not raised
    assert len(shown) == 1 and "cannot start" in shown[0].data and "available models" in shown[0].data


def test_render_checks_the_script_against_the_library(app, tmp_path):
    from atomkit.pipeline.tasks import render

    caps = app.state.captions
    with pytest.raises(atomkit.InputError, match="not in the library: ghost#00"):
        render(app.session, caps, "p", [], Script([ScriptEntry("ghost#00", "")], "edited"), tmp_path)
    one = caps.clips[0].id
    with pytest.raises(atomkit.InputError, match="more than once"):
        render(app.session, caps, "p", [], Script([ScriptEntry(one, ""), ScriptEntry(one, "")], "edited"), tmp_path)
    assert not list(tmp_path.iterdir())


def test_preview_plays_the_trimmed_clip(app, tmp_path):
    app.search("a dog jumps", k=4)
    app.change(app.edit.trim, "bikes#00", 3.0, 5.5)
    assert app.preview("bikes#00")
    app.wait(120)
    assert not app.state.error and app.state.preview == "bikes#00", app.state.message
    (tmp_path / "p.mp4").write_bytes(app.preview_bytes)
    assert abs(duration(tmp_path / "p.mp4") - 2.5) < 0.15
    assert not app.preview("ghost#00") and "no clip 'ghost#00'" in app.state.message
