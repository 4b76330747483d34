"""Object-store paths (wanray.storage) against the loopback S3 server: URIs joined and read as local paths are,
manifests read from a bucket, objects downloaded once per process for the decoders."""

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from wanray import storage
from wanray.data.manifest import read_manifest
from wanray.data.video import ClipRejected, local_file
from wanray.errors import RequestError


def test_uris_join_like_paths_and_a_uri_or_absolute_part_stands_alone(tmp_path):
    assert storage.join("s3://b/corpus", "videos/a.mp4") == "s3://b/corpus/videos/a.mp4"
    assert storage.join("s3://b/corpus", "../other/./a.mp4") == "s3://b/other/a.mp4"
    assert storage.join("s3://b/corpus", "gs://c/a.mp4") == "gs://c/a.mp4"
    assert storage.parent("s3://b/corpus/m.jsonl") == "s3://b/corpus"
    assert storage.join(str(tmp_path), "v/../a.mp4") == str(tmp_path / "a.mp4")
    assert storage.join(str(tmp_path), "/abs/a.mp4") == "/abs/a.mp4"
    assert storage.join(str(tmp_path), "s3://b/a.mp4") == "s3://b/a.mp4"
    assert storage.is_uri("s3://b/k") and not storage.is_uri("/data/k") and not storage.is_uri("file:///data/k")
    assert not storage.is_uri(f"{tmp_path}/runs/../x://y") and not storage.is_uri("runs/x://y")  # local names
    assert storage.absolute("file:///data/k") == "/data/k" and storage.join("file:///data", "k") == "/data/k"


def test_a_data_txt_manifest_in_a_bucket_resolves_its_videos_there(s3):
    s3.create_bucket(Bucket="manifests")
    s3.put_object(Bucket="manifests", Key="set/data.txt", Body="clips,anno/data.json\n")
    anno = [{"path": "a.mp4", "cap": "one"}, {"path": "s3://elsewhere/b.mp4", "cap": "two"}, {"path": "c.mp4"}]
    s3.put_object(Bucket="manifests", Key="set/anno/data.json", Body=json.dumps(anno))
    sources, rejects = read_manifest("s3://manifests/set/data.txt")
    assert [s.path for s in sources] == ["s3://manifests/set/clips/a.mp4", "s3://elsewhere/b.mp4"]
    assert [(r.input, r.reason) for r in rejects] == [("s3://manifests/set/clips/c.mp4", "missing_caption")]


def test_an_object_is_downloaded_once_per_version_and_missing_or_empty_ones_are_named(s3, monkeypatch):
    s3.create_bucket(Bucket="videos")
    s3.put_object(Bucket="videos", Key="a.mp4", Body=b"\x00\x00\x00\x18ftypmp42 not really a video")
    s3.put_object(Bucket="videos", Key="empty.mp4", Body=b"")
    with local_file("s3://videos/a.mp4") as first:
        assert Path(first).read_bytes()[:8] == b"\x00\x00\x00\x18ftyp"
    os.utime(first, (0, 0))  # the next read of the same version is the process's copy, not a download
    with storage.local_copy("s3://videos/a.mp4") as again:
        assert again == first and Path(first).stat().st_mtime == 0
        s3.put_object(Bucket="videos", Key="a.mp4", Body=b"overwritten")  # a new version under the same URI
        with storage.local_copy("s3://videos/a.mp4") as new:
            assert Path(new).read_bytes() == b"overwritten"
            assert Path(first).read_bytes()[:8] == b"\x00\x00\x00\x18ftyp"  # still in use: still there
    assert not Path(first).exists() and Path(new).exists()  # replaced and no longer used: gone
    s3.delete_object(Bucket="videos", Key="a.mp4")
    with pytest.raises(FileNotFoundError, match="s3://videos/a.mp4"), storage.local_copy("s3://videos/a.mp4"):
        pass
    for uri, reason in (("s3://videos/a.mp4", "file_not_found"), ("s3://videos/empty.mp4", "empty_file")):
        with pytest.raises(ClipRejected) as e, local_file(uri):
            pass
        assert e.value.reason == reason
    # over the cache's budget the least recently used file goes, but never one a block still reads, nor the
    # latest one used: a video larger than the cache still serves all its clips from one download
    monkeypatch.setattr(storage, "DOWNLOAD_CACHE_BYTES", 10)
    for key in "bc":
        s3.put_object(Bucket="videos", Key=f"{key}.mp4", Body=b"8 bytes!")
    s3.put_object(Bucket="videos", Key="large.mp4", Body=b"16 bytes, large!")
    with storage.local_copy("s3://videos/b.mp4") as b:
        with storage.local_copy("s3://videos/c.mp4") as c:
            assert Path(b).read_bytes() == Path(c).read_bytes() == b"8 bytes!"  # 16 bytes held: both in use
        assert Path(b).exists() and Path(c).exists()  # b in use, c the latest
    assert not Path(b).exists() and Path(c).exists() and not Path(new).exists()
    for _ in range(2):
        with storage.local_copy("s3://videos/large.mp4") as large:
            assert Path(large).read_bytes() == b"16 bytes, large!"
        assert Path(large).exists() and not Path(c).exists()
        os.utime(large, (0, 0))
    assert Path(large).stat().st_mtime == 0  # the second block read the first one's download


