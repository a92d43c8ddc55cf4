"""Output to an object store (fgds_engine/production/store.py), through the real CLI against a real S3 server
(moto's server mode on 127.0.0.1) and a relay in front of it for the faults: killed twice and resumed on an
empty staging folder, kill -9 mid-upload, the store down mid-run, a missing bucket, denied access, a full
staging disk, and `fgds status` / `fgds train` on the bucket. No verdict depends on timing: waits poll for
objects or events, with the safety net only against a hang."""

import io
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import SAFETY_NET
from test_production import BIG, STEPS, disk_full_after, images, planned, records

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]' installs it)")
pytest.importorskip("moto", reason="moto is not installed (pip install -e '.[test]' installs it)")

from object_store import CREDENTIALS, SECRET, MotoServer, Relay, free_port  # noqa: E402

from fgds_engine.cli import main  # noqa: E402
from fgds_engine.plan import read_plan  # noqa: E402
from fgds_engine.production import ObjectStore  # noqa: E402
from fgds_engine.production.remote import fetch_run, finished_records  # noqa: E402

WDS = ["--format", "webdataset", "--samples-per-shard", "8"]  # 8 jobs a tar: BIG's 65 jobs in 9 tars
BUCKETS = itertools.count()
FAST = ["--upload-retries", "2", "--upload-backoff", "0.01"]


@pytest.fixture(scope="module")
def s3():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3, monkeypatch, request):
    """A fresh bucket on the server; the standard AWS environment set for the CLI (never its options)."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    name = f"b{next(BUCKETS)}-" + re.sub(r"[^a-z0-9]", "-", request.node.name.lower())[:40].strip("-")
    s3.fs().mkdir(name)
    return name


def up(out, url, endpoint, *extra):
    return main(["generate", str(out), "--preset", "tiny-random", "--batch-size", "4", *STEPS, "--upload",
                 url, "--upload-options", json.dumps({"endpoint_url": endpoint}), *FAST, *extra])


def start_up(out, url, endpoint, *extra):
    cmd = [sys.executable, "-m", "fgds_engine.cli", "generate", str(out), "--preset", "tiny-random",
           "--batch-size", "4", *STEPS, "--upload", url, "--upload-options",
           json.dumps({"endpoint_url": endpoint}), *FAST, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CREDENTIALS})


def stored(s3, prefix) -> dict[str, bytes]:
    """The image files (tars or class/job.png) under ``prefix``, read straight from the server."""
    fs = s3.fs()
    return {p[len(prefix) + 1:]: fs.cat_file(p) for p in fs.find(prefix)
            if p.endswith((".tar", ".png"))}


def wait_for(predicate, proc=None):
    t0 = time.monotonic()
    while not predicate():
        assert proc is None or proc.poll() is None, proc.communicate() if proc else None
        assert time.monotonic() - t0 < SAFETY_NET, "no progress"
        time.sleep(0.05)


def tars(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def local_wds(tmp_path_factory):
    """The 65-job plan run locally as WebDataset: the bytes every run to the store must reproduce."""
    tmp = tmp_path_factory.mktemp("local")
    out = planned(tmp, counts=BIG)
    assert main(["generate", str(out), "--preset", "tiny-random", "--batch-size", "4", *STEPS, *WDS]) == 0
    return out


def bucket_records(s3, url, tmp_path) -> list[dict]:
    """Every record of the run's journal as the bucket holds it (fetched into an empty cache)."""
    _, folder = fetch_run(url, tmp_path / "cache", {"endpoint_url": s3.endpoint})
    return records(folder)


def every_job_once(recs, out):
    return sorted(r["job_id"] for r in recs) == sorted(j.job_id for j in read_plan(out).jobs)


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
def test_a_run_to_the_store_equals_a_local_run_and_stages_nothing(tmp_path, s3, bucket, fmt, capsys):
    out, ref = planned(tmp_path, "staging"), planned(tmp_path, "ref")
    extra = WDS if fmt == "webdataset" else []
    assert main(["generate", str(ref), "--preset", "tiny-random", "--batch-size", "4", *STEPS, *extra]) == 0
    url = f"s3://{bucket}/run"
    assert up(out, url, s3.endpoint, *extra) == 0
    want = tars(ref) if fmt == "webdataset" else images(ref)
    assert stored(s3, f"{bucket}/run") == want and len(want) == (3 if fmt == "webdataset" else 20)
    assert not list(out.glob("*.tar")) and not list(out.glob("*/*.png"))  # staging holds no image
    assert every_job_once(records(out), out)
    assert bucket_records(s3, url, tmp_path) == records(out)  # the journal mirrored as it is
    fs = s3.fs()
    assert fs.cat_file(f"{bucket}/run/plan.json") == (out / "plan.json").read_bytes()
    assert json.loads(fs.cat_file(f"{bucket}/run/run.json")) == json.loads((ref / "run.json").read_text())
    said = capsys.readouterr()
    assert up(out, url, s3.endpoint, *extra) == 0  # resumed: nothing left
    again = capsys.readouterr()
    assert "0 image(s) generated, 20 already done" in again.out
    written = [p.read_bytes() for p in out.rglob("*") if p.is_file()] + [
        fs.cat_file(p) for p in fs.find(f"{bucket}/run")]
    assert not any(SECRET.encode() in b for b in written)  # credentials: never written, never said
    assert SECRET not in said.out + said.err + again.out + again.err


