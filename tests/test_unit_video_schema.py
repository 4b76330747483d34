"""Clip planning, resize/crop, real decord decoding, and the tensor codec."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from wanray.buckets import BucketSet
from wanray.data.synthetic import SyntheticClip, render, write_mp4
from wanray.data.video import ClipRejected, decode_clip, longest_4n1, plan_clip, resize_crop, resize_crop_box
from wanray.schema import decode_tensor, encode_tensor, pad_text_embedding
from wanray.wan import KINDS

T2V = KINDS["t2v-a14b"]


def test_longest_4n1():
    assert [longest_4n1(a, 81, 9) for a in (100, 81, 80, 17, 12, 8)] == [81, 81, 77, 17, 9, None]


def test_plan_resamples_to_target_fps():
    # 30 fps source, 16 fps clip: step 1.875 source frames per clip frame
    plan = plan_clip(30, 300, 16, 17, 9)
    assert len(plan.indices) == 17 and plan.indices[:4] == [0, 1, 3, 5] and plan.indices[-1] == 30
    # 8 fps source is slower than 16 fps: frames repeat
    assert plan_clip(8, 100, 16, 5, 5).indices == [0, 0, 1, 1, 2]
    # a cut restricts the range; the longest 4n+1 that fits is taken
    plan = plan_clip(16, 1000, 16, 81, 9, cut_start=100, cut_end=130)
    assert plan.indices == list(range(100, 129))


def test_too_short_and_bad_fps_are_named():
    with pytest.raises(ClipRejected) as e:
        plan_clip(16, 6, 16, 17, 9)
    assert e.value.reason == "too_short"
    with pytest.raises(ClipRejected) as e:
        plan_clip(0, 60, 16, 17, 9)
    assert e.value.reason == "bad_frame_rate"


def test_resize_covers_then_center_crops():
    assert resize_crop_box(480, 640, 64, 64) == (64, 85, 0, 10)
    assert resize_crop_box(160, 96, 64, 64) == (107, 64, 21, 0)
    frames = np.zeros((3, 40, 80, 3), np.uint8)
    frames[:, :, 30:50] = 255  # a centred white band survives the crop
    out = resize_crop(frames, 32, 32)
    assert out.shape == (3, 32, 32, 3) and out[0, 16, 16, 0] == 255 and out[0, 16, 0, 0] == 0


def test_decode_reads_the_planned_frames(tmp_path):
    clip = SyntheticClip("a.mp4", "x", 64, 64, 16, 40, "square", "white", "black", "left to right")
    frames = render(clip)
    write_mp4(tmp_path / "a.mp4", frames, 16)
    out = decode_clip(str(tmp_path / "a.mp4"), BucketSet.fixed(64, 64, 9, 9, T2V), 8)
    assert out.frames.shape == (9, 64, 64, 3) and out.plan.indices == list(range(0, 18, 2))
    # the square moves right: its centre of mass in the decoded clip follows the source
    cols = np.arange(64)
    com = [(f[..., 0].astype(float).sum(0) * cols).sum() / f[..., 0].sum() for f in out.frames]
    want = [(s[..., 0].astype(float).sum(0) * cols).sum() / s[..., 0].sum() for s in frames[out.plan.indices]]
    assert np.allclose(com, want, atol=1.0) and com[-1] > com[0] + 10


def test_decode_scales_larger_sources_like_a_resize_of_the_full_frames(tmp_path):
    clip = SyntheticClip("b.mp4", "x", 96, 160, 16, 20, "circle", "red", "navy", "top to bottom")
    write_mp4(tmp_path / "b.mp4", render(clip), 16)
    out = decode_clip(str(tmp_path / "b.mp4"), BucketSet.fixed(64, 64, 9, 9, T2V), 16)
    full = decode_clip(str(tmp_path / "b.mp4"), BucketSet.fixed(96, 160, 9, 9, T2V), 16)  # no scaling: the source size
    want = resize_crop(full.frames, 64, 64)
    assert out.frames.shape == want.shape == (9, 64, 64, 3)
    # decord's swscale and torch's antialiased bilinear differ by rounding and filter taps only
    assert np.abs(out.frames.astype(int) - want.astype(int)).mean() < 4


def test_a_rotated_phone_video_decodes_upright_into_its_portrait_bucket(tmp_path):
    """Stored 96x160 with a display rotation of 90 degrees (as phones record portrait): decord returns it upright,
    so its bucket is the portrait one, and the frames are decord's upright ones scaled, not squeezed."""
    import av
    import decord

    from wanray.buckets import Bucket
    from wanray.data.video import sample_frames

    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.set_display_rotation(90)
        for i in range(20):
            frame = np.zeros((96, 160, 3), np.uint8)
            frame[:, 8 * i : 8 * i + 40] = 255  # a band that moves along the stored width
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    buckets = BucketSet.of([Bucket(64, 32, 9), Bucket(32, 64, 9)], T2V)
    out = decode_clip(str(path), buckets, 16)
    upright = decord.VideoReader(str(path)).get_batch(out.plan.indices).asnumpy()
    assert upright.shape[1:3] == (160, 96) and out.source_size == (160, 96)
    assert out.bucket == Bucket(64, 32, 9) and out.frames.shape == (9, 64, 32, 3)
    assert np.abs(out.frames.astype(int) - resize_crop(upright, 64, 32).astype(int)).max() <= 1
    assert sample_frames(str(path), 3, 80, square=False).shape == (3, 80, 48, 3)
    assert sample_frames(str(path), 3, 16).shape == (3, 16, 16, 3)
    # a bucket set of still images only has no place for a video: a named reject, not a crash
    with pytest.raises(ClipRejected) as e:
        decode_clip(str(path), BucketSet.of([Bucket(64, 32, 1)], T2V), 16)
    assert e.value.reason == "no_video_bucket"
    with_stills = BucketSet.of([Bucket(64, 64, 1), *buckets.buckets], T2V)  # a square still is no video's place
    assert with_stills.resolution(64, 64) == (64, 64) and with_stills.resolution(64, 64, video=True) == (32, 64)