def test_a_same_size_overwrite_is_fetched_again_and_one_download_holds_up_no_other_read(s3, monkeypatch):
    s3.create_bucket(Bucket="slow")
    s3.put_object(Bucket="slow", Key="lora.safetensors", Body=b"weights1")
    with storage.local_copy("s3://slow/lora.safetensors") as old:
        assert Path(old).read_bytes() == b"weights1"
    # the same size within the same second: S3's modification time (whole seconds) cannot tell; its ETag can
    s3.put_object(Bucket="slow", Key="lora.safetensors", Body=b"weights2")
    with storage.local_copy("s3://slow/lora.safetensors") as new:
        assert Path(new).read_bytes() == b"weights2"
    # a download in progress (held here, as a slow network would) keeps neither a read of another object nor
    # one of a cached object waiting, and a second reader of the same object waits for it instead of fetching
    s3.put_object(Bucket="slow", Key="video.mp4", Body=b"a long video")
    held, started, parts = threading.Event(), threading.Event(), []
    download, mkstemp = storage._Downloads._download, storage.tempfile.mkstemp

    def slow_download(self, version, opened, local, *store):
        if version[0].endswith("video.mp4"):
            started.set()
            assert held.wait(60)
        download(self, version, opened, local, *store)

    monkeypatch.setattr(storage._Downloads, "_download", slow_download)
    monkeypatch.setattr(storage.tempfile, "mkstemp", lambda **kw: parts.append(kw) or mkstemp(**kw))
    read: dict[str, bytes] = {}

    def reader(name, uri):
        with storage.local_copy(uri) as local:
            read[name] = Path(local).read_bytes()

    first = threading.Thread(target=reader, args=("first", "s3://slow/video.mp4"))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=reader, args=("second", "s3://slow/video.mp4"))
    second.start()
    others = [threading.Thread(target=reader, args=(n, f"s3://slow/{n}")) for n in ("lora.safetensors", "b.mp4")]
    s3.put_object(Bucket="slow", Key="b.mp4", Body=b"another")
    for t in others:
        t.start()
        t.join(10)
    assert read == {"lora.safetensors": b"weights2", "b.mp4": b"another"}  # neither waited for the video
    held.set()
    for t in (first, second):
        t.join(30)
    assert read["first"] == read["second"] == b"a long video"
    assert len(parts) == 2  # downloads: b.mp4 and the video once; the cached adapter none