def test_killed_twice_then_resumed_on_an_empty_staging_folder_is_byte_identical(tmp_path, s3, bucket,
                                                                                local_wds):
    """The issue's case: a run to the store, kill -9 twice, then resumed on a fresh node (an empty staging
    folder): the tars equal a local run's, and the bucket's manifest holds every job once."""
    out = planned(tmp_path, counts=BIG)
    url, prefix = f"s3://{bucket}/run", f"{bucket}/run"
    relay = Relay(s3.port)
    for n in (2, 5):  # each kill lands while the relay holds tar n+1: mid-run on any machine
        relay.hold(rf"/shard-00000{n}\.tar")
        proc = start_up(out, url, relay.endpoint, *WDS)
        wait_for(relay.held.is_set, proc)
        proc.kill()
        proc.wait()
    assert len(stored(s3, prefix)) == 5  # the second kill landed mid-run
    fresh = tmp_path / "fresh-node"  # nothing but the command: plan, run and journal come from the bucket
    assert up(fresh, url, s3.endpoint, *WDS) == 0
    assert stored(s3, prefix) == tars(local_wds) and len(tars(local_wds)) == 9
    recs = bucket_records(s3, url, tmp_path)
    assert len(recs) == 65 and every_job_once(recs, local_wds)


def test_kill_9_during_an_upload_leaves_no_partial_object_and_resume_completes(tmp_path, s3, bucket,
                                                                              local_wds):
    relay = Relay(s3.port)
    relay.hold(r"/shard-000002\.tar")  # the third tar's upload is cut mid-body
    out = planned(tmp_path, counts=BIG)
    url, prefix = f"s3://{bucket}/run", f"{bucket}/run"
    proc = start_up(out, url, relay.endpoint, *WDS)
    wait_for(relay.held.is_set, proc)  # fails at once if the run ends without the held upload
    proc.kill()
    proc.wait()
    assert sorted(stored(s3, prefix)) == ["shard-000000.tar", "shard-000001.tar"]  # nothing partial visible
    assert len(records(out)) == 16  # the two confirmed tars' jobs; the third's are not recorded
    assert up(out, url, relay.endpoint, *WDS) == 0
    assert stored(s3, prefix) == tars(local_wds)
    recs = bucket_records(s3, url, tmp_path)
    assert len(recs) == 65 and every_job_once(recs, local_wds) and records(out) == recs


def test_the_store_down_mid_run_stops_cleanly_after_bounded_retries_and_resumes(tmp_path, s3, bucket,
                                                                                local_wds, capsys):
    relay = Relay(s3.port)
    relay.down_at(r"/shard-000003\.tar", 1)  # three tars land, then the store goes away
    out = planned(tmp_path, counts=BIG)
    url, prefix = f"s3://{bucket}/run", f"{bucket}/run"
    assert up(out, url, relay.endpoint, *WDS) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"fgds: error: uploading to {url} failed 3 time\(s\), the last: .+; the store is "
                        r"unreachable or refusing: what it confirmed is recorded, resume with the same "
                        r"command once it is back\n", err), err
    assert sorted(stored(s3, prefix)) == [f"shard-00000{i}.tar" for i in range(3)]
    assert len(records(out)) == 24  # exactly the confirmed tars' jobs
    relay.up()
    assert up(out, url, relay.endpoint, *WDS) == 0
    assert stored(s3, prefix) == tars(local_wds)
    recs = bucket_records(s3, url, tmp_path)
    assert len(recs) == 65 and every_job_once(recs, local_wds)


def _denied_server():
    server = MotoServer(auth=True)
    return server, server.endpoint