def test_a_variable_rate_video_is_sampled_by_time_not_by_its_average_rate(tmp_path):
    """30 frames 33 ms apart, then 30 frames 250 ms apart (7.65 fps on average): a 16 fps clip shows the frame
    on screen every 62.5 ms; by index at the average rate it covered 0.23 s as if it were 1 s."""
    import fractions

    import av

    path, shown = tmp_path / "vfr.mp4", []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        ms = fractions.Fraction(1, 1000)
        stream.time_base = stream.codec_context.time_base = ms
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = (shown[-1] + (33 if i <= 30 else 250)) if shown else 0, ms
            shown.append(frame.pts)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    times = np.array(shown) / 1000
    out = decode_clip(str(path), BucketSet.fixed(48, 64, 17, 17, T2V), 16)
    want = [int(np.searchsorted(times, k / 16 + 1e-6, side="right")) - 1 for k in range(17)]
    assert out.plan.indices == want and want[-1] == 30  # 1 s in: frame 30, at 0.99 s
    assert np.abs(out.frames[:, 24, 32, 0].astype(int) - 4 * np.array(want)).max() <= 6  # those frames' shades
    assert decode_clip(str(path), BucketSet.fixed(48, 64, 129, 129, T2V), 16).plan.indices[-1] == 58  # 7.99 s


def test_a_photo_with_an_exif_orientation_is_bucketed_as_shown(tmp_path):
    from PIL import Image

    from wanray.buckets import Bucket
    from wanray.data.video import decode_image

    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :16] = 255  # white at the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 64 high, 32 wide, the white edge on top
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    out = decode_image(str(tmp_path / "photo.jpg"), BucketSet.of([Bucket(64, 32, 1), Bucket(32, 64, 1)], T2V))
    assert out.bucket == Bucket(64, 32, 1) and out.source_size == (64, 32)
    assert out.frames[0, :12, :, 0].min() > 200 and out.frames[0, 20:, :, 0].max() < 50


