"""`fgds plan / generate / status` with --preset tiny-random on a generated long-tailed ImageFolder:
resume after SIGKILL, SIGTERM, shards, torchrun, WebDataset, retries, bad input, security."""

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAFETY_NET
from PIL import Image
from test_plan import make_lt_folder

from fgds_engine.cli import main
from fgds_engine.plan import derive_seed, read_plan
from fgds_engine.production import UNIT_RECORD, GenerateOptions, generate_dataset, status

STEPS = ["--num-inference-steps", "3", "--threads", "1", "--quiet"]
BIG = {"ant": 24, "bee": 5, "cat": 2, "dog": 1}  # 65 jobs


def planned(tmp_path, name="out", counts=None):
    data = tmp_path / "data"
    if not data.exists():
        make_lt_folder(data, counts or {"ant": 9, "bee": 5, "cat": 2, "dog": 1})
    out = tmp_path / name
    assert main(["plan", str(data), str(out), "--quiet"]) == 0
    return out


def gen(out, *extra):
    return main(["generate", str(out), "--preset", "tiny-random", "--batch-size", "4", *STEPS, *extra])


def images(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).glob("*/*.png"))}


def records(out) -> list[dict]:
    return [json.loads(line) for p in sorted(Path(out).glob("manifest-*.jsonl"))
            for line in p.read_text().splitlines()]