@pytest.mark.parametrize("case", ["missing bucket", "access denied", "unreachable"])
def test_a_store_that_cannot_be_written_is_one_line_before_any_model_loads(tmp_path, s3, bucket, case,
                                                                          capsys):
    out = planned(tmp_path)
    server = None
    if case == "missing bucket":
        url, endpoint = "s3://no-such-bucket/run", s3.endpoint
        want = (r"writing to s3://no-such-bucket/run: The specified bucket does not exist \(the bucket "
                r"must exist: the engine never creates one\)")
    elif case == "access denied":
        server, endpoint = _denied_server()
        url = f"s3://{bucket}/run"
        want = (rf"writing to {url}: access denied \(.+\); check the credentials in the backend's "
                r"environment and the bucket's policy")
    else:
        relay = Relay(s3.port)
        relay.down()
        url, endpoint = f"s3://{bucket}/run", relay.endpoint
        want = rf"writing to {url} failed 3 time\(s\), the last: .+; the store is unreachable .+"
    try:
        assert up(out, url, endpoint) == 2
    finally:
        if server is not None:
            server.stop()
    captured = capsys.readouterr()
    assert re.fullmatch(rf"fgds: error: {want}\n", captured.err), captured.err
    assert "RANDOM weights" not in captured.out  # refused before the models were built
    assert records(out) == [] and not (out / "run.json").exists()


def test_a_full_staging_disk_is_one_line_and_the_run_resumes(tmp_path, s3, bucket, local_wds, capsys,
                                                            monkeypatch):
    out = planned(tmp_path, counts=BIG)
    url, prefix = f"s3://{bucket}/run", f"{bucket}/run"
    real_replace = disk_full_after(monkeypatch, ".tar", 2)
    assert up(out, url, s3.endpoint, *WDS) == 2
    err = capsys.readouterr().err
    assert err == f"fgds: error: cannot write {out / 'shard-000002.tar'}: No space left on device\n"
    assert sorted(stored(s3, prefix)) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(records(out)) == 16 and not list(out.glob("*.tar")) and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert up(out, url, s3.endpoint, *WDS) == 0
    assert stored(s3, prefix) == tars(local_wds)


def test_a_real_full_staging_disk_is_one_line_and_a_fresh_node_completes(tmp_path, s3, bucket, local_wds):
    """A real ENOSPC: staging is a 40 KiB tmpfs (its own mount namespace, so it vanishes with the process)
    with room for plan.json, run.json and the lease but not for a 30 KiB tar. The plan is in the bucket; the
    node's disk is gone after the failure, and a fresh node completes the run from the bucket alone."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (needs root or user namespaces)")
    planned_out = planned(tmp_path, counts=BIG)
    url = f"s3://{bucket}/run"
    s3.fs().put(str(planned_out / "plan.json"), f"{bucket}/run/plan.json")
    stage = tmp_path / "stage"
    stage.mkdir()
    cli = [sys.executable, "-m", "fgds_engine.cli", "generate", str(stage), "--preset", "tiny-random",
           "--batch-size", "4", *STEPS, "--upload", url, "--upload-options",
           json.dumps({"endpoint_url": s3.endpoint}), *FAST, *WDS]
    script = f'mount -t tmpfs -o size=40k tmpfs "{stage}" && exec "$@"'
    run = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cli],
                         capture_output=True, text=True, env={**os.environ, **CREDENTIALS},
                         timeout=SAFETY_NET)
    assert run.returncode == 2, run.stderr
    assert run.stderr == f"fgds: error: cannot write {stage / 'shard-000000.tar'}: No space left on device\n"
    assert not list(stage.iterdir())  # the tmpfs went with its namespace: this node's disk is lost
    assert stored(s3, f"{bucket}/run") == {}
    assert up(tmp_path / "fresh-node", url, s3.endpoint, *WDS) == 0
    assert stored(s3, f"{bucket}/run") == tars(local_wds)


def test_torchrun_on_a_fresh_node_with_the_plan_in_the_bucket_equals_a_local_run(tmp_path, s3, bucket,
                                                                                  local_wds):
    """The cluster recipe: the plan seeded in the bucket, two ranks on an empty staging folder (they take
    plan.json from the bucket side by side), each with its part; the tars equal a local run's."""
    planned_out = planned(tmp_path, counts=BIG)
    url = f"s3://{bucket}/run"
    s3.fs().put(str(planned_out / "plan.json"), f"{bucket}/run/plan.json")
    stage = tmp_path / "stage"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "fgds_engine.cli",
           "generate", str(stage), "--preset", "tiny-random", "--batch-size", "4", *STEPS, "--upload", url,
           "--upload-options", json.dumps({"endpoint_url": s3.endpoint}), *FAST, *WDS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SAFETY_NET,
                         env={**os.environ, **CREDENTIALS})
    assert res.returncode == 0, res.stderr[-2000:]
    assert stored(s3, f"{bucket}/run") == tars(local_wds)
    assert sorted(s3.fs().ls(f"{bucket}/run/journal")) == [f"{bucket}/run/journal/shard0of1-rank{r}of2"
                                                           for r in range(2)]
    recs = bucket_records(s3, url, tmp_path)
    assert len(recs) == 65 and every_job_once(recs, local_wds)