def test_decoding_does_not_import_torch(tmp_path):
    clip = SyntheticClip("c.mp4", "x", 96, 160, 16, 20, "square", "white", "black", "left to right")
    write_mp4(tmp_path / "c.mp4", render(clip), 16)
    code = (
        "import sys; from wanray.buckets import BucketSet; from wanray.data.video import decode_clip; "
        "from wanray.wan import KINDS; "
        f"decode_clip({str(tmp_path / 'c.mp4')!r}, BucketSet.fixed(64, 64, 9, 9, KINDS['t2v-a14b']), 16); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"  # decode workers start without paying torch's import


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_codec_is_exact(dtype):
    t = torch.randn(16, 3, 4, 5).to(dtype)
    data, shape, name = encode_tensor(t)
    back = decode_tensor(data, shape, name)
    assert back.dtype == dtype and torch.equal(
        back.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        t.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    with pytest.raises(ValueError, match="empty"):
        encode_tensor(torch.zeros(0, 4))


def test_pad_text_embedding():
    e = torch.ones(3, 4)
    p = pad_text_embedding(e, 8)
    assert p.shape == (8, 4) and p[:3].eq(1).all() and p[3:].eq(0).all()


def test_curation_rejects_low_resolution_short_and_static_clips_by_name(tmp_path):
    """The optional data.min_* filters in the decode stage itself, each with its own reject reason."""
    from conftest import tiny_config

    from wanray.data.shards import collect_rejects
    from wanray.data.video import decode_source

    moving = render(SyntheticClip("m", "", 96, 160, 16, 20, "circle", "red", "gray", "left to right"))
    write_mp4(tmp_path / "moving.mp4", moving, 16)
    write_mp4(tmp_path / "static.mp4", np.repeat(moving[:1], 20, axis=0), 16)

    def run(name, *sets):
        out = tmp_path / f"out-{name}-{len(sets)}-{sets[0] if sets else ''}"
        out.mkdir()
        cfg = tiny_config(tmp_path / "no-model", *sets)
        row = {"id": name, "path": str(tmp_path / f"{name}.mp4"), "caption": "c", "cut_start": 0, "cut_end": -1}
        rows = decode_source(row, cfg, str(out), T2V)
        return rows, [r["reason"] for r in collect_rejects(out)]

    assert len(run("moving")[0]) == len(run("static")[0]) == 1  # off by default
    assert run("moving", "data.min_motion=1")[0] and run("static", "data.min_motion=1")[1] == ["static_clip"]
    assert run("moving", "data.min_resolution=100")[1] == ["below_min_resolution"]  # 96 pixels high
    assert run("moving", "data.min_resolution=96")[0]
    assert run("moving", "data.min_seconds=2")[1] == ["below_min_duration"]  # 20 frames at 16 fps: 1.25 s
    assert run("moving", "data.min_seconds=1")[0]
    # a still for I2V-A14B: its first-frame condition would be the still itself, the loss's answer given away
    from PIL import Image

    from wanray.wan import KINDS

    Image.fromarray(moving[0]).save(tmp_path / "photo.png")
    row = {"id": "p", "path": str(tmp_path / "photo.png"), "caption": "c", "cut_start": 0, "cut_end": -1}
    cfg = tiny_config(tmp_path / "no-model")
    assert decode_source(row, cfg, str(tmp_path / "out-t2v"), T2V)
    assert not decode_source(row, cfg, str(tmp_path / "out-i2v"), KINDS["i2v-a14b"])
    assert [r["reason"] for r in collect_rejects(tmp_path / "out-i2v")] == ["still_for_image_to_video"]
