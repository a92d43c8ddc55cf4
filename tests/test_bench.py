"""`fgds bench` (tiny preset on the CPU), the SD 1.5 configs, FLOP counting; the dry run of the harvest is in
test_harvest.py."""

import json

import pytest
import torch

from fgds_engine.bench import count_flops
from fgds_engine.cli import main
from fgds_engine.models.published import sd15_unet_config, sd15_vae_config


def test_sd15_configs_have_the_published_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # no memory: shapes only
        unet = UNet2DConditionModel(**sd15_unet_config(64))
        vae = AutoencoderKL(**sd15_vae_config(512))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_sdxl_configs_have_the_published_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fgds_engine.models.published import sdxl_unet_config, sdxl_vae_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config(128))
        vae = AutoencoderKL(**sdxl_vae_config(1024))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast


def test_flop_counter_counts_forward_and_input_gradient():
    a, b = torch.randn(64, 32, requires_grad=True), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    assert count_flops(lambda: torch.autograd.grad((a @ b).sum(), a)) == 2 * (2 * 64 * 32 * 16)


def test_fgds_bench_tiny_preset(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--batches", "1", "3", "--steps", "3", "--feedback-every", "2",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["preset"] == "tiny" and result["device"].startswith("cpu") and "commit" in result
    run = result["runs"][0]
    assert run["feedback_every"] == 2 and run["feedback_steps"] == 2
    rows = {(r["impl"], r.get("batch")): r for r in run["rows"]}
    assert rows["reference (demo loop)", 1]["ratio"] == 1.0
    v100 = next(r for r in run["rows"] if r["impl"].startswith("paper Table 5"))
    assert v100["per_sample_s"] is None and "not retrievable" in v100["note"]  # never an invented number
    big = rows["engine", 3]
    assert big["per_sample_s"] > 0 and big["flops_per_sample"] > 0
    # a fraction of the measured peak, or None with the note where a loaded machine made the probe read low
    frac = big["fraction_of_peak"]
    assert 0 < frac <= 1 if frac is not None else big["peak_note"].startswith("measurement error")
    assert abs(sum(v for k, v in run["breakdown"].items() if not k.endswith("_s")) - 1) < 1e-9
    out = capsys.readouterr().out
    assert "unknown" in out and "reference (demo loop)" in out
    assert big["per_sample_median_s"] >= big["per_sample_s"] and big["status"] == "ok"
    assert "timing" in result and result["timing"].startswith("fastest (and median) of 3")  # --repeats 3
    unguided = rows["engine, no feedback (same CFG)", 3]
    assert unguided["per_sample_s"] > 0
    assert run["feedback_cost_factor"] == big["per_sample_s"] / unguided["per_sample_s"]
    assert "price of feedback at batch 3" in out and result["complete"] is True


TINY = ["bench", "--preset", "tiny", "--batches", "1", "3", "--steps", "2", "--feedback-every", "2",
        "--repeats", "1"]


def test_out_of_memory_rows_are_recorded_and_the_json_stays_complete(tmp_path, monkeypatch):
    """A scripted allocation failure at batch 3 (guided sampling) and in the final decode of the step costs:
    those rows say "oom", every other row is measured, the JSON is whole."""
    from fgds_engine.sampler import FeedbackGuidedSampler

    sample, finish = FeedbackGuidedSampler.sample, FeedbackGuidedSampler.finish
    sampling = []

    def failing_sample(self, cond, labels, seeds, **kw):
        if len(seeds) == 3 and self.config.use_feedback:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        sampling.append(True)
        try:
            return sample(self, cond, labels, seeds, **kw)
        finally:
            sampling.pop()

    def failing_finish(self, x, labels, nan):
        if not sampling:  # the step-cost measurement of "final" (outside a sampling call) fails
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return finish(self, x, labels, nan)

    monkeypatch.setattr(FeedbackGuidedSampler, "sample", failing_sample)
    monkeypatch.setattr(FeedbackGuidedSampler, "finish", failing_finish)
    path = tmp_path / "bench.json"
    assert main([*TINY, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    rows = {(r["impl"], r.get("batch")): r for r in result["runs"][0]["rows"]}
    assert rows["engine", 3] == {"impl": "engine", "batch": 3, "dtype": "float32", "per_sample_s": None,
                                 "status": "oom", "note": "out of memory"}
    assert rows["engine", 1]["status"] == "ok" and rows["engine, no feedback (same CFG)", 3]["status"] == "ok"
    run = result["runs"][0]
    assert run["breakdown_batch"] == 1 and run["step_costs"]["final"] == {"seconds": None, "status": "oom"}
    assert run["breakdown"] is None and run["step_costs"]["cfg_step"]["seconds"] > 0
    assert result["complete"] is True


def test_max_seconds_skips_the_rows_left_and_says_so(tmp_path):
    path = tmp_path / "bench.json"
    assert main([*TINY, "--max-seconds", "0", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    statuses = {r["impl"]: r.get("status") for r in result["runs"][0]["rows"] if "batch" in r}
    assert set(statuses.values()) == {"skipped"} and result["complete"] is False
    assert result["runs"][0]["rows"][0]["note"] == "over the --max-seconds budget"


def test_an_interrupted_bench_keeps_every_row_it_measured(tmp_path, monkeypatch):
    """SIGINT (the harvest's stop) after the first engine row: the JSON holds the rows so far, exit 130."""
    from fgds_engine.sampler import FeedbackGuidedSampler

    sample = FeedbackGuidedSampler.sample

    def interrupted(self, cond, labels, seeds, **kw):
        if len(seeds) == 3:
            raise KeyboardInterrupt
        return sample(self, cond, labels, seeds, **kw)

    monkeypatch.setattr(FeedbackGuidedSampler, "sample", interrupted)
    path = tmp_path / "bench.json"
    assert main([*TINY, "--json", str(path)]) == 130
    result = json.loads(path.read_text())
    assert result["interrupted"] is True and result["complete"] is False
    impls = [(r["impl"], r.get("batch")) for r in result["runs"][0]["rows"]]
    assert impls[:3] == [("reference (demo loop)", 1),
                         ("paper Table 5 (V100, per sample, no batching)", None), ("engine", 1)]


def test_fraction_of_peak_above_one_is_a_measurement_error():
    from fgds_engine.bench import fraction_of_peak

    assert fraction_of_peak(0.5e12, 1e12) == {"fraction_of_peak": 0.5}
    assert fraction_of_peak(1.06e12, 1e12) == {
        "fraction_of_peak": None,
        "peak_note": "measurement error: 106% of the measured matmul peak (the probe underestimates)"}


def test_timed_reports_fastest_and_median(monkeypatch):
    """On a scripted clock (no sleep: a loaded machine oversleeps): each call advances it by its duration."""
    from types import SimpleNamespace

    from fgds_engine.bench import timing as bench

    now = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    durations = iter([5.0, 0.03, 0.01, 0.02])  # the warm-up, then three timed calls

    def fn():
        now[0] += next(durations)

    fast, median = bench.timed(fn, torch.device("cpu"), repeats=3)
    assert fast == pytest.approx(0.01, abs=1e-12) and median == pytest.approx(0.02, abs=1e-12)


def test_every_preset_builds_inference_models():
    """The reference loop runs the preset's models as built: eval mode, no parameter gradients (a UNet in
    training mode or with gradients on would slow the reference and flatter the engine's ratio)."""
    from fgds_engine.bench import BENCH_PRESETS

    for name, spec in BENCH_PRESETS.items():
        m = spec["build"](torch.device("meta") if name[-1].isdigit() else torch.device("cpu"))
        for mod in (m.unet, m.vae, m.classifier):
            if mod is not None:
                assert not any(x.training for x in mod.modules()), name
                assert not any(p.requires_grad for p in mod.parameters()), name


def test_sdxl_preset_keeps_its_vae_in_float32_under_float16_and_says_so():
    """The dtype handling of the SDXL rows without running them (the harvest's small dry run takes float32;
    its real-size dry run, make test-slow, runs the row in float16)."""
    from fgds_engine.bench import BENCH_PRESETS, model_dtypes, prepare_models

    m = BENCH_PRESETS["sdxl-tiny"]["build"](torch.device("cpu"))
    prepare_models(m, torch.device("cpu"), dtype="float16")
    assert model_dtypes(m) == "unet float16, vae float32, classifier float16"
    prepare_models(m, torch.device("cpu"), dtype="bfloat16")  # no force_upcast for bfloat16, as the pipeline
    assert model_dtypes(m) == "bfloat16"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_auto_bench_times_every_row_on_the_same_models(tmp_path, dtype):
    """--batches auto used to cast the models in place after the reference row of the first frequency had run
    in fp32, and the second frequency's reference then fed fp32 input to an fp16 classifier (a crash, no
    JSON); now every row, the reference included, runs the models in the run's dtype and says so."""
    path = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--batches", "2", "auto", "--dtype", dtype, "--device", "cpu",
            "--steps", "2", "--feedback-every", "2", "1", "--repeats", "1", "--warmup", "0"]
    assert main([*args, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["complete"] is True and result["dtype"] == dtype and result["auto_batch"]["batch"] == 8
    rows = [r for run in result["runs"] for r in run["rows"] if "batch" in r]
    impls = [(r["impl"], r["batch"]) for r in rows]
    assert impls == 2 * [("reference (demo loop)", 1), ("engine", 2), ("engine, no feedback (same CFG)", 2),
                         ("engine", 8), ("engine, no feedback (same CFG)", 8)]
    assert {r["dtype"] for r in rows} == {dtype} and {r["status"] for r in rows} == {"ok"}


def test_a_row_that_raises_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from fgds_engine.sampler import FeedbackGuidedSampler

    sample = FeedbackGuidedSampler.sample

    def failing(self, cond, labels, seeds, **kw):
        if len(seeds) == 3 and self.config.use_feedback:
            raise ValueError("the kernel rejected\nits second line")
        return sample(self, cond, labels, seeds, **kw)

    monkeypatch.setattr(FeedbackGuidedSampler, "sample", failing)
    path = tmp_path / "bench.json"
    assert main([*TINY, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    rows = {(r["impl"], r.get("batch")): r for r in result["runs"][0]["rows"]}
    assert rows["engine", 3] == {"impl": "engine", "batch": 3, "dtype": "float32", "per_sample_s": None,
                                 "status": "error", "note": "ValueError: the kernel rejected"}
    assert rows["engine", 1]["status"] == "ok" and rows["engine, no feedback (same CFG)", 3]["status"] == "ok"
    assert result["complete"] is True and "Traceback" in capsys.readouterr().out  # the whole story in the log


def test_transformer_configs_have_the_published_parameter_counts():
    """SD3 Medium's MMDiT, FLUX.1-dev's transformer, PixArt-Sigma's DiT-XL/2 and the 16-channel VAE of SD3 and
    Flux, built on the meta device (shapes only)."""
    from diffusers import (
        AutoencoderKL,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )

    from fgds_engine.models.published import (
        flow_vae_config,
        flux_dev_transformer_config,
        pixart_sigma_transformer_config,
        sd3_medium_transformer_config,
    )

    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in (
            ("sd3", SD3Transformer2DModel(**sd3_medium_transformer_config(128))),
            ("flux", FluxTransformer2DModel(**flux_dev_transformer_config())),
            ("pixart", PixArtTransformer2DModel(**pixart_sigma_transformer_config(128))),
            ("vae16", AutoencoderKL(**flow_vae_config(1024, scaling=1.5305, shift=0.0609))))}
    assert counts == {"sd3": 2_028_328_000, "flux": 11_901_408_320, "pixart": 610_856_096,
                      "vae16": 83_819_683}
