"""Scores of a generated video (wanray.infer.scores) on videos whose answer is known: a still one, a square
moving at a known speed, a sharp and a blurred pattern; CLIP through a tiny random-weight model of the real
architecture; noise, which a plain Laplacian variance reads as detail."""

import numpy as np
import pytest

from wanray.data.motion import edge_axes
from wanray.infer.scores import SCORES_VERSION, VideoScorer, comparable, mean_scores, pixel_scores
from wanray.model_files import write_tiny_clip


def moving_square(speed: int, frames: int = 9, size: int = 64) -> np.ndarray:
    """A textured 16-pixel square moving right `speed` pixels a frame on black, float frames in [0, 1]."""
    texture = np.random.default_rng(0).random((16, 16, 3))
    video = np.zeros((frames, size, size, 3))
    for f in range(frames):
        x = 4 + f * speed
        video[f, 24:40, x : x + 16] = texture
    return video


def motion(frames: np.ndarray) -> float:
    return pixel_scores(frames)[0]


def sharpness(frames: np.ndarray) -> float:
    return pixel_scores(frames)[1]


def test_motion_is_zero_for_a_still_and_grows_with_speed():
    still, slow, fast = (motion(moving_square(s)) for s in (0, 1, 3))
    assert still < 1e-3 < slow < fast


def test_blur_lowers_sharpness_and_so_does_noise():
    import cv2

    for speed in (0, 2):
        pattern = moving_square(speed)
        blurred = np.stack([cv2.GaussianBlur(f, (7, 7), 2.0) for f in pattern])
        assert sharpness(pattern) > 2 * sharpness(blurred), speed
        # grain differs in every frame: not detail that stays, though every frame's Laplacian varies more
        noisy = np.clip(pattern + np.random.default_rng(speed).normal(0, 0.1, pattern.shape), 0, 1)
        assert sharpness(noisy) < sharpness(pattern) < pixel_scores(noisy[:1])[1], speed
        assert abs(sharpness(np.random.default_rng(speed).random(pattern.shape))) < 0.2 * sharpness(pattern)
    # a still image: its own Laplacian's variance, each channel's, no motion
    channels = cv2.split((pattern[0] * 255).round().astype(np.uint8))
    own = np.mean([cv2.Laplacian(c, cv2.CV_64F).var() for c in channels])
    assert pixel_scores(pattern[:1]) == (0.0, pytest.approx(own, rel=1e-4))


def test_an_edge_between_colours_of_equal_luminance_is_detail_and_its_motion_is_seen():
    """The synthetic world's blue square on olive: luminance sees two equal greys (85 and 89), no edge and so
    no motion; it moves as fast as the red square on black."""
    import cv2

    from wanray.data.synthetic import SyntheticClip, render

    def clip(color: str, background: str) -> np.ndarray:
        caption = f"a {color} square moving left to right on a {background} background"
        return render(SyntheticClip("", caption, 64, 64, 16, 9, "square", color, background, "left to right"))

    blue_on_olive, red_on_black = clip("blue", "olive"), clip("red", "black")
    blurred = np.stack([cv2.GaussianBlur(f, (7, 7), 2.0) for f in blue_on_olive])
    assert sharpness(blue_on_olive) > max(0.25 * sharpness(red_on_black), 2 * sharpness(blurred))
    assert motion(blue_on_olive) == pytest.approx(motion(red_on_black), rel=0.1)
    assert motion(red_on_black) > 1  # the square moves 5.5 pixels a frame; most of the frame stays


def test_the_flow_sees_a_grey_video_as_it_is_and_a_flat_one_by_its_luminance():
    grey = (moving_square(2).mean(axis=-1, keepdims=True).repeat(3, axis=-1) * 255).round().astype(np.uint8)
    [(weights, offset)] = edge_axes(grey)
    assert weights == pytest.approx([1 / 3] * 3, abs=1e-6) and offset == 0
    assert np.array_equal((grey.astype(np.float32) @ weights + offset).round().astype(np.uint8), grey[..., 0])
    [(weights, offset)] = edge_axes(np.full((3, 8, 8, 3), 90, np.uint8))
    assert weights == pytest.approx([0.299, 0.587, 0.114], abs=1e-6) and offset == 0