def test_a_working_copy_appends_to_what_the_store_holds_and_the_driver_follows_its_lines(s3, capsys):
    from wanray.train.console import Follow

    s3.create_bucket(Bucket="wc-runs")
    s3.put_object(Bucket="wc-runs", Key="run/high/console.log", Body=b"[train:high] step 2/4\n")
    root, printed = "s3://wc-runs/run/high", []
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
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="wc-runs")["Contents"]} - {"run/high/", "run/high/tensorboard/"}
    assert keys == {"run/high/console.log", "run/high/tensorboard/events.out.train"}  # less pyarrow's directory markers
    # sync: at most once per `every` seconds, and a failed upload a warning, retried by the next sync
    for line in ("a\n", "b\n"):
        with (files.local / "metrics.jsonl").open("a") as f:
            f.write(line)
        files.sync("metrics.jsonl", every=60)
    assert storage.read_text(f"{root}/metrics.jsonl") == "a\n"
    files.sync("metrics.jsonl")
    assert storage.read_text(f"{root}/metrics.jsonl") == "a\nb\n"
    files.close()
    assert not files.local.exists()
    with storage.WorkingCopy("s3://no-such-bucket/run") as lost:
        (lost.local / "console.log").write_text("x\n")
        lost.sync("console.log")
    err = capsys.readouterr().err  # the copy that could not be sent stays, and says where
    assert "warning: uploading console.log to s3://no-such-bucket/run failed" in err
    assert f"console.log could not be uploaded to s3://no-such-bucket/run; the local copy stays in {lost.local}" in err
    assert (lost.local / "console.log").read_text() == "x\n"
    shutil.rmtree(lost.local)


def test_a_push_stopped_part_way_leaves_the_earlier_upload_whole(s3, monkeypatch):
    """pyarrow's S3 stream completes the object it holds when closed, even on an exception: a Ctrl-C while a
    run uploaded its log replaced the store's whole log with a truncated (here: empty) one. A push now writes
    beside the file and moves it over: stopped, it leaves the earlier upload and no temporary object."""
    s3.create_bucket(Bucket="wc-stop")
    files = storage.WorkingCopy("s3://wc-stop/run")
    (files.local / "console.log").write_text("one\ntwo\n")
    files.push("console.log")
    with (files.local / "console.log").open("a") as f:
        f.write("three\n")

    class Stopped(io.BytesIO):
        def read(self, *_):  # Ctrl-C once the upload's stream is open, before any byte is written
            raise KeyboardInterrupt

    monkeypatch.setattr(storage, "open", lambda *_: Stopped(), raising=False)
    with pytest.raises(KeyboardInterrupt):
        files.push("console.log")
    assert storage.read_text("s3://wc-stop/run/console.log") == "one\ntwo\n"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="wc-stop")["Contents"]]
    assert [k for k in keys if k != "run/"] == ["run/console.log"]  # less pyarrow's directory marker
    monkeypatch.undo()
    files.push("console.log")
    assert storage.read_text("s3://wc-stop/run/console.log") == "one\ntwo\nthree\n"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="wc-stop")["Contents"] if o["Key"] != "run/"] == [
        "run/console.log"
    ]
    # a file too large for an object store's copy is written in place (S3 copies 5 GiB at most)
    monkeypatch.setattr(storage, "MOVED_BYTES", 8)
    with (files.local / "console.log").open("a") as f:
        f.write("four\n")
    written, write = [], storage._write
    monkeypatch.setattr(storage, "_write", lambda local, fs, inner: (written.append(inner), write(local, fs, inner)))
    files.push("console.log")
    assert storage.read_text("s3://wc-stop/run/console.log") == "one\ntwo\nthree\nfour\n"
    assert written == ["wc-stop/run/console.log"]
    files.close()


def test_a_copy_pinned_to_a_version_refuses_one_written_since(s3, tmp_path):
    """local_copy(path, version(path)): the object (or file) as it was when its version was taken, or Changed."""
    s3.create_bucket(Bucket="pinned")
    s3.put_object(Bucket="pinned", Key="a.safetensors", Body=b"one")
    local = tmp_path / "a.safetensors"
    local.write_bytes(b"one")
    for path in ("s3://pinned/a.safetensors", str(local)):
        taken = storage.version(path)
        with storage.local_copy(path, taken) as copy:
            assert Path(copy).read_bytes() == b"one"
        if path.startswith("s3://"):
            s3.put_object(Bucket="pinned", Key="a.safetensors", Body=b"two")  # the same size: another ETag
        else:
            os.utime(local, (1, 1))  # touched (or copied to another node): the same content, the same version
            assert storage.version(path) == taken
            local.write_bytes(b"two")
        with pytest.raises(storage.Changed, match="was written since"), storage.local_copy(path, taken):
            pass
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.version("s3://pinned/missing.safetensors")


