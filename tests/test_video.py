"""Tests of atomkit.media.video on real sample videos and small synthetic ones made with PyAV."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from atomkit.config import WindowConfig
from atomkit.errors import VideoError
from atomkit.media.scan import VIDEO_SUFFIXES, find_videos, sample_videos
from atomkit.media.video import Clip, clips, frame_times, probe, sample_frames, window_bounds

SAMPLES = {p.name: p for p in sample_videos()}
BIKES = SAMPLES["bikes.mp4"]
STEP = 4  # grey level of frame i is i * STEP


def write_video(path: Path, n: int, fps: int, draw, w: int = 64, h: int = 48,
                codec: str = "libx264") -> Path:
    """Write ``n`` frames ``draw(i) -> (h, w, 3) uint8`` at ``fps`` to ``path`` with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":  # long GOP with B-frames: sampling must seek and decode forward
            stream.options = {"preset": "veryfast", "crf": "8", "g": "20", "bf": "2",
                              "sc_threshold": "0"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(draw(i), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def grey_video(path: Path, seconds: int, fps: int = 5, codec: str = "libx264") -> Path:
    """A video whose frame i is solid grey of level ``i * STEP``."""
    return write_video(path, seconds * fps, fps,
                       lambda i: np.full((48, 64, 3), i * STEP % 256, np.uint8), codec=codec)


def grey_levels(path: Path) -> np.ndarray:
    """Mean grey level of every decoded frame, in order (the reference for frame indices)."""
    with av.open(str(path)) as container:
        return np.array([f.to_ndarray(format="rgb24").mean()
                         for f in container.decode(container.streams.video[0])])


def frame_indices(frames: torch.Tensor, levels: np.ndarray) -> list[int]:
    """Index of the reference frame closest in grey level to each sampled frame."""
    means = frames[0].float().mean(dim=(0, 2, 3)).numpy()
    return [int(np.abs(levels - m).argmin()) for m in means]


@pytest.fixture(scope="module")
def grey12(tmp_path_factory) -> Path:
    return grey_video(tmp_path_factory.mktemp("v") / "grey12.mp4", 12)


# --- window math -----------------------------------------------------------------------------

@pytest.mark.parametrize("duration, expected", [
    (10.0, [(0.0, 10.0)]),
    (12.0, [(0.0, 10.0), (2.0, 12.0)]),
    (23.0, [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (13.0, 23.0)]),
    (20.0, [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0)]),
    (4.0, [(0.0, 4.0)]),
    (10.0000005, [(0.0, 10.000001)]),  # within tolerance of one window
    (15.0005, [(0.0, 10.0), (5.0, 15.0)]),  # tail under 1 ms is not worth a window
])
def test_window_bounds(duration, expected):
    assert window_bounds(duration, 10.0, 5.0) == expected


def test_window_bounds_stride_longer_than_length_leaves_gaps_but_covers_tail():
    assert window_bounds(30.0, 10.0, 15.0) == [(0.0, 10.0), (15.0, 25.0), (20.0, 30.0)]
    assert window_bounds(25.0, 10.0, 15.0) == [(0.0, 10.0), (15.0, 25.0)]


def test_window_bounds_no_float_noise():
    bounds = window_bounds(1.0, 0.3, 0.1)
    assert bounds[:3] == [(0.0, 0.3), (0.1, 0.4), (0.2, 0.5)]
    assert bounds[-1] == (0.7, 1.0)
    assert all(e - s == pytest.approx(0.3) for s, e in bounds)


@pytest.mark.parametrize("args", [(0, 10, 5), (-1, 10, 5), (10, 0, 5), (10, 10, 0),
                                  (10, -1, 5), (10, 10, -5), (float("nan"), 10, 5),
                                  (float("inf"), 10, 5)])
def test_window_bounds_invalid(args):
    with pytest.raises(ValueError):
        window_bounds(*args)


def test_frame_times_and_clip():
    clip = Clip(Path("/x/bikes.mp4"), 0, 2.0, 12.0)
    assert frame_times(clip, 5) == pytest.approx([3.0, 5.0, 7.0, 9.0, 11.0])
    assert frame_times(clip, 1) == pytest.approx([7.0])
    assert clip.id == "bikes#00" and clip.duration_s == 10.0
    assert Clip(Path("a/b.mov"), 12, 0, 1).id == "b#12"
    assert clip.to_dict() == {"id": "bikes#00", "video": "/x/bikes.mp4", "index": 0,
                              "start_s": 2.0, "end_s": 12.0}
    with pytest.raises(ValueError):
        frame_times(clip, 0)


# --- probing and clips on real and synthetic videos ------------------------------------------

def test_sample_videos():
    assert set(SAMPLES) >= {"bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"}
    assert list(SAMPLES.values()) == sorted(SAMPLES.values())


@pytest.mark.parametrize("name, duration, size", [
    ("bikes.mp4", 10.0, (640, 272)),
    ("bigbuckbunny.mp4", 5.28, (1280, 720)),
    ("carphone_pristine.mp4", 4.004, (176, 144)),
])
def test_probe_sample_videos(name, duration, size):
    info = probe(SAMPLES[name])
    assert info.duration_s == pytest.approx(duration, abs=0.05)
    assert (info.width, info.height) == size
    assert info.codec == "h264" and info.fps > 0
    assert info.path == SAMPLES[name]


def test_probe_bikes_details():
    info = probe(str(BIKES))
    assert info.fps == 25.0 and isinstance(info.path, Path)


def test_clips_bikes_is_one_clip():
    assert clips(BIKES) == [Clip(BIKES, 0, 0.0, 10.0)]


def test_clips_synthetic(grey12, tmp_path):
    assert [(c.index, c.start_s, c.end_s) for c in clips(grey12)] == [(0, 0.0, 10.0),
                                                                      (1, 2.0, 12.0)]
    short = grey_video(tmp_path / "short.mp4", 4)
    assert [(c.start_s, c.end_s) for c in clips(short)] == [(0.0, 4.0)]
    info = probe(grey12)
    assert (info.duration_s, info.fps, info.width, info.height) == (12.0, 5.0, 64, 48)


# --- frame sampling --------------------------------------------------------------------------
CROP = "crop"  # the frame-picking tests read grey levels off a centre crop (no resampling across the frame's width)


def test_sample_frames_picks_frame_at_or_before_each_target(grey12):
    levels = grey_levels(grey12)
    assert len(levels) == 60
    first, second = clips(grey12)
    # targets 0.83, 2.5, 4.17, 5.83, 7.5, 9.17 s -> frames at 0.8, 2.4, 4.0, 5.8, 7.4, 9.0 s
    x = sample_frames(first, WindowConfig(size=32, fit=CROP))
    assert frame_indices(x, levels) == [4, 12, 20, 29, 37, 45]
    # targets 2.83 ... 11.17 s; the seek lands before the first target, mid-GOP
    x = sample_frames(second, WindowConfig(size=32, fit=CROP))
    assert frame_indices(x, levels) == [14, 22, 30, 39, 47, 55]
    # targets exactly on frame times (1, 3, 5, 7, 9 s) take that frame
    x = sample_frames(first, WindowConfig(frames=5, size=32, fit=CROP))
    assert frame_indices(x, levels) == [5, 15, 25, 35, 45]


@pytest.mark.parametrize("suffix", [".mkv", ".ts"])  # .ts: the seek overshoots, decode from start
def test_sample_frames_other_containers(tmp_path, suffix):
    path = grey_video(tmp_path / f"grey{suffix}", 12)
    levels = grey_levels(path)
    assert probe(path).duration_s == pytest.approx(12.0, abs=0.05)
    second = clips(path)[1]
    assert frame_indices(sample_frames(second, WindowConfig(size=32, fit=CROP)), levels) == [
        14, 22, 30, 39, 47, 55]


def test_raw_stream_without_timestamps(tmp_path):
    path = grey_video(tmp_path / "raw.h264", 4)  # no pts, no durations: count frames
    info = probe(path)
    assert info.duration_s == pytest.approx(20 / info.fps)
    x = sample_frames(clips(path)[0], WindowConfig(frames=4, size=32))
    assert frame_indices(x, grey_levels(path)) == [
        int((k + 0.5) * info.duration_s / 4 * info.fps) for k in range(4)]


def test_sample_frames_past_end_reuses_last_frame(grey12):
    levels = grey_levels(grey12)
    x = sample_frames(Clip(grey12, 9, 8.0, 20.0), WindowConfig(frames=4, size=32))
    assert frame_indices(x, levels) == [47, 59, 59, 59]  # targets 9.5, 12.5, 15.5, 18.5 s


def test_sample_frames_shape_dtype_on_real_videos():
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        clip = clips(SAMPLES[name])[0]
        x = sample_frames(clip)
        assert x.shape == (1, 3, 6, 224, 224) and x.dtype == torch.uint8
        assert x.float().std() > 5  # real picture content, not a constant
        assert not torch.equal(x[0, :, 0], x[0, :, -1])  # frames differ over time


def test_sample_frames_centre_crops_wide_video(tmp_path):
    # 2:1 frame: outer quarters red, inner half black | white. A square centre crop must keep
    # exactly the inner half: black on its left, white on its right, no red anywhere.
    def draw(i):
        a = np.zeros((48, 96, 3), np.uint8)
        a[:, :24] = a[:, 72:] = (255, 0, 0)
        a[:, 48:72] = 255
        return a

    path = write_video(tmp_path / "wide.mp4", 10, 5, draw, w=96, h=48)
    x = sample_frames(clips(path)[0], WindowConfig(frames=2, size=32, fit="crop"))[0].float()
    assert x.shape == (3, 2, 32, 32)
    left, right = x[:, :, :, 3:13], x[:, :, :, 19:29]
    assert left.max() < 40  # black, not red
    assert right.min() > 215  # white
    red_excess = x[0] - (x[1] + x[2]) / 2
    assert red_excess.max() < 60


# --- bad inputs ------------------------------------------------------------------------------

def assert_video_error(path: Path, fragment: str) -> VideoError:
    with pytest.raises(VideoError) as info:
        probe(path)
    assert info.value.path == Path(path)
    assert fragment in info.value.reason and fragment in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    assert_video_error(tmp_path / "nope.mp4", "file not found")
    with pytest.raises(VideoError, match="file not found"):
        sample_frames(Clip(tmp_path / "nope.mp4", 0, 0.0, 1.0))


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert_video_error(tmp_path / "empty.mp4", "empty file (0 bytes)")


def test_directory(tmp_path):
    assert_video_error(tmp_path, "directory")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    assert_video_error(path, "")
    with pytest.raises(VideoError):
        sample_frames(Clip(path, 0, 0.0, 10.0))


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 100)
    err = assert_video_error(path, "not a readable video file")
    assert "Invalid data" in err.reason  # FFmpeg's own message is kept