def test_status_and_train_read_a_run_in_the_bucket(tmp_path, s3, bucket, capsys):
    from test_plan import make_lt_folder

    out = planned(tmp_path)
    url = f"s3://{bucket}/run"
    assert up(out, url, s3.endpoint, *WDS) == 0
    local = capsys.readouterr().out.splitlines()[-6:]  # the status table a local run prints
    opts = ["--store-options", json.dumps({"endpoint_url": s3.endpoint}), "--cache", str(tmp_path / "cache")]
    assert main(["status", url, *opts, "--preview", str(tmp_path / "sheet.png")]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[:6] == local and shown[-1].startswith(f"wrote {tmp_path / 'sheet.png'}")
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (180 + 8 * 64, 4 * 64) and len(sheet.getcolors(1 << 16)) > 100  # images in it
    test = make_lt_folder(tmp_path / "test", {"ant": 2, "bee": 2, "cat": 2, "dog": 2}, seed=2)
    clf = ["--classifier", "timm:test_vit", "--classifier-kwargs",
           '{"img_size": 16, "patch_size": 4, "dynamic_img_size": false}', "--image-size", "16", "--quiet"]
    assert main(["train", "--real", str(tmp_path / "data"), "--synthetic", url, "--test", str(test), "--out",
                 str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", *opts, *clf]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["synthetic"] == 20
    fetched = tmp_path / "cache" / "images"
    with tarfile.open(fileobj=io.BytesIO(s3.fs().cat_file(f"{bucket}/run/shard-000000.tar"))) as t:
        first = t.extractfile("00000_000000.png").read()
    assert (fetched / "ant" / "00000_000000.png").read_bytes() == first
    assert len(finished_records(tmp_path / "cache")) == 20


@pytest.mark.parametrize("argv, message", [
    (["--upload", "bucket/run"], "--upload bucket/run: not a URL (s3://bucket/prefix, gs://..., az://...)"),
    (["--upload", "s3://AKIA:secret@bucket/run"], "--upload s3://...: the URL holds user info "
     "(credentials?); give them through the backend's standard environment instead"),
    (["--upload", "s3://b/run", "--upload-options", '{"client_kwargs": {"aws_secret_access_key": "x"}}'],
     "--upload-options may not hold credentials (aws_secret_access_key): give them through the backend's "
     "standard environment (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role), "
     "never logged or recorded"),
    (["--upload", "s3://b/run", "--upload-options", "[1]"],
     "--upload-options must be a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'"),
    (["--upload-retries", "3"], "--upload-options, --upload-retries and --upload-backoff are for --upload"),
    (["--upload", "s3://b/run", "--new-run"], "--new-run with --upload: start a new run under another prefix "
     "(the store's files of the old run stay where they are)"),
    (["--upload", "nosuchscheme://b/run"], None),
])
def test_bad_store_options_are_one_line(tmp_path, capsys, argv, message):
    out = planned(tmp_path)
    assert main(["generate", str(out), "--preset", "tiny-random", *STEPS, *argv]) == 2
    err = capsys.readouterr().err
    if message is None:
        assert err.startswith("fgds: error: --upload nosuchscheme://b/run: ") and err.count("\n") == 1
    else:
        assert err == f"fgds: error: {message}\n"
    assert records(out) == []


def test_a_url_in_the_wrong_place_is_one_line(tmp_path, capsys, s3, bucket):
    assert main(["generate", "s3://b/run", "--preset", "tiny-random"]) == 2
    assert capsys.readouterr().err == ("fgds: error: OUT is the local folder `fgds plan` wrote (or an empty "
                                       "staging folder); give the store as --upload s3://b/run\n")
    assert main(["status", str(tmp_path), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == ("fgds: error: --store-options and --cache are for a URL as OUT (a run "
                                       "written with --upload)\n")
    url = f"s3://{bucket}/nothing"
    assert main(["status", url, "--store-options", json.dumps({"endpoint_url": s3.endpoint}), "--cache",
                 str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == (f"fgds: error: {url} holds no plan.json: not the --upload URL of a "
                                       "run (fgds generate OUT --upload URL writes it)\n")


# ------------------------------------------------------------------------------------- the journal's chain

def test_the_journal_chain_rebuilds_a_part_and_a_gap_ends_it(tmp_path):
    """In fsspec's memory store: segments chain from offset 0; a segment after a missing one is ignored;
    staging ahead of the store is kept and mirrored from where the store ends."""
    from fgds_engine.production.store import JournalMirror, pull_journal, remote_chains

    store = ObjectStore(f"memory://chain-{os.getpid()}/run")
    a = tmp_path / "a"
    a.mkdir()
    part, manifest, units = "p", a / "manifest-p.jsonl", a / "units-p.bin"
    mirror = JournalMirror(store, a, part)
    for k in range(3):
        with open(manifest, "ab") as f:
            f.write(b'{"n": %d}\n' % k)
        with open(units, "ab") as f:
            f.write(bytes([k]) * 32)
        mirror.sync()
    assert [s[:4] for s in remote_chains(store)[part]] == [(0, 9, 0, 32), (9, 9, 32, 32), (18, 9, 64, 32)]
    b = tmp_path / "b"
    b.mkdir()
    assert pull_journal(store, b) == {part: (27, 96)}
    assert (b / "manifest-p.jsonl").read_bytes() == manifest.read_bytes()
    assert (b / "units-p.bin").read_bytes() == units.read_bytes()
    store.fs.rm_file(store.path(remote_chains(store)[part][1][4]))  # the middle segment lost
    c = tmp_path / "c"
    c.mkdir()
    assert pull_journal(store, c) == {part: (9, 32)}  # only what chains from 0
    assert (c / "manifest-p.jsonl").read_bytes() == b'{"n": 0}\n'
    assert pull_journal(store, a) == {part: (9, 32)} and manifest.stat().st_size == 27  # ahead: kept
    JournalMirror(store, a, part, (9, 32)).sync()  # the rest goes up as one segment
    assert pull_journal(store, c) == {part: (27, 96)}
    assert (c / "manifest-p.jsonl").read_bytes() == manifest.read_bytes()


def test_a_part_another_worker_runs_on_this_node_is_not_written_under_it(tmp_path):
    """torchrun on a fresh node: rank 0's pull must not replace rank 1's journal files while rank 1 holds its
    lease (its append handle would point at a replaced file); once rank 1 is gone, rank 0 brings them up."""
    from fgds_engine.production import PartLease, Worker
    from fgds_engine.production.store import JournalMirror, pull_journal

    store = ObjectStore(f"memory://live-{os.getpid()}/run")
    rank1 = Worker(0, 1, 1, 2)
    src = tmp_path / "src"
    src.mkdir()
    (src / f"manifest-{rank1.part}.jsonl").write_bytes(b'{"n": 1}\n')
    (src / f"units-{rank1.part}.bin").write_bytes(bytes(32))
    JournalMirror(store, src, rank1.part).sync()
    node = tmp_path / "node"
    node.mkdir()
    live = PartLease.acquire(node, rank1)
    assert pull_journal(store, node, Worker(0, 1, 0, 2).part) == {rank1.part: (9, 32)}
    assert not (node / f"manifest-{rank1.part}.jsonl").exists()  # left to its live worker
    live.release()
    pull_journal(store, node, Worker(0, 1, 0, 2).part)
    assert (node / f"manifest-{rank1.part}.jsonl").read_bytes() == b'{"n": 1}\n'
    assert not list(node.glob(".lease-*"))  # the lock taken for the write is gone with it


def test_store_calls_retry_with_doubling_waits_then_stop_in_one_line():
    waits = []
    store = ObjectStore(f"memory://retry-{os.getpid()}/run", retries=3, backoff=0.5, sleep=waits.append)
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionError("connection refused")

    with pytest.raises(Exception) as err:
        store.call("uploading to", flaky)
    assert len(calls) == 4 and waits == [0.5, 1.0, 2.0]
    assert str(err.value) == (f"uploading to memory://retry-{os.getpid()}/run failed 4 time(s), the last: "
                              "connection refused; the store is unreachable or refusing: what it confirmed "
                              "is recorded, resume with the same command once it is back")
    store.retries, store.backoff, waits[:] = 10, 4.0, []
    n = iter(range(100))
    ok = lambda: "done" if next(n) == 9 else (_ for _ in ()).throw(TimeoutError("slow"))  # noqa: E731
    assert store.call("uploading to", ok) == "done"
    assert waits == [4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0]  # doubling, at most 30 s