def drop_second_half(out) -> int:
    """Drop the second half of the first manifest part and its images (a crash after half the run); returns
    how many records were dropped."""
    part = sorted(Path(out).glob("manifest-*.jsonl"))[0]
    lines = part.read_text().splitlines(keepends=True)
    for line in lines[len(lines) // 2:]:
        (Path(out) / json.loads(line)["file"]).unlink()
    part.write_text("".join(lines[:len(lines) // 2]))
    units = Path(out) / part.name.replace("manifest-", "units-").replace(".jsonl", ".bin")
    recs = np.frombuffer(units.read_bytes(), dtype=UNIT_RECORD)  # unit records follow their manifest records
    units.write_bytes(recs[recs["end"] <= part.stat().st_size].tobytes())
    return len(lines) - len(lines) // 2


def snapshot(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the 65-job plan: the bytes every other way of running must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    out = planned(tmp, counts=BIG)
    assert gen(out) == 0
    return tmp, out


def test_generate_imagefolder_manifest_status_and_rerun(tmp_path, capsys):
    out = planned(tmp_path)
    assert gen(out) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "20 image(s) generated, 0 already done, 0 failed" in text
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(out))
    assert ds.classes == ["ant", "bee", "cat", "dog"] and len(ds) == 20
    assert ds[0][0].size == (16, 16)
    recs = records(out)
    assert sorted(r["job_id"] for r in recs) == sorted(j.job_id for j in read_plan(out).jobs)
    assert set(recs[0]) == {"job_id", "class", "class_index", "seed", "seed_used", "exemplar", "criterion",
                            "nan", "retries", "config_hash", "file"}
    before = snapshot(out)
    assert gen(out) == 0  # resume is the default: nothing left to do
    assert "0 image(s) generated, 20 already done" in capsys.readouterr().out
    assert snapshot(out) == before
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["total", "20", "20", "0", "0"]


def _start(out, *extra):
    cmd = [sys.executable, "-m", "fgds_engine.cli", "generate", str(out), "--preset", "tiny-random",
           "--batch-size", "4", *STEPS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(out, n, proc, timeout=SAFETY_NET):
    """Poll until ``n`` records are in; ``timeout`` is a safety net for a run that hangs."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(records(out)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


def test_sigkill_then_resume_is_byte_identical_to_an_uninterrupted_run(tmp_path, reference):
    _, ref = reference
    out = planned(tmp_path, counts=BIG)
    proc = _start(out)
    _wait_for_records(out, 8, proc)
    proc.kill()
    proc.wait()
    killed_at = len(records(out))
    assert 8 <= killed_at < 65, "the kill must land mid-run"
    assert gen(out) == 0
    recs = records(out)
    assert sorted(r["job_id"] for r in recs) == sorted(j.job_id for j in read_plan(out).jobs)  # none twice
    got, want = images(out), images(ref)
    assert got.keys() == want.keys() and len(got) == 65
    for name in got:
        with Image.open(out / name) as im:
            im.load()
        assert got[name] == want[name], name
    assert not list(out.rglob("*.tmp"))


def test_sigterm_finishes_the_batch_flushes_and_says_how_to_resume(tmp_path):
    out = planned(tmp_path, counts=BIG)
    proc = _start(out)
    _wait_for_records(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=SAFETY_NET)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after finishing its batch; the manifest is flushed. Resume with the same " \
           "command" in err
    n = len(records(out))
    assert n % 4 == 0 and n < 65 and len(images(out)) == n  # whole batches, each recorded with its image


def test_shards_together_equal_the_unsharded_run(tmp_path, reference):
    _, ref = reference
    out = planned(tmp_path, counts=BIG)
    assert gen(out, "--shard", "0/2") == 0
    assert 0 < len(images(out)) < 65
    assert gen(out, "--shard", "1/2") == 0
    assert images(out) == images(ref)


def test_torchrun_two_processes_equal_one(tmp_path, reference):
    _, ref = reference
    out = planned(tmp_path, counts=BIG)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=29517", "-m", "fgds_engine.cli", "generate",
           str(out), "--preset", "tiny-random", "--batch-size", "4", *STEPS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SAFETY_NET)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in out.glob("manifest-*")) == ["manifest-shard0of1-rank0of2.jsonl",
                                                             "manifest-shard0of1-rank1of2.jsonl"]
    assert images(out) == images(ref)


def _tar_contents(folder):
    out = {}
    for p in sorted(Path(folder).glob("shard-*.tar")):
        with tarfile.open(p) as t:
            for m in t.getmembers():
                out[m.name] = t.extractfile(m).read()
    return out


def test_webdataset_shards_equal_unsharded(tmp_path):
    a, b = planned(tmp_path, "a"), planned(tmp_path, "b")
    wds = ["--format", "webdataset", "--samples-per-shard", "8"]
    assert gen(a, *wds) == 0
    assert gen(b, *wds, "--shard", "1/2") == 0 and gen(b, *wds, "--shard", "0/2") == 0
    assert sorted(p.name for p in a.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    ca, cb = _tar_contents(a), _tar_contents(b)
    assert ca == cb and len([k for k in ca if k.endswith(".png")]) == 20
    tars = lambda folder: {p.name: p.read_bytes() for p in folder.glob("*.tar")}  # noqa: E731
    assert tars(a) == tars(b)  # mtime 0: even the tar bytes are equal
    import webdataset

    sample = next(iter(webdataset.WebDataset(str(a / "shard-000000.tar"), shardshuffle=False)))
    assert sample["__key__"] == "00000_000000" and int(sample["cls"]) == 0


def test_nan_samples_are_retried_with_derived_seeds_and_failures_recorded(tmp_path):
    out = planned(tmp_path)
    plan = read_plan(out)
    flaky, broken = plan.jobs[2], plan.jobs[5]

    def sample_fn(prompts, exemplars, labels, seeds):
        bad = {flaky.seed, broken.seed, *(derive_seed(broken.seed, f"retry:{k}") for k in (1, 2))}
        nan = [s in bad for s in seeds]
        imgs = torch.zeros(len(seeds), 4, 4, 3, dtype=torch.uint8).numpy()
        return imgs, [0.5] * len(seeds), nan

    report = generate_dataset(plan, out, sample_fn, GenerateOptions(batch_size=4, max_retries=2), {"m": 1},
                              progress=False)
    assert (report.generated, report.failed, report.retries) == (19, 1, 3)
    recs = {r["job_id"]: r for r in records(out)}
    assert recs[flaky.job_id]["retries"] == 1 and not recs[flaky.job_id]["nan"]
    assert recs[flaky.job_id]["seed_used"] == derive_seed(flaky.seed, "retry:1")
    assert recs[broken.job_id]["nan"] and recs[broken.job_id]["criterion"] is None
    assert not (out / broken.class_name / f"{broken.job_id}.png").exists()
    assert sum(row["failed"] for row in status(plan, out).values()) == 1


def test_config_mismatch_on_resume_refuses_and_changes_nothing(tmp_path, capsys):
    out = planned(tmp_path)
    assert gen(out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["generate", str(out), "--preset", "tiny-random", "--batch-size", "4",
                 "--num-inference-steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fgds: error: {out} holds a run with another configuration") and "\n" not in err
    assert "pass --new-run" in err and snapshot(out) == before
    assert gen(out, "--num-inference-steps", "4", "--new-run") == 0  # archives the old manifest, reruns
    assert len([p for p in out.iterdir() if p.name.startswith("previous-")]) == 3  # run, manifest, units


def disk_full_after(monkeypatch, suffix: str, n: int):
    """Renames into place of files ending in ``suffix`` fail with ENOSPC after the first ``n`` (a disk that
    fills mid-run); returns the real ``os.replace``, to put back."""
    real_replace, calls = os.replace, [0]

    def replace(src, dst):
        if str(dst).endswith(suffix):
            calls[0] += 1
            if calls[0] > n:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return real_replace


def test_full_disk_mid_run_keeps_what_was_written_and_resumes(tmp_path, capsys, monkeypatch, reference):
    _, ref = reference
    out = planned(tmp_path, counts=BIG)
    real_replace = disk_full_after(monkeypatch, ".png", 10)
    assert gen(out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fgds: error: cannot write ") and err.endswith(".png: No space left on device")
    kept = images(out)
    assert len(kept) == 10 and all(kept[k] == images(ref)[k] for k in kept)
    assert not list(out.rglob("*.tmp"))
    # the manifest holds exactly the durable batches (2 x 4): the third batch's two images have no record
    recorded = [r["file"] for r in records(out)]
    assert len(recorded) == 8 and set(recorded) < set(kept)
    monkeypatch.setattr(os, "replace", real_replace)
    assert gen(out) == 0 and images(out) == images(ref)


def test_read_only_output_fails_before_writing(tmp_path, capsys, monkeypatch):
    out = planned(tmp_path)
    before = snapshot(out)

    def replace(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", replace)
    assert gen(out) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fgds: error: cannot write {out / '.write-test.w0of1'}: Read-only file system"
    assert snapshot(out) == before


def tiny_vit_checkpoint(path, num_classes):
    from fgds_engine.models import tiny_classifier

    state = tiny_classifier(num_classes).state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return ["--classifier", "timm:test_vit", "--classifier-checkpoint", str(path),
            "--classifier-kwargs", '{"img_size": 16, "patch_size": 4, "dynamic_img_size": false}']


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


@pytest.mark.parametrize("case", ["classes", "hardness", "pickle", "no-models", "corrupt-plan-data"])
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    out = planned(tmp_path)
    capsys.readouterr()
    if case == "classes":
        args = tiny_vit_checkpoint(tmp_path / "clf.pt", 3)
        message = f"the classifier checkpoint {tmp_path / 'clf.pt'} has 3 classes but the data has 4"
    elif case == "hardness":
        args = ["--criterion", "hardness"]
        message = "criterion 'hardness' needs --stats: GaussianClassStats fitted on the real data's"
    elif case == "pickle":
        _Evil.marker = tmp_path / "pwned"
        torch.save({"state_dict": _Evil()}, tmp_path / "evil.pt")
        args = ["--classifier", "timm:test_vit", "--classifier-checkpoint", str(tmp_path / "evil.pt")]
        message = f"refusing to load {tmp_path / 'evil.pt'}: it is a pickle that would run code"
    elif case == "no-models":
        code = main(["generate", str(out), *STEPS])
        assert code == 2
        assert capsys.readouterr().err.strip() == ("fgds: error: no models: pass --pipeline FOLDER_OR_HUB_ID "
                                                   "(with --classifier ...) or --preset tiny-random")
        return
    else:
        shutil.rmtree(tmp_path / "nothing", ignore_errors=True)
        assert main(["plan", str(tmp_path / "nothing"), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fgds: error: data folder {tmp_path / 'nothing'} does not exist"
        return
    before = snapshot(out)
    assert gen(out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fgds: error: {message}") and "\n" not in err
    assert snapshot(out) == before
    if case == "pickle":
        assert not (tmp_path / "pwned").exists(), "the pickle's code ran"


def test_matching_classifier_checkpoint_runs(tmp_path):
    out = planned(tmp_path)
    assert gen(out, *tiny_vit_checkpoint(tmp_path / "clf.safetensors", 4)) == 0
    assert len(images(out)) == 20


def test_toml_config_and_flag_precedence(tmp_path, capsys):
    out = planned(tmp_path)
    (tmp_path / "run.toml").write_text('[sampler]\nnum_inference_steps = 2\ncriterion = "loss"\n'
                                       '[generate]\nbatch_size = 8\n[models]\npreset = "tiny-random"\n')
    assert main(["generate", str(out), "--config", str(tmp_path / "run.toml"), "--batch-size", "4",
                 "--quiet"]) == 0
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["sampler"]["num_inference_steps"] == 2 and cfg["sampler"]["criterion"] == "loss"
    assert cfg["options"]["batch_size"] == 4 and cfg["models"]["preset"] == "tiny-random"
    (tmp_path / "bad.toml").write_text("[sampler]\nsteps = 2\n")
    capsys.readouterr()
    assert main(["generate", str(out), "--config", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fgds: error: unknown option(s) in [sampler] of the config file: steps"


def test_generate_help_documents_every_option_with_its_default(capsys):
    import dataclasses

    from fgds_engine.config import ModelOptions
    from fgds_engine.sampler import SamplerConfig

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in (SamplerConfig, GenerateOptions, ModelOptions):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text, f.name
    for shown in ("PixArt-Sigma / Sana 20: docs/schedulers.md) [default: 30]",
                  "(default: the pipeline's own) [default: None]",
                  "samples per sampler call, or auto (the largest that fits the GPU's memory) [default: 8]",
                  "loss | entropy | hardness (needs --stats) |",  # argparse may wrap at the next hyphen
                  "repulsion (batch-level) [default: entropy]",
                  "[default: imagefolder]"):
        assert shown in text


def test_open_clip_image_embedder_replaces_the_pipeline_image_encoder(tmp_path):
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS["fgds-tiny-clip6"] = {  # image embedding width 6 = the tiny unCLIP pipeline's
        "embed_dim": 6,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    torch.save(open_clip.create_model("fgds-tiny-clip6").state_dict(), tmp_path / "clip.pt")
    a, b = planned(tmp_path, "a"), planned(tmp_path, "b")
    assert gen(a, "--embedding-dropout", "0") == 0
    assert gen(b, "--embedding-dropout", "0", "--image-embedder", "open_clip:fgds-tiny-clip6",
               "--image-embedder-checkpoint", str(tmp_path / "clip.pt")) == 0
    ia, ib = images(a), images(b)
    assert ia.keys() == ib.keys() and len(ib) == 20
    assert all(ia[k] != ib[k] for k in ia)  # other embeddings (none dropped), other images
    cfg = json.loads((b / "run.json").read_text())["config"]["models"]
    assert cfg["image_embedder"] == "open_clip:fgds-tiny-clip6"


@pytest.mark.parametrize("backend,message", [
    ("triton", "backend 'triton' needs a CUDA device (this one is cpu), or TRITON_INTERPRET=1 set before "
               "triton is imported; use backend 'auto' or 'torch'"),
    ("cuda", "backend 'cuda' needs a CUDA device (this one is cpu); use 'auto' or 'torch'"),
])
def test_unavailable_backend_is_a_one_line_error(tmp_path, capsys, monkeypatch, backend, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = planned(tmp_path)
    capsys.readouterr()
    assert gen(out, "--backend", backend) == 2
    assert capsys.readouterr().err.strip() == f"fgds: error: {message}"


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_status_preview_contact_sheet(tmp_path, capsys, fmt):
    """A row per class with its first samples (scaled, in job order) and a label; empty cells stay dark."""
    out = planned(tmp_path)
    extra = ["--format", "webdataset", "--samples-per-shard", "8"] if fmt == "webdataset" else []
    assert gen(out, *extra) == 0
    capsys.readouterr()
    sheet = tmp_path / "sheet.png"
    assert main(["status", str(out), "--preview", str(sheet), "--per-class", "3"]) == 0
    assert f"wrote {sheet} (372x256: up to 3 samples per class)" in capsys.readouterr().out
    plan = read_plan(out)
    with Image.open(sheet) as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape == (4 * 64, 180 + 3 * 64, 3)
    records = {json.loads(line)["job_id"]: json.loads(line) for p in out.glob("manifest-*.jsonl")
               for line in p.read_text().splitlines()}
    for row, c in enumerate(plan.classes):
        jobs = [j for j in plan.jobs if j.class_name == c][:3]
        for col in range(3):
            cell = grid[row * 64:(row + 1) * 64, 180 + col * 64:180 + (col + 1) * 64]
            if col >= len(jobs):
                assert (cell == 24).all()  # "ant" has one synthetic image: two empty cells
                continue
            if fmt == "imagefolder":
                src = Image.open(out / records[jobs[col].job_id]["file"])
            else:
                with tarfile.open(out / records[jobs[col].job_id]["file"]) as t:
                    src = Image.open(io.BytesIO(t.extractfile(f"{jobs[col].job_id}.png").read()))
            want = np.asarray(src.convert("RGB").resize((64, 64), Image.NEAREST))
            assert np.array_equal(cell, want)
        label = grid[row * 64:(row + 1) * 64, :180]
        assert (label > 100).sum() > 50  # the label's text is drawn


def test_generate_with_another_scheduler_records_it_resumes_and_refuses_a_switch(tmp_path, capsys):
    out = planned(tmp_path)
    assert gen(out, "--scheduler", "dpmpp-2m") == 0
    capsys.readouterr()
    run = json.loads((out / "run.json").read_text())["config"]
    assert run["sampler"]["scheduler"] == "dpmpp-2m"
    assert run["scheduler"]["name"].startswith("DPMSolverMultistepScheduler(algorithm_type=dpmsolver++, "
                                               "solver_order=2, use_karras_sigmas=False")
    assert not [k for k in run["scheduler"]["config"] if k.startswith("_")]  # no per-process bookkeeping
    assert run["scheduler"]["config"]["algorithm_type"] == "dpmsolver++"
    assert run["scheduler"]["feedback_mode"] == "score"
    whole = images(out)
    dropped = drop_second_half(out)  # the resumed run regenerates the same bytes
    assert gen(out, "--scheduler", "dpmpp-2m") == 0
    assert f"{dropped} image(s) generated" in capsys.readouterr().out
    assert images(out) == whole
    # another scheduler on the same folder is refused in one line, nothing changed
    before = snapshot(out)
    assert gen(out, "--scheduler", "euler") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fgds: error: {out} holds a run with another configuration") and "\n" not in err
    assert snapshot(out) == before


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "dpm-3000"],
     "fgds: error: unknown scheduler 'dpm-3000'; use one of ddim, ddpm, pndm, lms, euler, euler-a, heun, "
     "dpmpp-2m, dpmpp-2m-karras, dpmpp-2m-sde, unipc, deis, flow-euler, flow-dpmpp-2m or a diffusers "
     "scheduler class name (e.g. DPMSolverMultistepScheduler)"),
    (["--scheduler", "unipc", "--feedback-mode", "shift"],
     "fgds: error: feedback_mode 'shift' is not defined for UniPCMultistepScheduler: a multistep solver's "
     "history holds outputs of the states before the shift; use feedback_mode 'score' (or 'auto')"),
])
def test_scheduler_errors_are_one_line(tmp_path, capsys, flags, message):
    out = planned(tmp_path)
    assert gen(out, *flags) == 2
    assert capsys.readouterr().err.strip() == message