def test_truncated_header(tmp_path):
    path = tmp_path / "trunc.mp4"
    path.write_bytes(BIKES.read_bytes()[:2048])
    assert_video_error(path, "not a readable video file")


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_30_percent(tmp_path, faststart):
    if faststart:  # index at the front: probing works, late frames are missing
        noise = np.random.default_rng(1)
        src = write_video(tmp_path / "noise.mp4", 60, 5,
                          lambda i: noise.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        with av.open(str(src)) as inp, av.open(str(tmp_path / "fs.mp4"), "w",
                                                options={"movflags": "faststart"}) as out:
            stream = out.add_stream_from_template(inp.streams.video[0])
            for packet in inp.demux(inp.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = stream
                    out.mux(packet)
        data = (tmp_path / "fs.mp4").read_bytes()
    else:
        data = BIKES.read_bytes()
    path = tmp_path / "trunc30.mp4"
    path.write_bytes(data[: int(len(data) * 0.3)])
    try:
        found = clips(path)
    except VideoError as e:
        assert e.path == path
        return
    for clip in found:
        try:
            x = sample_frames(clip, WindowConfig(size=32))
        except VideoError as e:
            assert e.path == path and "clip" in e.reason
        else:
            assert x.shape == (1, 3, 6, 32, 32)


def test_audio_only(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    assert_video_error(path, "no video stream (audio only?)")
    with pytest.raises(VideoError, match="no video stream"):
        sample_frames(Clip(path, 0, 0.0, 0.5))


def test_undecodable_video_stream(tmp_path):
    path = grey_video(tmp_path / "corrupt.mp4", 2, codec="mpeg4")
    data = bytearray(path.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")  # box size, header included
    data[at + 4:at - 4 + size] = bytes(size - 8)  # zero the coded pictures, keep the index
    path.write_bytes(bytes(data))
    assert_video_error(path, "cannot decode video stream (codec mpeg4)")


# --- find_videos -----------------------------------------------------------------------------

def test_video_suffixes():
    assert {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".3gp"} <= VIDEO_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in VIDEO_SUFFIXES)


def test_find_videos(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ["b.mp4", "a.MOV", "c.webm", "notes.txt", ".hidden.mp4", "d.mkv"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.mp4").write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no videos")
    explicit = tmp_path / "clip.dat"
    explicit.write_bytes(b"x")
    missing = tmp_path / "missing.mp4"

    videos, problems = find_videos([explicit, folder, missing, str(folder / "b.mp4"), empty])
    assert videos == [explicit] + [folder / n for n in ["a.MOV", "b.mp4", "c.webm", "d.mkv", "sub/deep.mp4"]]
    assert problems == [(missing, "file not found"), (empty, "no video files in folder")]

    assert find_videos(folder / "b.mp4") == ([folder / "b.mp4"], [])  # one path, not a list
    assert find_videos([]) == ([], [])


def test_scan_walks_nested_folders_safely(tmp_path):
    from atomkit.media.scan import scan

    root = tmp_path / "DCIM"
    (root / "100APPLE").mkdir(parents=True)
    (root / "101APPLE" / "deeper").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    for rel in ["100APPLE/IMG_0001.MOV", "100APPLE/IMG_0002.JPG", "101APPLE/deeper/IMG_0100.mp4",
                ".thumbs/t.mp4", "notes.txt"]:
        (root / rel).write_bytes(b"x")
    (root / "101APPLE" / "loop").symlink_to(root)  # a symlink loop
    (root / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")  # dangling
    found = scan(root)
    assert found.videos == [root / "100APPLE/IMG_0001.MOV", root / "101APPLE/deeper/IMG_0100.mp4"]
    assert found.problems == [(root / "gone.mp4", "dangling symbolic link (its target does not exist)")]
    assert found.not_videos == 2  # IMG_0002.JPG and notes.txt
    assert scan(root / "gone.mp4").problems == [(root / "gone.mp4", "dangling symbolic link (its target does not exist)")]


def test_thumbnail_is_the_frame_at_the_time(samples, tmp_path):
    import io

    from PIL import Image

    from atomkit.media.preview import thumbnail

    def shown_at(t: float) -> np.ndarray:  # the frame at t, decoded here, at the thumbnail's size
        with av.open(str(samples["bikes.mp4"])) as c:
            picked = None
            for f in c.decode(c.streams.video[0]):
                if picked is not None and f.time > t:
                    break
                picked = f
        return np.asarray(picked.to_image().resize((96, 54)).convert("L"), dtype=np.float32)

    def thumb(t: float) -> np.ndarray:
        jpeg = thumbnail(samples["bikes.mp4"], t, width=96)
        assert jpeg[:2] == b"\xff\xd8"
        return np.asarray(Image.open(io.BytesIO(jpeg)).resize((96, 54)).convert("L"), dtype=np.float32)

    for t, other in ((0.5, 9.0), (9.0, 0.5)):
        got = thumb(t)
        assert np.abs(got - shown_at(t)).mean() < np.abs(got - shown_at(other)).mean()
    assert Image.open(io.BytesIO(thumbnail(samples["bikes.mp4"], 99.0))).size[0] == 192  # past the end: last frame
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    with pytest.raises(VideoError, match="broken.mp4"):
        thumbnail(broken, 1.0)


def test_preview_is_the_span_small_and_in_real_time(samples, tmp_path):
    from atomkit.media.preview import preview

    out = preview(samples["bikes.mp4"], 2.0, 5.0, tmp_path / "p.mp4", width=160)
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        assert (s.width, s.codec_context.name) == (160, "h264")
        assert abs(float(s.duration * s.time_base) - 3.0) < 0.1
    fast = preview(samples["bikes.mp4"], 2.0, 5.0, tmp_path / "slow.mp4", max_fps=10)  # frames dropped, not slowed
    with av.open(str(fast)) as c:
        assert abs(sum(1 for _ in c.decode(c.streams.video[0])) - 30) <= 1
        assert abs(c.duration / av.time_base - 3.0) < 0.2
    # its first frame is the source's frame at 2 s
    with av.open(str(samples["bikes.mp4"])) as c:
        src = next(f for f in c.decode(c.streams.video[0]) if f.time >= 2.0 - 1e-6)
    want = src.to_ndarray(format="gray", width=160, height=frames[0].height).astype(np.float32)
    later = preview(samples["bikes.mp4"], 8.0, 9.0, tmp_path / "later.mp4", width=160)
    with av.open(str(later)) as c:
        other = next(iter(c.decode(c.streams.video[0]))).to_ndarray(format="gray").astype(np.float32)
    got = frames[0].to_ndarray(format="gray").astype(np.float32)
    assert np.abs(got - want).mean() < np.abs(other - want).mean()
    broken = tmp_path / "broken.mp4"
    broken.write_text("nope")
    with pytest.raises(VideoError, match="broken.mp4"):
        preview(broken, 0, 1, tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


# --- display rotation ---------------------------------------------------------------------------

# A 64x48 frame whose left third is white, tagged to be shown turned counter-clockwise by `rotation` degrees:
# turned by 90 the left edge is at the bottom, by 270 (-90) at the top, by 180 on the right.
WHITE_SIDE = {90: "bottom", -90: "top", 180: "right"}


def _white_side(rgb: np.ndarray) -> str:
    grey = rgb.astype(np.float32).mean(axis=-1)
    h, w = grey.shape
    sides = {"top": grey[: h // 4], "bottom": grey[-(h // 4):], "left": grey[:, : w // 4], "right": grey[:, -(w // 4):]}
    return max(sides, key=lambda k: sides[k].mean())


@pytest.mark.parametrize("rotation", sorted(WHITE_SIDE))
def test_rotation_tag_turns_frames_thumbnails_and_previews_upright(rotation, tmp_path):
    import io

    from PIL import Image
    from corpus import write_video as write_tagged

    from atomkit.media.preview import preview, thumbnail

    path = write_tagged(tmp_path / "phone.mp4", rotation=rotation, colour=(40, 40, 160))
    shown = (48, 64) if rotation % 180 else (64, 48)
    info = probe(path)
    assert ((info.width, info.height), info.rotation) == (shown, rotation % 360)
    side = WHITE_SIDE[rotation]
    for fit in ("whole", "crop"):
        x = sample_frames(clips(path)[0], WindowConfig(frames=2, size=32, fit=fit))
        assert _white_side(x[0, :, 0].permute(1, 2, 0).numpy()) == side, fit
    thumb = Image.open(io.BytesIO(thumbnail(path, 0.5, width=48)))
    assert thumb.size == (48, round(48 * shown[1] / shown[0]))
    assert _white_side(np.asarray(thumb.convert("RGB"))) == side
    with av.open(str(preview(path, 0.0, 1.0, tmp_path / "p.mp4", width=48))) as c:
        first = next(c.decode(video=0))
        assert (first.width, first.height) == (48, round(48 * shown[1] / shown[0] / 2) * 2)
        assert _white_side(first.to_ndarray(format="rgb24")) == side


def test_a_glance_is_one_frame_inside_the_clip_at_or_before_its_middle(samples):
    """The glance's frame (search-first indexing) is a frame of the clip no later than its middle: compared with
    every frame ``sample_frames`` can give between the clip's start and its middle."""
    import numpy as np

    from atomkit.config import WindowConfig
    from atomkit.media.video import clips, frame_times, glance_frame, sample_frames

    clip = clips(samples["bikes.mp4"], WindowConfig(length_s=4.0, stride_s=2.0))[1]
    got = glance_frame(clip)
    assert got.shape == (1, 3, 1, 224, 224) and str(got.dtype) == "torch.uint8"
    dense = sample_frames(clip, WindowConfig(length_s=4.0, stride_s=2.0, frames=40))  # every ~0.1 s of the clip
    times = frame_times(clip, 40)
    before = [i for i, t in enumerate(times) if t <= (clip.start_s + clip.end_s) / 2 + 0.05]
    diffs = [float((dense[0, :, i].float() - got[0, :, 0].float()).abs().mean()) for i in range(40)]
    best = int(np.argmin(diffs))
    assert diffs[best] < 1.0 and best in before, (best, diffs[best])
