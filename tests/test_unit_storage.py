"""Object-store paths (wanray.storage) against the loopback S3 server: URIs joined and read as local paths are,
manifests read from a bucket, objects downloaded once per process for the decoders."""

import json
from pathlib import Path

import pytest

from wanray import storage
from wanray.data.manifest import read_manifest
from wanray.data.video import ClipRejected, local_file


def test_uris_join_like_paths_and_a_uri_or_absolute_part_stands_alone(tmp_path):
    assert storage.join("s3://b/corpus", "videos/a.mp4") == "s3://b/corpus/videos/a.mp4"
    assert storage.join("s3://b/corpus", "../other/./a.mp4") == "s3://b/other/a.mp4"
    assert storage.join("s3://b/corpus", "gs://c/a.mp4") == "gs://c/a.mp4"
    assert storage.parent("s3://b/corpus/m.jsonl") == "s3://b/corpus"
    assert storage.join(str(tmp_path), "v/../a.mp4") == str(tmp_path / "a.mp4")
    assert storage.join(str(tmp_path), "/abs/a.mp4") == "/abs/a.mp4"
    assert storage.join(str(tmp_path), "s3://b/a.mp4") == "s3://b/a.mp4"
    assert storage.is_uri("s3://b/k") and not storage.is_uri("/data/k") and not storage.is_uri("file:///data/k")


def test_a_data_txt_manifest_in_a_bucket_resolves_its_videos_there(s3):
    s3.create_bucket(Bucket="manifests")
    s3.put_object(Bucket="manifests", Key="set/data.txt", Body="clips,anno/data.json\n")
    anno = [{"path": "a.mp4", "cap": "one"}, {"path": "s3://elsewhere/b.mp4", "cap": "two"}, {"path": "c.mp4"}]
    s3.put_object(Bucket="manifests", Key="set/anno/data.json", Body=json.dumps(anno))
    sources, rejects = read_manifest("s3://manifests/set/data.txt")
    assert [s.path for s in sources] == ["s3://manifests/set/clips/a.mp4", "s3://elsewhere/b.mp4"]
    assert [(r.input, r.reason) for r in rejects] == [("s3://manifests/set/clips/c.mp4", "missing_caption")]


def test_an_object_is_downloaded_once_and_missing_or_empty_ones_are_named(s3):
    s3.create_bucket(Bucket="videos")
    s3.put_object(Bucket="videos", Key="a.mp4", Body=b"\x00\x00\x00\x18ftypmp42 not really a video")
    s3.put_object(Bucket="videos", Key="empty.mp4", Body=b"")
    with local_file("s3://videos/a.mp4") as first:
        assert Path(first).read_bytes()[:8] == b"\x00\x00\x00\x18ftyp"
    s3.delete_object(Bucket="videos", Key="a.mp4")  # the process's copy serves the next read
    assert storage.local_copy("s3://videos/a.mp4") == first
    for uri, reason in (("s3://videos/a.mp4", "file_not_found"), ("s3://videos/empty.mp4", "empty_file")):
        with pytest.raises(ClipRejected) as e, local_file(uri):
            pass
        assert e.value.reason == reason


def test_a_run_directory_on_object_storage_is_a_one_line_error_for_now(tmp_path):
    from conftest import tiny_config

    from wanray.errors import ConfigError
    from wanray.train.trainer import train_experts

    with pytest.raises(ConfigError, match=r"train\.py --out\) s3://b/run: object storage holds manifests, videos and"):
        train_experts(tiny_config(tmp_path / "model"), "high", "s3://b/prep", "s3://b/run")
