"""Long videos into clips: shot boundaries, then each shot cut into clips of bounded length.

Shots come from PySceneDetect's ContentDetector (HSV change between consecutive frames, on frames it
downscales itself), read through its OpenCV backend. Each shot is cut from its start into clips of
at most data.max_clip_seconds from first to last frame; a piece shorter than data.min_clip_seconds (a
short shot, or what is left at a shot's end) is no clip. A clip is a frame range [start, end) of its source: nothing is
re-encoded, the decode stage reads those frames of the source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shots:
    fps: float
    frames: int
    shots: list[tuple[int, int]]
    """[start, end) source frames of each shot, in order, covering the video."""


def detect_shots(path: str, threshold: float, min_shot_frames: int) -> Shots:
    """The shots of a video file (raises scenedetect's VideoOpenFailure on what it cannot open)."""
    from scenedetect import ContentDetector, SceneManager, open_video

    video = open_video(path, backend="opencv")
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_shot_frames))
    manager.detect_scenes(video)
    shots = [(a.frame_num, b.frame_num) for a, b in manager.get_scene_list(start_in_scene=True)]
    return Shots(float(video.frame_rate), int(video.duration.frame_num), [(a, b) for a, b in shots if b > a])


Range = tuple[int, int]


def cut_shot(
    start: int, end: int, fps: float, max_seconds: float, min_seconds: float
) -> tuple[list[Range], list[Range]]:
    """([start, end) of each clip, [start, end) of each piece too short to be one) for one shot: clips of
    max_seconds from its start, the last one shorter; pieces under min_seconds are left out. A clip's seconds
    run from its first frame to its last, as a clip's frames at data.fps count them (wanray.data.video's
    available_frames): 81 frames at 16 fps are 5.0 s, so max_seconds 5.06 cuts pieces of 81 frames."""
    longest = math.floor(max_seconds * fps + 1e-6) + 1
    shortest = max(1, math.ceil(min_seconds * fps - 1e-6) + 1)
    clips: list[Range] = []
    short: list[Range] = []
    for a in range(start, end, longest):
        piece = (a, min(a + longest, end))
        (clips if piece[1] - piece[0] >= shortest else short).append(piece)
    return clips, short
