"""Models by hub id as well as by folder (offline: a temporary Hugging Face cache laid out as the hub does),
and the option combinations that would do nothing: each one line, exit status 2, the output untouched."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAFETY_NET
from test_production import STEPS, drop_second_half, gen, planned, snapshot, tiny_vit_checkpoint

from fgds_engine.cli import main
from fgds_engine.models import tiny_classifier, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
VIT = ["--classifier", "timm:test_vit", "--classifier-kwargs",
       '{"img_size": 16, "patch_size": 4, "dynamic_img_size": false}']


def lay_into_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> None:
    """The files of ``folder`` as the hub's cache holds a downloaded snapshot of ``repo_id``."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / SHA)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny random text-to-image pipeline saved as a folder (what save_pretrained writes)."""
    folder = tmp_path_factory.mktemp("pipes") / "tiny-sd"
    tiny_pipeline("sd", seed=0).save_pretrained(folder)
    return folder


def _offline_env(hf_home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_pipeline_by_folder_prints_only_our_lines(tmp_path, sd_folder):
    """A saved pipeline loads from its folder, and loading says nothing a user must learn to ignore (no
    "accelerate was not found" paragraph): stderr is empty with --quiet."""
    out = planned(tmp_path)
    res = subprocess.run([sys.executable, "-m", "fgds_engine.cli", "generate", str(out), "--pipeline",
                          str(sd_folder), *VIT, "--batch-size", "4", *STEPS], capture_output=True, text=True,
                         timeout=SAFETY_NET, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr == ""
    assert res.stdout.splitlines()[0].startswith("worker 0/1: 20 image(s) generated")
    assert len(list(out.glob("*/*.png"))) == 20


def test_pipeline_by_hub_id_from_an_offline_cache(tmp_path, sd_folder):
    hf_home = tmp_path / "hf"
    lay_into_hub_cache(hf_home, "fgds-test/tiny-sd", sd_folder)
    out = planned(tmp_path)
    vit = tiny_vit_checkpoint(tmp_path / "clf.safetensors", 4)  # the same classifier in both processes
    cmd = [sys.executable, "-m", "fgds_engine.cli", "generate", str(out), *vit, "--batch-size", "4", *STEPS]
    res = subprocess.run([*cmd, "--pipeline", "fgds-test/tiny-sd"], capture_output=True, text=True,
                         timeout=SAFETY_NET, env=_offline_env(hf_home))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(out.glob("*/*.png"))) == 20
    # the same images as from the folder: the hub id resolved to the same pipeline
    by_folder = planned(tmp_path, name="by-folder")
    assert main(["generate", str(by_folder), "--pipeline", str(sd_folder), *vit, "--batch-size", "4",
                 *STEPS]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*/*.png")} == \
        {p.name: p.read_bytes() for p in by_folder.glob("*/*.png")}
    missing = planned(tmp_path, name="missing")
    before = snapshot(missing)
    res = subprocess.run([*cmd[:4], str(missing), *cmd[5:], "--pipeline", "fgds-test/not-cached"],
                         capture_output=True, text=True, timeout=SAFETY_NET, env=_offline_env(hf_home))
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("fgds: error: cannot load pipeline fgds-test/not-cached: ") and "\n" not in err
    assert snapshot(missing) == before


def test_timm_pretrained_weights_through_timms_own_loader(tmp_path):
    """--pretrained: timm fetches its pretrained file through the hub cache (here an offline one)."""
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("test_resnet", pretrained=False)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights / "model.safetensors"))
    hf_home = tmp_path / "hf"
    lay_into_hub_cache(hf_home, "timm/test_resnet.r160_in1k", weights)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    code = (
        "import torch\nfrom fgds_engine.models import load_timm_classifier\n"
        "m = load_timm_classifier('test_resnet', num_classes=4, pretrained=True)\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "sd = m.state_dict()\n"
        "same = [k for k in ref if k in sd and sd[k].shape == ref[k].shape and torch.equal(sd[k], ref[k])]\n"
        "print(len(same), len(sd), m.get_classifier().out_features)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SAFETY_NET,
                         env=_offline_env(hf_home))
    assert res.returncode == 0, res.stderr[-2000:]
    same, total, classes = map(int, res.stdout.split())
    assert classes == 4 and same == total - 2  # every weight but the new 4-class head (weight, bias)