def test_an_object_written_while_it_downloads_is_downloaded_again_not_cached_mixed(s3, monkeypatch):
    """The store reads an object in ranges: a write between two of them gave a file of both versions, cached
    under the first. Its ETag, taken again at the end, now sends it round again; a copy pinned to the first
    version is Changed, and an object written during every try is a storage error (a reject the next run tries
    again), not a crash."""
    s3.create_bucket(Bucket="overwritten")
    s3.put_object(Bucket="overwritten", Key="v.mp4", Body=b"aaaaaa")
    copy, writes = storage._copy, [b"bbbbbb"]

    def write_halfway(source, dst) -> None:  # the object is written again after its first 3 bytes are read
        dst.write(source.read(3))
        if writes:
            s3.put_object(Bucket="overwritten", Key="v.mp4", Body=writes.pop(0))
        copy(source, dst)

    monkeypatch.setattr(storage, "_copy", write_halfway)
    with storage.local_copy("s3://overwritten/v.mp4") as local:
        assert Path(local).read_bytes() == b"bbbbbb"  # not b"aaabbb"
    s3.put_object(Bucket="overwritten", Key="v.mp4", Body=b"cccccc")
    taken, writes[:] = storage.version("s3://overwritten/v.mp4"), [b"dddddd"]
    with (
        pytest.raises(storage.Changed, match="written while it downloaded"),
        storage.local_copy("s3://overwritten/v.mp4", taken),
    ):
        pass
    with storage.local_copy("s3://overwritten/v.mp4") as local:  # nothing is written now
        assert Path(local).read_bytes() == b"dddddd"
    s3.put_object(Bucket="overwritten", Key="v.mp4", Body=b"iiiiii")
    writes[:] = [b"jj"]  # shorter: the rest of the ranges fail
    with storage.local_copy("s3://overwritten/v.mp4") as local:
        assert Path(local).read_bytes() == b"jj"
    s3.put_object(Bucket="overwritten", Key="v.mp4", Body=b"eeeeee")
    writes.extend([b"ffffff", b"gggggg", b"hhhhhh"])
    with (
        pytest.raises(ClipRejected, match="written again during each of 3 downloads") as rejected,
        local_file("s3://overwritten/v.mp4"),
    ):
        pass
    assert rejected.value.reason == "storage_error"


