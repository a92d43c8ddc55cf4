"""The write path: PNG / JPEG / WebP for both writers, and encoding off the sampling thread (order, bytes,
concurrency, errors)."""

import io
import json
import tarfile
import threading

import numpy as np
import pytest
from conftest import SAFETY_NET
from PIL import Image
from test_production import gen, planned, records, snapshot

from fgds_engine.cli import main
from fgds_engine.plan import read_plan
from fgds_engine.production import GenerateOptions, generate_dataset
from fgds_engine.writers import Encoding


def _image(seed=0, size=32):
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, size * size * 3).reshape(size, size, 3)
    return (base * 0.9 + g.integers(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encoding_is_deterministic_and_decodes(fmt, pil):
    image = _image()
    enc = Encoding(fmt)
    a, b = enc.encode(image), enc.encode(image.copy())
    assert a == b  # the same pixels give the same bytes
    with Image.open(io.BytesIO(a)) as im:
        assert im.format == pil and im.size == (32, 32)
        err = np.abs(np.asarray(im.convert("RGB"), dtype=int) - image).mean()
    assert (err == 0) if fmt == "png" else (0 < err < 4)  # lossless; lossy at quality 95


@pytest.mark.parametrize("fmt,ext", [("jpeg", "jpg"), ("webp", "webp")])
def test_imagefolder_in_another_format_resumes_and_previews(tmp_path, capsys, fmt, ext):
    out = planned(tmp_path)
    assert gen(out, "--image-format", fmt, "--quality", "90") == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.*"))
    assert len(files) == 20 and all(f.endswith(f".{ext}") for f in files)
    assert sorted(r["file"] for r in records(out)) == files
    options = json.loads((out / "run.json").read_text())["config"]["options"]
    assert (options["image_format"], options["quality"], options["write_workers"]) == (fmt, 90, None)
    before = snapshot(out)
    assert gen(out, "--image-format", fmt, "--quality", "90") == 0 and snapshot(out) == before  # all done
    capsys.readouterr()
    assert gen(out, "--image-format", "png") == 2  # another format is another run: refused
    assert "holds a run with another configuration" in capsys.readouterr().err
    assert main(["status", str(out), "--preview", str(tmp_path / "sheet.png")]) == 0
    with Image.open(tmp_path / "sheet.png") as sheet:  # the thumbnails were read back from the JPEG/WebP
        assert np.asarray(sheet.convert("RGB"))[:, 180:].std() > 10


def test_webdataset_members_take_the_formats_extension_and_decode(tmp_path):
    import webdataset as wds

    out = planned(tmp_path)
    assert gen(out, "--format", "webdataset", "--samples-per-shard", "8", "--image-format", "webp") == 0
    tars = sorted(out.glob("shard-*.tar"))
    with tarfile.open(tars[0]) as t:
        assert {n.rsplit(".", 1)[1] for n in t.getnames()} == {"webp", "cls", "json"}
    ds = wds.WebDataset([str(p) for p in tars], shardshuffle=False).decode("pil").to_tuple("webp", "cls")
    samples = list(ds)
    assert len(samples) == 20 and samples[0][0].size == (16, 16)


def test_write_pool_gives_the_same_bytes_as_writing_in_the_loop(tmp_path):
    a, b = planned(tmp_path, "a"), planned(tmp_path, "b")
    assert gen(a, "--write-workers", "0") == 0 and gen(b, "--write-workers", "3") == 0
    assert snapshot(a) == snapshot(b)  # images, manifest (order included) and run.json alike


@pytest.mark.parametrize("flags,message", [
    (["--quality", "80"], "--quality is for --image-format jpeg or webp (PNG is lossless: --png-level)"),
    (["--image-format", "jpeg", "--png-level", "1"], "--png-level is for --image-format png"),
    (["--image-format", "gif"], "image_format must be one of ('png', 'jpeg', 'webp'), got 'gif'"),
    (["--image-format", "jpeg", "--quality", "0"], "quality must be >= 1, got 0"),
])
def test_format_options_that_do_nothing_or_are_out_of_range_are_refused(tmp_path, capsys, flags, message):
    out = planned(tmp_path)
    assert gen(out, *flags) == 2
    assert capsys.readouterr().err == f"fgds: error: {message}\n"


def test_the_next_batch_is_sampled_while_the_last_one_is_encoded(tmp_path, monkeypatch):
    """The encoding of batch 1 waits until the sampling of batch 2 has started: a write path that finished
    encoding a batch before sampling the next never gets there (the wait is bounded by a safety net, and it
    is whether the event came, not when, that decides); everything still arrives in order in the manifest."""
    out = planned(tmp_path, counts={"ant": 9, "bee": 1})  # 9 jobs: batches of 4, 4, 1
    plan = read_plan(out)
    batch, second_sampled, came = {"n": 0}, threading.Event(), []

    def sample_fn(prompts, exemplars, labels, seeds):
        batch["n"] += 1
        if batch["n"] == 2:
            second_sampled.set()
        images = np.stack([_image(s, 16) for s in seeds])
        images[:, 0, 0, 0] = batch["n"]  # which batch an image came from, for the encoder
        return images, [0.0] * len(seeds), [False] * len(seeds)

    real = Encoding.encode

    def waiting(self, image):
        if image[0, 0, 0] == 1:
            came.append(second_sampled.wait(timeout=SAFETY_NET))
        return real(self, image)

    monkeypatch.setattr(Encoding, "encode", waiting)
    opts = GenerateOptions(batch_size=4, write_workers=2)
    report = generate_dataset(plan, out, sample_fn, opts, {"test": 1}, progress=False, log=lambda *a: None)
    assert report.generated == 9
    assert came == [True] * 4  # batch 1 was still being encoded when batch 2's sampling began
    assert [r["job_id"] for r in records(out)] == [j.job_id for j in plan.jobs]


def test_an_encoding_error_stops_the_run_with_only_finished_batches_recorded(tmp_path, monkeypatch):
    out = planned(tmp_path, counts={"ant": 13, "bee": 1})  # 13 jobs: batches of 4, 4, 4, 1
    plan = read_plan(out)
    calls = {"n": 0}
    real = Encoding.encode

    def failing(self, image):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(28, "No space left on device")
        return real(self, image)

    monkeypatch.setattr(Encoding, "encode", failing)

    def sample_fn(prompts, exemplars, labels, seeds):
        return np.stack([_image(s, 16) for s in seeds]), [0.0] * len(seeds), [False] * len(seeds)

    with pytest.raises(OSError, match="No space left on device"):
        generate_dataset(plan, out, sample_fn, GenerateOptions(batch_size=4), {"t": 1}, progress=False)
    assert len(records(out)) == 4  # the first batch only: the second failed inside, the third not recorded
    monkeypatch.setattr(Encoding, "encode", real)
    generate_dataset(plan, out, sample_fn, GenerateOptions(batch_size=4), {"t": 1}, progress=False)
    assert sorted(r["job_id"] for r in records(out)) == sorted(j.job_id for j in plan.jobs)
