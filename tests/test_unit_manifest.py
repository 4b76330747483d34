"""Manifest formats and the named reason of every bad entry."""

import json

import pytest

from wanray.data.manifest import read_manifest
from wanray.errors import ManifestError


def _reasons(rejects):
    return sorted(r.reason for r in rejects)


def test_mindspeed_data_txt_with_annotation(tmp_path):
    (tmp_path / "set").mkdir()
    anno = [
        {
            "path": "./videos/a.mp4",
            "cap": "a cat",
            "num_frames": 81,
            "fps": 24,
            "resolution": {"height": 480, "width": 832},
        },
        {"path": "videos/b.mp4", "cap": ["", "a dog", "another"], "cut": [10, 90], "aesthetic": 5.1},
        {"path": "videos/c.mp4"},
        {"path": "videos/d.mp4", "cap": "   "},
        {"path": "videos/e.mp4", "cap": 42},
        {"path": "videos/f.mp4", "cap": None},
        {"path": "videos/g.mp4", "cap": "ok", "cut": [5, 2]},
        {"cap": "no path"},
        "not an object",
        {"path": "./videos/a.mp4", "cap": "a cat", "num_frames": 81},
    ]
    (tmp_path / "set" / "data.json").write_text(json.dumps(anno))
    (tmp_path / "data.txt").write_text("# comment\n./set,./set/data.json\n\n./set\n./set,./set/missing.json\n")
    sources, rejects = read_manifest(tmp_path / "data.txt")
    assert [s.caption for s in sources] == ["a cat", "a dog"]
    assert sources[0].path == str((tmp_path / "set" / "videos" / "a.mp4").resolve())
    assert (sources[1].cut_start, sources[1].cut_end) == (10, 90)
    assert _reasons(rejects) == sorted(
        [
            "missing_caption",
            "empty_caption",
            "caption_not_string",
            "caption_not_string",
            "malformed_cut",
            "missing_path",
            "malformed_entry",
            "duplicate_entry",
            "malformed_manifest_line",
            "annotation_not_found",
        ]
    )


def test_jsonl_with_a_malformed_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(
        '{"path": "a.mp4", "cap": "one"}\n{"video": "b.mp4", "prompt": "two"\n\n{"path": "c.mp4", "text": "three"}\n'
    )
    sources, rejects = read_manifest(m)
    assert [s.caption for s in sources] == ["one", "three"]
    assert [(r.input, r.reason) for r in rejects] == [(f"{m}:2", "malformed_json_line")]


def test_csv_video_prompt(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text('video,prompt\nclips/a.mp4,"a, quoted caption"\nclips/b.mp4,\n')
    sources, rejects = read_manifest(m)
    assert [(s.path, s.caption) for s in sources] == [(str(tmp_path / "clips" / "a.mp4"), "a, quoted caption")]
    assert _reasons(rejects) == ["empty_caption"]


def test_malformed_annotation_json(tmp_path):
    (tmp_path / "a.json").write_text("[{")
    (tmp_path / "data.txt").write_text(".,a.json\n")
    _, rejects = read_manifest(tmp_path / "data.txt")
    assert _reasons(rejects) == ["malformed_json"]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("m.csv", "path,caption\na.mp4,x\n", "'video' and 'prompt'"),
        ("m.yaml", "", "unknown manifest format"),
    ],
)
def test_unreadable_manifest_is_one_clear_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path / name)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.txt")