def test_checkpoints_in_a_bucket_are_listed_checked_and_read_in_place(s3, tmp_path, monkeypatch):
    import torch
    import torch.distributed.checkpoint as dcp

    from wanray.errors import DataError
    from wanray.train.checkpoint import check_resumable, reader
    from wanray.train.export import _load_checkpoint
    from wanray.train.runs import RUN_FILE, checkpoints, latest_checkpoint, trained_experts

    s3.create_bucket(Bucket="ckpt")
    weights = {"blocks.0.w": torch.randn(4, 3), "proj.b": torch.arange(5.0)}
    position = {"step": 4, "epoch": 0, "batches_in_epoch": 2, "data_fingerprint": "x"}
    dcp.save(
        {"model": weights, "optim": {"m": torch.ones(64)}, "train": position},
        checkpoint_id=str(tmp_path / "new"),
        no_dist=True,
    )
    dcp.save({"train": {"step": 2, "epoch": 0}}, checkpoint_id=str(tmp_path / "old"), no_dist=True)
    for name, step, source in (("checkpoint_a", 2, "old"), ("checkpoint_b", 4, "new")):
        for f in (tmp_path / source).iterdir():
            s3.upload_file(str(f), "ckpt", f"run/high/{name}/{f.name}")
        s3.put_object(Bucket="ckpt", Key=f"run/high/{name}/wanray_step.json", Body=json.dumps({"step": step}))
    s3.put_object(Bucket="ckpt", Key="run/high/checkpoint_c/__0_0.distcp", Body=b"")  # no step file: unfinished
    s3.put_object(Bucket="ckpt", Key=f"run/high/{RUN_FILE}", Body=b"{}")
    run = "s3://ckpt/run"
    assert checkpoints(run, "high") == {2: f"{run}/high/checkpoint_a", 4: f"{run}/high/checkpoint_b"}
    assert latest_checkpoint(run, "high") == f"{run}/high/checkpoint_b" and trained_experts(run) == ["high"]
    check_resumable(f"{run}/high/checkpoint_b")
    with pytest.raises(DataError, match=f"{run}/high/checkpoint_a was written by an earlier wanray"):
        check_resumable(f"{run}/high/checkpoint_a")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint of the low-noise expert in {run}/low"):
        latest_checkpoint(run, "low")
    read_text = storage.read_text

    def read(path, failing="", deleted=False):  # a read of checkpoint `failing`'s step file fails
        if path.startswith(f"{run}/high/{failing}/"):
            if deleted:  # on moto, a read that races the object's deletion (train.keep_checkpoints)
                s3.delete_object(Bucket="ckpt", Key=path.removeprefix("s3://ckpt/"))
            raise OSError("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream")
        return read_text(path)

    monkeypatch.setattr(storage, "read_text", lambda p: read(p, "checkpoint_b"))
    with pytest.raises(OSError, match="Failed to flush"):  # the object is still there: a failure to report
        checkpoints(run, "high")
    monkeypatch.setattr(storage, "read_text", lambda p: read(p, "checkpoint_a", deleted=True))
    assert checkpoints(run, "high") == {4: f"{run}/high/checkpoint_b"}  # gone while read: no checkpoint
    local = tmp_path / "local_run"  # on a local disk too
    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 4)):
        (local / "high" / name).mkdir(parents=True)
        (local / "high" / name / "wanray_step.json").write_text(json.dumps({"step": step}))

    def read_after_a_is_deleted(path):
        if "checkpoint_a" in str(path):
            shutil.rmtree(local / "high" / "checkpoint_a")  # between the listing and the read
        return read_text(path)

    monkeypatch.setattr(storage, "read_text", read_after_a_is_deleted)
    assert checkpoints(local, "high") == {4: local / "high" / "checkpoint_b"}
    monkeypatch.undo()
    source = reader(f"{run}/high/checkpoint_b")  # the model's tensors read from the bucket, a group at a time
    for name, tensor in weights.items():
        loaded = {name: torch.empty_like(tensor)}
        _load_checkpoint(loaded, source)
        assert torch.equal(loaded[name], tensor)