def test_an_object_whose_colours_differ_across_the_strongest_axis_still_moves():
    """Black and white stripes make grey the axis of the strongest edges; a red square moving on green is one
    grey there, and moves on the second axis (red against green), as luminance sees it move."""
    import cv2

    from wanray.data.motion import farneback

    video = np.zeros((9, 64, 64, 3), np.uint8)
    video[:, :, (np.arange(64) // 4) % 2 == 1] = 255
    video[:, 16:48] = (0, 150, 0)
    for f in range(9):
        video[f, 27:37, 4 + 5 * f : 14 + 5 * f] = (150, 0, 0)
    axes = edge_axes(video)
    assert len(axes) == 2 and axes[0][0] == pytest.approx([1 / 3] * 3, abs=0.02)
    luma = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video]
    on_luminance = np.mean([np.linalg.norm(farneback(a, b), axis=-1).mean() for a, b in zip(luma, luma[1:])])
    still = video.copy()
    still[:] = video[0]
    assert motion(video) > 0.8 * on_luminance > 10 * motion(still)


def test_slow_motion_keeps_its_sharpness():
    """Fine texture moving half a pixel a frame: the next frame's Laplacian is sampled between pixels, which a
    bilinear sample would blur (27% less); the score stays near each frame's own Laplacian variance."""
    import cv2

    texture = cv2.GaussianBlur(np.random.default_rng(0).random((256, 256)).astype(np.float32), (0, 0), 0.7)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    shifted = [cv2.warpAffine(texture, np.float32([[1, 0, -0.5 * i], [0, 1, 0]]), (256, 256), flags=cv2.INTER_CUBIC)
               for i in range(9)]  # fmt: skip
    video = np.repeat(np.stack([f[64:192, 64:192] for f in shifted])[..., None], 3, axis=-1)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (video * 255).round().astype(np.uint8)]
    own = np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in gray])
    assert motion(video) == pytest.approx(0.5, abs=0.05)
    assert 0.88 * own < sharpness(video) <= own


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return VideoScorer(str(write_tiny_clip(tmp_path_factory.mktemp("clip"))), frames=4)


def test_clip_scores_a_video_against_its_prompt(scorer):
    still = moving_square(0)
    scores = scorer(still, "a textured square")
    assert scores == scorer(still, "a textured square")  # deterministic
    assert -1.0 <= scores.clip_score <= 1.0 and scores.clip_score != scorer(still, "something else").clip_score
    assert scores.temporal_consistency == pytest.approx(1.0, abs=1e-5)  # identical frames
    noise = np.random.default_rng(1).random((9, 64, 64, 3))
    assert scorer(noise, "a textured square").temporal_consistency < scores.temporal_consistency
    # a prompt longer than CLIP's 77 positions is cut there (this tokenizer sets no model_max_length)
    assert scorer(still, "a textured square " * 40).clip_score is not None


def test_without_a_clip_model_only_motion_and_sharpness_are_scored():
    scores = VideoScorer()(moving_square(2), "a square").as_dict()
    assert set(scores) == {"motion", "sharpness"}
    assert mean_scores([{"motion": 1.0, "sharpness": 3.0}, {"motion": 2.0}]) == {"motion": 1.5, "sharpness": 3.0}


def test_scores_of_an_earlier_version_are_left_out_where_their_meaning_changed():
    scores = {"motion": 1.0, "sharpness": 2.0, "clip_score": 0.5, "temporal_consistency": 0.9}
    assert comparable(scores, SCORES_VERSION) == scores
    for version in (None, 1, 2):  # sharpness on grayscale, the flow on luminance
        assert comparable(scores, version) == {"clip_score": 0.5, "temporal_consistency": 0.9}
