"""Object-store paths (wanray.storage) against the loopback S3 server: URIs joined and read as local paths are,
manifests read from a bucket, objects downloaded once per process for the decoders."""

import json
import time
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


def test_a_working_copy_appends_to_what_the_store_holds_and_the_driver_follows_its_lines(s3):
    from wanray.train.console import Follow

    s3.create_bucket(Bucket="runs")
    s3.put_object(Bucket="runs", Key="run/high/console.log", Body=b"[train:high] step 2/4\n")
    root, printed = "s3://runs/run/high", []
    files = storage.WorkingCopy(root)
    with Follow([storage.join(root, "console.log")], printed.append, interval=0.02):
        files.pull("console.log", "metrics.jsonl")  # a resumed rank goes on from the store's copy
        assert (files.local / "console.log").read_text() == "[train:high] step 2/4\n"
        assert not (files.local / "metrics.jsonl").exists()
        with (files.local / "console.log").open("a") as f:
            f.write("[train:high] step 3/4\n[train:high] step 4")  # the last line is not complete yet
        (files.local / "tensorboard").mkdir()
        (files.local / "tensorboard" / "events.out.train").write_bytes(b"event")
        files.push("console.log", "tensorboard", "best.json")  # best.json was not written: nothing to upload
        deadline = time.time() + 10
        while not printed and time.time() < deadline:
            time.sleep(0.02)
    assert printed == ["[train:high] step 3/4"]  # not the old line, nor the half-written one
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"]}
    assert keys == {"run/high/console.log", "run/high/tensorboard/events.out.train"}
    files.close()
    assert not files.local.exists()


def test_checkpoints_in_a_bucket_are_listed_and_checked_from_their_metadata_alone(s3, tmp_path):
    import torch.distributed.checkpoint as dcp

    from wanray.errors import DataError
    from wanray.train.checkpoint import check_resumable
    from wanray.train.runs import RUN_FILE, checkpoints, latest_checkpoint, trained_experts

    s3.create_bucket(Bucket="ckpt")
    dcp.save({"train": {"step": 3, "epoch": 0}}, checkpoint_id=str(tmp_path / "old"), no_dist=True)
    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 4)):
        s3.put_object(Bucket="ckpt", Key=f"run/high/{name}/wanray_step.json", Body=json.dumps({"step": step}))
        s3.upload_file(str(tmp_path / "old" / ".metadata"), "ckpt", f"run/high/{name}/.metadata")
    s3.put_object(Bucket="ckpt", Key="run/high/checkpoint_c/__0_0.distcp", Body=b"")  # still being written
    s3.put_object(Bucket="ckpt", Key=f"run/high/{RUN_FILE}", Body=b"{}")
    assert checkpoints("s3://ckpt/run", "high") == {
        2: "s3://ckpt/run/high/checkpoint_a",
        4: "s3://ckpt/run/high/checkpoint_b",
    }
    assert latest_checkpoint("s3://ckpt/run", "high") == "s3://ckpt/run/high/checkpoint_b"
    assert trained_experts("s3://ckpt/run") == ["high"]
    with pytest.raises(DataError, match="s3://ckpt/run/high/checkpoint_b was written by an earlier wanray"):
        check_resumable("s3://ckpt/run/high/checkpoint_b")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of the low-noise expert in s3://ckpt/run/low"):
        latest_checkpoint("s3://ckpt/run", "low")