def test_the_ui_pages_read_runs_evaluations_and_data_in_a_bucket_and_nothing_outside(s3, tmp_path):
    from test_unit_curation import shard_of

    from ui.pages import _served_copy
    from wanray.infer.browse import DataView, ReportView, Roots, RunView, list_datasets, list_reports, list_runs
    from wanray.infer.evaluate import report_html
    from wanray.infer.scores import SCORES_VERSION
    from wanray.train.runs import CONFIG_FILE, RUN_FILE

    s3.create_bucket(Bucket="ui-roots")
    put = lambda key, body: s3.put_object(Bucket="ui-roots", Key=key, Body=body)
    video = b"\x00\x00\x00\x18ftypmp42 a rendered video"
    put(f"runs/team/ft/high/{RUN_FILE}", "{}")
    put(f"runs/team/ft/high/{CONFIG_FILE}", "train:\n  steps: 30\n")
    put("runs/team/ft/high/metrics.jsonl", '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    put("runs/team/ft/high/validation/step_2/00.mp4", video)
    put("runs/team/ft/high/validation/step_2/prompts.json", '["a red circle"]')
    record = {"step": 2, "videos": ["s3://ui-roots/runs/team/ft/high/validation/step_2/00.mp4"]}
    failed = {"step": 3, "error": "RuntimeError: out of memory"}  # a failed validation: nothing to show
    # a record of an earlier wanray (no scores_version): its sharpness and motion were other quantities, and are
    # left out; its CLIP score is the same quantity
    earlier = {**record, "scores_mean": {"motion": 1.5, "sharpness": 600.0, "clip_score": 0.25}}
    records = [json.dumps(earlier), json.dumps(failed)]
    put("runs/team/ft/high/validation/validations.jsonl", "\n".join(records) + "\n")
    put(f"runs/team/ft/high/checkpoint_000000/{RUN_FILE}", "{}")  # not a run: listings skip checkpoints
    prompt = {"prompt": "a red circle", "seed": 0, "video": "v/a.mp4"}
    result = {
        "source": "m",
        "mean": {"motion": 1.0, "sharpness": 8.0},
        "prompts": [prompt],
        "scores_version": SCORES_VERSION,
    }
    put("runs/eval/metrics.json", json.dumps({"a": result}))
    put("runs/eval/report.html", report_html({"a": {**result, "model": "m", "adapter": ""}}))
    put("runs/eval/v/a.mp4", video)
    for shard in shard_of(tmp_path, [0.5, 2.0], [5, 9]).glob("*.parquet"):
        s3.upload_file(str(shard), "ui-roots", f"data/prep/{shard.name}")
    put("data/prep/summary.json", json.dumps({"clips": 2}))

    runs, data = Roots(["s3://ui-roots/runs"], "ui.runs_roots"), Roots(["s3://ui-roots/data/"], "ui.data_roots")
    assert list_runs(runs) == ["s3://ui-roots/runs/team/ft"] and list_reports(runs) == ["s3://ui-roots/runs/eval"]
    run = RunView.open(runs, "s3://ui-roots/runs/team/ft")
    assert [(m["step"], m["expert"]) for m in run.metrics()] == [(1, "high"), (2, "high")]  # a line cut short waits
    assert run.planned_steps() == 30 and "steps: 30" in run.config()
    assert run.scores() == [{"step": 2, "expert": "high", "clip_score": 0.25}]
    [(expert, step, [(shown, prompt)])] = run.validations()
    assert (expert, step, prompt) == ("high", 2, "a red circle") and Path(_served_copy(shown)).read_bytes() == video
    report = ReportView.open(runs, "s3://ui-roots/runs/eval")
    assert report.means() == [{"model": "a", "source": "m", "motion": 1.0, "sharpness": 8.0}]
    assert report.videos() == [("s3://ui-roots/runs/eval/v/a.mp4", "a · a red circle")]
    assert list_datasets(data) == ["s3://ui-roots/data/prep"]
    prep = DataView.open(data, "s3://ui-roots/data/prep")
    clips, total = prep.clips(0, 10)
    assert total == 2 and [c["motion"] for c in clips] == [0.5, 2.0] and prep.summary() == {"clips": 2}
    assert tuple(prep.latent("clip-1").shape) == (16, 3, 4, 4)
    for path in ("s3://ui-roots/runs/../data/prep", "s3://ui-roots/runsx/ft", "s3://other/runs/team/ft", "/etc"):
        with pytest.raises(RequestError, match="is outside ui.runs_roots"):
            RunView.open(runs, path)
    with pytest.raises(RequestError, match="a percent-encoded path is not read"):
        RunView.open(runs, "s3://ui-roots/runs/%2E%2E/data/prep")
    local = Roots([str(tmp_path / "runs")], "ui.runs_roots")  # a "://" in a local path is a local name
    with pytest.raises(RequestError, match="is outside ui.runs_roots"):
        local.check(f"{tmp_path}/runs/../elsewhere://secret")
    with pytest.raises(FileNotFoundError):  # a video gone from the bucket: an error, and no partial copy left
        _served_copy("s3://ui-roots/runs/team/ft/high/validation/step_9/00.mp4")
    assert not list(Path(_served_copy(shown)).parent.glob("*.part"))


def test_an_export_replaces_only_an_earlier_export_or_nothing(tmp_path, s3):
    """export.py --out (and --to-dcp) replace the directory whole: one holding other files, a bucket's root, or
    the model or run it is made from is refused before anything is read or deleted."""
    from wanray.errors import ConfigError

    model, run = tmp_path / "models" / "base", tmp_path / "runs" / "ft"
    for folder in (model, run, tmp_path / "earlier", tmp_path / "empty", tmp_path / "team"):
        folder.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (tmp_path / "earlier" / "model_index.json").write_text("{}")
    (tmp_path / "team" / "notes.txt").write_text("keep me")
    check = lambda out: storage.check_replaceable(out, "model_index.json", "export", keep=(model, run))
    for fine in ("new", "empty", "earlier"):
        check(tmp_path / fine)
    for out, message in (
        (tmp_path / "team", "holds files and is no earlier export"),
        (tmp_path / "team" / "notes.txt", "is a file"),
        (model, "is, or is inside or holds"),
        (tmp_path / "models", "is, or is inside or holds"),
        (run / "export", "is, or is inside or holds"),
    ):
        with pytest.raises(ConfigError, match=message):
            check(out)
    assert (tmp_path / "team" / "notes.txt").read_text() == "keep me"
    s3.create_bucket(Bucket="exports-guard")
    s3.put_object(Bucket="exports-guard", Key="other-team/model.bin", Body=b"x")
    check("s3://exports-guard/new")
    for out, message in (
        ("s3://exports-guard", "a bucket's root"),
        ("s3://exports-guard/", "a bucket's root"),
        ("s3://exports-guard/other-team", "holds files and is no earlier export"),
    ):
        with pytest.raises(ConfigError, match=message):
            check(out)


def test_a_processs_download_cache_goes_when_it_exits(s3, tmp_path):
    """Each Ray worker that read an object keeps a download cache in the node's temporary directory: it is
    removed when the process exits, not left behind job after job."""
    import subprocess
    import sys

    s3.create_bucket(Bucket="cache-exit")
    s3.put_object(Bucket="cache-exit", Key="v.mp4", Body=b"x" * 1000)
    code = "from wanray import storage\nwith storage.local_copy('s3://cache-exit/v.mp4') as local:\n    print(local)\n"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    local = run.stdout.strip()
    assert local.startswith(str(tmp_path)) and not os.path.exists(os.path.dirname(local))


def test_an_unreachable_store_is_a_one_line_error(capsys):
    """A wrong endpoint, credentials or bucket: pyarrow raises an OSError naming the store's error; a pipeline
    prints its first line and exits 2, not a traceback."""
    import pyarrow.fs as pafs

    from wanray.runtime import fail

    store = pafs.S3FileSystem(
        endpoint_override="127.0.0.1:9", scheme="http", retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1)
    )
    with pytest.raises(OSError) as raised:
        store.get_file_info("raw/corpus/data.jsonl")
    with pytest.raises(SystemExit) as exited, fail("preprocess.py"):
        raise raised.value
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("preprocess.py: error: object storage: ") and "AWS Error" in err
    with pytest.raises(OSError, match="disk full"), fail("preprocess.py"):  # other OSErrors keep their traceback
        raise OSError("disk full")


def test_an_interrupted_directory_upload_leaves_nothing_behind(s3, tmp_path, monkeypatch):
    """pyarrow's S3 stream completes the object it was writing when closed, even on an exception: a Ctrl-C
    in an export's upload left a truncated object under its final key. upload_dir now removes what it wrote."""
    s3.create_bucket(Bucket="upload-stop")
    local = tmp_path / "model"
    for name in ("a.safetensors", "b.safetensors", "model_index.json"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(b"x" * 100)
    uploaded, upload = [], storage.upload_file

    def stopping(path, uri):
        if uploaded:
            raise KeyboardInterrupt
        uploaded.append(uri)
        upload(path, uri)

    monkeypatch.setattr(storage, "upload_file", stopping)
    with pytest.raises(KeyboardInterrupt):
        storage.upload_dir(local, "s3://upload-stop/ft", last="model_index.json")
    assert uploaded == ["s3://upload-stop/ft/a.safetensors"]
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket="upload-stop", Prefix="ft/").get("Contents", [])]
    assert objects in ([], ["ft/"])  # pyarrow may keep the emptied prefix's directory marker
