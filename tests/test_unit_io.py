"""Atomic writes: readers never see a partial file, and a failed write leaves the old one."""

import json

import av
import numpy as np
import pytest

from wanray.io import atomic_path, write_json_atomic, write_mp4


def test_a_file_being_written_is_hidden_from_readers_globs(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    with atomic_path(tmp_path / "b.json") as tmp:
        tmp.write_text('{"half": ')  # what a killed writer leaves behind
        assert tmp.name.startswith(".b.json.") and tmp.suffix == ".tmp"
        assert [p.name for p in tmp_path.glob("*.json")] == ["a.json"]
        tmp.write_text('{"whole": true}')
    assert json.loads((tmp_path / "b.json").read_text()) == {"whole": True}


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    write_json_atomic({"v": 1}, tmp_path / "s.json")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "s.json") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert json.loads((tmp_path / "s.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_directories_replace_only_when_asked(tmp_path):
    out = tmp_path / "export"
    (out / "old").mkdir(parents=True)
    with pytest.raises(OSError), atomic_path(out) as tmp:
        (tmp / "new").mkdir(parents=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (out / "old").is_dir()
    with atomic_path(out, replace_dir=True) as tmp:
        (tmp / "new").mkdir(parents=True)
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_mp4_round_trip(tmp_path):
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    frames[:, :, :24] = 200
    write_mp4(tmp_path / "v.mp4", frames, 16)
    with av.open(str(tmp_path / "v.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)
    assert abs(int(decoded[2][:, :20].mean()) - 200) < 10 and decoded[2][:, 28:].mean() < 10
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