BAD = {
    "empty-pipeline-folder": (
        lambda t: ["--pipeline", str(t / "empty"), *VIT],
        "pipeline folder {t}/empty holds no diffusers pipeline (model_index.json missing)"),
    "not-an-id": (lambda t: ["--pipeline", "not a repo!", *VIT],
                  "pipeline 'not a repo!' is neither a folder nor a hub id (org/name)"),
    "checkpoint-without-classifier": (
        lambda t: ["--preset", "tiny-random", "--classifier-checkpoint", str(t / "clf.pt")],
        "--classifier-checkpoint needs --classifier timm:<arch> or torchvision:<arch> (the tiny-random "
        "preset's own classifier has random weights)"),
    "pretrained-without-classifier": (lambda t: ["--preset", "tiny-random", "--pretrained"],
                                      "--pretrained needs --classifier timm:<arch> or torchvision:<arch>"),
    "embedder-checkpoint-without-embedder": (
        lambda t: ["--preset", "tiny-random", "--image-embedder-checkpoint", "x.pt"],
        "--image-embedder-checkpoint needs --image-embedder open_clip:<arch>"),
    "stats-without-hardness": (
        lambda t: ["--preset", "tiny-random", "--stats", "s.pt"],
        "--stats is used by --criterion hardness only (this run's criterion is entropy"),
    "shards-for-imagefolder": (
        lambda t: ["--preset", "tiny-random", "--samples-per-shard", "8"],
        "--samples-per-shard is for --format webdataset (an ImageFolder has no shards)"),
    "noise-level-without-unclip": (lambda t: ["--pipeline", str(t / "sd"), *VIT, "--noise-level", "5"],
                                   "--noise-level is for unCLIP pipelines; StableDiffusionPipeline takes no "
                                   "image embeddings"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_options_that_would_do_nothing_are_one_line_errors(tmp_path, capsys, sd_folder, case):
    (tmp_path / "empty").mkdir()
    shutil.copytree(sd_folder, tmp_path / "sd")
    torch.save(tiny_classifier(4).state_dict(), tmp_path / "clf.pt")
    out = planned(tmp_path)
    args, message = BAD[case]
    before = snapshot(out)
    capsys.readouterr()
    assert main(["generate", str(out), *STEPS, *args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fgds: error: " + message.format(t=tmp_path)) and "\n" not in err, err
    assert snapshot(out) == before


def test_no_models_names_both_ways(tmp_path, capsys):
    out = planned(tmp_path)
    capsys.readouterr()
    assert gen(out, "--preset", "tiny-random", "--pipeline", "x/y") == 2
    assert capsys.readouterr().err.strip() == "fgds: error: give either --preset or --pipeline, not both"
    json.loads((out / "plan.json").read_text())  # the plan is untouched and readable


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline saved as a folder."""
    folder = tmp_path_factory.mktemp("pipes") / "tiny-sdxl"
    tiny_pipeline("sdxl", seed=0).save_pretrained(folder)
    return folder


def test_sdxl_pipeline_by_hub_id_plan_generate_resume_preview(tmp_path, sdxl_folder, capsys):
    """`fgds generate --pipeline <SDXL hub id>` end to end, offline: the same images as from its folder, a
    resumed run regenerates the dropped half byte for byte, and the preview sheet is drawn."""
    hf_home = tmp_path / "hf"
    lay_into_hub_cache(hf_home, "fgds-test/tiny-sdxl", sdxl_folder)
    out = planned(tmp_path)
    vit = tiny_vit_checkpoint(tmp_path / "clf.safetensors", 4)
    cmd = [sys.executable, "-m", "fgds_engine.cli", "generate", str(out), *vit, "--batch-size", "4", *STEPS,
           "--pipeline", "fgds-test/tiny-sdxl"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SAFETY_NET, env=_offline_env(hf_home))
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())["config"]
    assert run["scheduler"]["name"].startswith("EulerDiscreteScheduler")  # the pipeline's own
    whole = {p.name: p.read_bytes() for p in out.glob("*/*.png")}
    assert len(whole) == 20
    by_folder = planned(tmp_path, name="by-folder")
    assert main(["generate", str(by_folder), "--pipeline", str(sdxl_folder), *vit, "--batch-size", "4",
                 *STEPS]) == 0
    assert {p.name: p.read_bytes() for p in by_folder.glob("*/*.png")} == whole
    dropped = drop_second_half(by_folder)  # resume after a crash at half the run
    capsys.readouterr()
    assert main(["generate", str(by_folder), "--pipeline", str(sdxl_folder), *vit, "--batch-size", "4",
                 *STEPS]) == 0
    assert f"{dropped} image(s) generated" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in by_folder.glob("*/*.png")} == whole
    sheet = tmp_path / "sheet.png"
    assert main(["status", str(by_folder), "--preview", str(sheet), "--per-class", "2"]) == 0
    assert f"wrote {sheet}" in capsys.readouterr().out and sheet.stat().st_size > 0


FLOW_CLI = {  # tiny kind -> its generate options (Flux's pipeline defaults to 1024 px; Sana's tiny is 32 px)
    "sd3": [], "flux-dev": ["--image-size", "16"], "pixart": [], "sana": ["--classifier-size", "16"]}
FLOW_RUN = {"sd3": ("SD3", "FlowMatchEulerDiscreteScheduler", "flow"),
            "flux-dev": ("Flux", "FlowMatchEulerDiscreteScheduler", "flow"),
            "pixart": ("PixArt-Sigma", "DPMSolverMultistepScheduler", "epsilon"),
            "sana": ("Sana", "DPMSolverMultistepScheduler", "flow")}


@pytest.fixture(scope="module")
def flow_hub_runs(tmp_path_factory):
    """Each transformer family saved as a folder and laid into an offline hub cache, then generated by hub id
    in one fresh process (one `fgds generate` per family, as a user would type them): kind -> (folder, the
    run's folder, its classifier arguments)."""
    from fgds_engine.models import tiny_flow_pipeline

    root = tmp_path_factory.mktemp("flow-hub")
    hf_home, runs, calls = root / "hf", {}, []
    vit = tiny_vit_checkpoint(root / "clf.safetensors", 4)  # the same classifier in both processes
    for kind in FLOW_CLI:
        folder = root / f"tiny-{kind}"
        tiny_flow_pipeline(kind).save_pretrained(folder)
        lay_into_hub_cache(hf_home, f"fgds-test/tiny-{kind}", folder)
        out = planned(root, name=f"out-{kind}")
        runs[kind] = (folder, out, vit)
        calls.append(["generate", str(out), *vit, "--batch-size", "4", *STEPS, *FLOW_CLI[kind], "--pipeline",
                      f"fgds-test/tiny-{kind}"])
    script = ("import json, sys; from fgds_engine.cli import main; "
              "sys.exit(max(main(a) for a in json.loads(sys.argv[1])))")
    res = subprocess.run([sys.executable, "-c", script, json.dumps(calls)], capture_output=True, text=True,
                         timeout=SAFETY_NET, env=_offline_env(hf_home))
    assert res.returncode == 0, res.stderr[-2000:]
    return runs


@pytest.mark.parametrize("kind", list(FLOW_CLI))
def test_transformer_family_by_hub_id_folder_resume(flow_hub_runs, tmp_path, capsys, kind):
    """`fgds generate --pipeline` for each transformer family: from an offline hub cache in a fresh process,
    the same bytes from its folder in this one, a resumed run regenerates the dropped half byte for byte, and
    run.json records the family, scheduler and prediction type."""
    folder, out, vit = flow_hub_runs[kind]
    run = json.loads((out / "run.json").read_text())["config"]
    family, scheduler, prediction = FLOW_RUN[kind]
    assert run["denoiser"] == {"family": family, "prediction_type": prediction}
    assert run["scheduler"]["name"].startswith(scheduler)
    whole = {p.name: p.read_bytes() for p in out.glob("*/*.png")}
    assert len(whole) == 20
    by_folder = planned(tmp_path, name="by-folder")
    cmd = ["generate", str(by_folder), "--pipeline", str(folder), *vit, "--batch-size", "4", *STEPS,
           *FLOW_CLI[kind]]
    assert main(cmd) == 0
    assert {p.name: p.read_bytes() for p in by_folder.glob("*/*.png")} == whole
    dropped = drop_second_half(by_folder)
    capsys.readouterr()
    assert main(cmd) == 0
    assert f"{dropped} image(s) generated" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in by_folder.glob("*/*.png")} == whole


def test_a_ddpm_scheduler_name_on_a_flow_pipeline_is_one_line(tmp_path, capsys):
    from fgds_engine.models import tiny_flow_pipeline

    folder = tmp_path / "tiny-sd3"
    tiny_flow_pipeline("sd3").save_pretrained(folder)
    out = planned(tmp_path)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["generate", str(out), "--pipeline", str(folder), *VIT, *STEPS, "--scheduler", "euler"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fgds: error: scheduler 'euler' is a DDPM-family scheduler but the model's "
        "FlowMatchEulerDiscreteScheduler is a flow-matching one: use one of flow-euler, flow-dpmpp-2m")
    assert snapshot(out) == before


def _pixart_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def _kandinsky_folder(folder: Path) -> Path:
    from test_pipes import tiny_kandinsky

    tiny_kandinsky().save_pretrained(folder)
    return folder


from test_pipes import SUPPORTED  # noqa: E402  (the families' one-line list, written out once)


@pytest.mark.parametrize("make, name", [(_pixart_folder, "PixArtAlphaPipeline"),
                                        (_kandinsky_folder, "KandinskyV22Pipeline")])
def test_an_unsupported_pipeline_folder_is_one_line_and_writes_nothing(tmp_path, capsys, make, name):
    folder = make(tmp_path / "pipe")
    out = planned(tmp_path)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["generate", str(out), "--pipeline", str(folder), *VIT, *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fgds: error: pipeline {folder}: {name} is not a pipeline family the engine runs; "
                   f"it runs {SUPPORTED}")
    assert snapshot(out) == before
