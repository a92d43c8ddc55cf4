"""Measuring a preset: its models (random weights), the per-sample reference against the batched engine at
each batch, step costs, FLOPs and memory lines, within a time budget."""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import replace

import torch

from ..conditioning import Conditioning, random_conditioning
from ..config import DTYPES
from ..deprecation import moved_names
from ..models import (
    Models,
    cast,
    decode,
    denoiser_output,
    set_attention,
    small_models,
    tiny_models,
    vae_dtype,
)
from ..models.published import (
    flux_models,
    pixart_sigma_models,
    sd3_models,
    sd15_models,
    sdxl_models,
    tiny_flux_models,
    tiny_sdxl_models,
)
from ..sampler import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig
from .timing import count_flops, fraction_of_peak, matmul_peak, timed

PAPER_V100 = {"impl": "paper Table 5 (V100, per sample, no batching)", "per_sample_s": None,
              "note": "not retrievable here; a documented unknown, not a measurement"}


__getattr__ = moved_names(__name__, {"PRESETS": "fgds_engine.bench.measure:BENCH_PRESETS"})
BENCH_PRESETS = {  # fgds bench --preset: random-weight model sets
    "tiny": dict(build=lambda dev: tiny_models(num_classes=10), classifier_size=None, text_len=8),
    "small": dict(build=lambda dev: small_models(num_classes=10), classifier_size=None, text_len=8),
    "sd15-256": dict(build=lambda dev: sd15_models(256, device=dev), classifier_size=224, text_len=77),
    "sd15-512": dict(build=lambda dev: sd15_models(512, device=dev), classifier_size=224, text_len=77),
    # SDXL's published UNet (2.6 B parameters) and VAE (fp32 under a float16 run: force_upcast) at 1024 px,
    # the classifier input resized to 224; "sdxl-tiny": the tiny SDXL pipeline's UNet and VAE (CPU dry run)
    "sdxl-1024": dict(build=lambda dev: sdxl_models(1024, device=dev), classifier_size=224, text_len=77),
    "sdxl-tiny": dict(build=lambda dev: tiny_sdxl_models(num_classes=10), classifier_size=None, text_len=8),
    # the transformer families' published configs, random weights; their pipelines' schedulers (flow
    # matching for SD3 and Flux) and text lengths (SD3: CLIP's 77 + T5's 256; Flux: T5's 512; PixArt: 300)
    "sd3-medium-1024": dict(build=lambda dev: sd3_models(1024, device=dev), classifier_size=224, text_len=333,
                            scheduler=None),
    "flux-dev-1024": dict(build=lambda dev: flux_models(1024, device=dev), classifier_size=224, text_len=512,
                          scheduler=None, image_size=1024),
    "flux-dev-512": dict(build=lambda dev: flux_models(512, device=dev), classifier_size=224, text_len=512,
                         scheduler=None, image_size=512),
    "pixart-sigma-1024": dict(build=lambda dev: pixart_sigma_models(1024, device=dev), classifier_size=224,
                              text_len=300, scheduler=None),
    "flux-tiny": dict(build=lambda dev: tiny_flux_models(num_classes=10), classifier_size=None, text_len=8,
                      scheduler=None, image_size=16),
}


def cond_for(m: Models, batch: int, text_len: int, device) -> Conditioning:
    """Random conditioning of the preset UNet's shapes (SDXL's pooled embedding and time ids included)."""
    g = torch.Generator().manual_seed(0)
    return random_conditioning(m.unet.config, batch, text_len, generator=g).to(
        device, next(m.unet.parameters()).dtype)


def release(device: torch.device, *samplers) -> None:
    """Drop the samplers' captured CUDA graphs (and their memory pools) and return cached blocks."""
    for s in samplers:
        if s is not None and s.graphs is not None:
            s.graphs.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    """Runs the rows of a benchmark: catches out-of-memory per row, skips rows past ``max_seconds``, and
    calls ``write`` after every row so that nothing measured is lost."""

    def __init__(self, device: torch.device, *, repeats: int, warmup: int, max_seconds: float | None,
                 write=lambda: None, log=print):
        self.device, self.repeats, self.warmup, self.write, self.log = device, repeats, warmup, write, log
        self.error = ""
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def call(self, fn):
        """fn() or the status that stopped it: "oom", "skipped" or "error" (any other exception: its line is
        kept in ``self.error``, its traceback goes to the log; a failing row never ends the run)."""
        if self.over():
            return "skipped"
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            release(self.device)
            return "oom"
        except Exception as e:  # noqa: BLE001 -- recorded in the row, the run goes on
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self.log(traceback.format_exc().rstrip())
            release(self.device)
            return "error"

    def note(self, status: str) -> str:
        """The row note of a status ``call`` returned."""
        return {"oom": "out of memory", "skipped": "over the --max-seconds budget"}.get(status, self.error)

    def row(self, rows: list, impl: str, batch: int, fn, *, per: int | None = None, **extra) -> dict:
        """Time fn() (one call makes ``per`` samples, default ``batch``) into a row appended to ``rows``."""
        self.log(f"  {impl} at batch {batch} ...")
        res = self.call(lambda: timed(fn, self.device, self.repeats, warmup=self.warmup))
        row = {"impl": impl, "batch": batch, **extra}
        if isinstance(res, str):
            row.update(per_sample_s=None, status=res, note=self.note(res))
            self.log(f"  {impl} at batch {batch}: {row['note']}")
        else:
            n = per or batch
            row.update(status="ok", per_sample_s=res[0] / n, per_sample_median_s=res[1] / n,
                       samples_per_s=n / res[0])
        rows.append(row)
        self.write()
        return row


def step_costs(sampler: FeedbackGuidedSampler, m: Models, batch: int, text_len: int, device, *,
               flops: bool, budget: Budget | None = None) -> dict:
    """Seconds (and FLOPs) of one CFG step, one feedback step, one final decode + classification; a part
    that runs out of memory (or past the budget) is recorded as such."""
    budget = budget or Budget(torch.device(device), repeats=1, warmup=1, max_seconds=None)
    x = torch.randn(batch, *sampler.latent_shape, device=device, dtype=sampler.latent_dtype)
    cond = cond_for(m, batch, text_len, device)
    uncond = cond.unconditional() if sampler.terms.unconditional is not None else None  # FLUX.1-dev: none
    t, a_t = sampler.solver.first_inputs(torch.device(device))
    labels = torch.arange(batch, device=device) % sampler.classifier.num_classes
    nan = torch.zeros(batch, dtype=torch.bool, device=device)
    parts = {
        "cfg_step": lambda: sampler.cfg_pass(x, t, cond, uncond),
        "feedback_step": lambda: sampler.feedback_pass(x, t, a_t, cond, uncond, labels),
        "final": lambda: sampler.finish(x, labels, nan),
        "decoder": lambda: torch.no_grad()(decode)(sampler.vae, x),
        "unet_half": lambda: torch.no_grad()(denoiser_output)(m.unet, x, t, cond),
    }
    out = {}
    for name, fn in parts.items():
        fn = sampler.frozen()(fn)  # the models as a sampling call runs them
        res = budget.call(lambda fn=fn: timed(fn, budget.device, 1, warmup=budget.warmup)[0])
        if isinstance(res, str):
            out[name] = {"seconds": None, "status": res}
            if res == "error":
                out[name]["note"] = budget.note(res)
        else:
            out[name] = {"seconds": res}
        if flops and name in ("cfg_step", "feedback_step", "final") and not isinstance(res, str):
            res = budget.call(lambda fn=fn: count_flops(fn))
            out[name]["flops"] = None if isinstance(res, str) else res
    return out


def _breakdown(costs: dict, steps: int, n_fb: int) -> dict | None:
    secs = {k: costs[k]["seconds"] for k in ("cfg_step", "feedback_step", "final")}
    if any(v is None for v in secs.values()):
        return None
    total = (steps - n_fb) * secs["cfg_step"] + n_fb * secs["feedback_step"] + secs["final"]
    return {"cfg_steps": (steps - n_fb) * secs["cfg_step"] / total,
            "feedback_steps": n_fb * secs["feedback_step"] / total,
            "final_decode_and_score": secs["final"] / total,
            "decoder_forward_per_call_s": costs["decoder"]["seconds"],
            "unet_half_forward_per_call_s": costs["unet_half"]["seconds"]}


def _flops_per_sample(costs: dict, steps: int, n_fb: int, batch: int) -> float | None:
    f = [costs[k].get("flops") for k in ("cfg_step", "feedback_step", "final")]
    if any(v is None for v in f):
        return None
    return ((steps - n_fb) * f[0] + n_fb * f[1] + f[2]) / batch


def prepare_models(m: Models, device: torch.device, *, dtype: str | None = None, channels_last: bool = False,
                   attention: str | None = None) -> None:
    """The preset's models on ``device`` in the run's dtype, memory format and attention, once, before any
    row: the reference, the memory probe, the engine and every other row of a run time the same models."""
    dt = DTYPES[dtype] if dtype else None
    for mod, mdt in ((m.unet, dt), (m.vae, vae_dtype(m.vae, dt, upcast=m.upcast_vae)), (m.classifier, dt)):
        if mod is not None:
            mod.to(device)
            cast(mod, mdt)  # an SDXL VAE stays in float32 under float16 (force_upcast), as in the engine
            if channels_last:
                mod.to(memory_format=torch.channels_last)
    if attention is not None:
        set_attention(attention, device, m.unet, m.vae)


def model_dtypes(m: Models) -> str:
    """The models' parameter dtype ("float16"), or each model's where they differ."""
    mods = {"unet": m.unet, "vae": m.vae, "classifier": m.classifier}
    got = {k: str(next(v.parameters()).dtype).removeprefix("torch.")
           for k, v in mods.items() if v is not None}
    if len(set(got.values())) == 1:
        return next(iter(got.values()))
    return ", ".join(f"{k} {v}" for k, v in got.items())


def _with_probe(m: Models, base: SamplerConfig, rt: RuntimeOptions, device, fn):
    """fn(sampler) on a sampler of the run's base config and runtime, its graphs released afterwards."""
    probe = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, base, runtime=rt,
                                  upcast_vae=m.upcast_vae)
    try:
        return fn(probe)
    finally:
        release(device, probe)


def memory_lines(m: Models, spec: dict, base: SamplerConfig, rt: RuntimeOptions, device, log=print) -> dict:
    """The memory lines (GiB: fixed, per sample) of a CFG step, a feedback step and the final decode + score,
    from probes at batches 1 and 2 (``memory.probe``), with what measured them."""
    from ..memory import measure_lines

    lines = _with_probe(m, base, rt, device, lambda s: measure_lines(
        s, lambda b: cond_for(m, b, spec["text_len"], device)))
    out = {name: line.gib() for name, line in zip(("cfg", "feedback", "final"), lines)}
    out["measured"] = ("the CUDA allocator's peaks" if device.type == "cuda"
                       else "peak live tensor bytes (memory.LiveBytes)")
    log(f"memory lines, GiB (fixed, per sample): {out}")
    return out


def reference_kwargs(m: Models, cfg: SamplerConfig) -> dict:
    """The reference loop's schedule arguments where the engine computes them (a dynamically shifted flow
    schedule: mu from the image's sequence length)."""
    from ..solvers import FlowSolver, is_flow, resolve_scheduler

    sched = resolve_scheduler(m.scheduler, cfg.scheduler)
    if not (is_flow(sched) and sched.config.get("use_dynamic_shifting")):
        return {}
    probe = FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg)
    assert isinstance(probe.solver, FlowSolver)
    kw = probe.solver.timestep_kwargs()
    kw.pop("num_inference_steps")
    return {"timestep_kwargs": kw}


def run_preset(preset: str, *, batches=(1, 8, 32), steps: int = 30, feedback_every=(5, 1), repeats: int = 3,
               warmup: int = 1, device: torch.device | str = "cpu", dtype: str | None = None,
               attention: str | None = None, channels_last: bool = False, max_seconds: float | None = None,
               probe_memory: bool = False, scheduler: str | None = None, write=lambda result: None,
               log=print) -> dict:
    """All rows of one preset: the reference at batch 1, the engine guided and unguided at each batch, per
    feedback frequency, every row on the same models in the same dtype (recorded per row). ``write(result)``
    is called after every row; a row that runs out of memory is recorded as "oom", one past ``max_seconds``
    as "skipped", one that raises as "error" with the exception's line, and the run goes on."""
    from ..reference_loop import sample_one

    device = torch.device(device)
    spec = BENCH_PRESETS[preset]
    m = spec["build"](device)
    prepare_models(m, device, dtype=dtype, channels_last=channels_last, attention=attention)
    scheduler = scheduler or spec.get("scheduler", "ddim")  # None: the preset's own (flow matching)
    result = {"preset": preset, "steps": steps, "scheduler": scheduler or type(m.scheduler).__name__,
              "dtype": model_dtypes(m),
              "complete": False,
              "unet_params_M": sum(p.numel() for p in m.unet.parameters()) / 1e6, "runs": []}
    budget = Budget(device, repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                    write=lambda: write(result), log=log)

    def row(rows, impl, batch, fn, **extra):  # every row says the dtype its models ran in
        return budget.row(rows, impl, batch, fn, dtype=model_dtypes(m), **extra)

    def engine(cfg, runtime):  # a sampler, or the status of its failed construction
        return budget.call(lambda: FeedbackGuidedSampler(m.unet, m.vae, m.classifier, m.scheduler, cfg,
                                                         runtime=runtime, upcast_vae=m.upcast_vae))

    def status_row(rows, impl, batch, status):
        rows.append({"impl": impl, "batch": batch, "dtype": model_dtypes(m), "per_sample_s": None,
                     "status": status, "note": budget.note(status)})
        write(result)
        return rows[-1]

    def engine_row(rows, impl, cfg, runtime, batch):  # a row of a sampler of its own, released afterwards
        smp = engine(cfg, runtime)
        if isinstance(smp, str):
            return status_row(rows, impl, batch, smp)
        cond = cond_for(m, batch, spec["text_len"], device)
        labels, seeds = [k % smp.classifier.num_classes for k in range(batch)], list(range(batch))
        try:
            return row(rows, impl, batch, lambda: smp.sample(cond, labels, seeds))
        finally:
            release(device, smp)

    peak = budget.call(lambda: matmul_peak(device, DTYPES[dtype or "float32"]))
    peak = peak if isinstance(peak, float) else None
    result["matmul_peak_tflops"] = None if peak is None else peak / 1e12
    base = SamplerConfig.faithful(num_inference_steps=steps, scheduler=scheduler, feedback_mode="auto",
                                  criterion="entropy", feedback_scale=0.03,
                                  classifier_size=spec["classifier_size"], image_size=spec.get("image_size"))
    rt = RuntimeOptions(dtype=dtype, channels_last=channels_last,
                        **({} if attention is None else {"attention": attention}))
    if probe_memory:
        lines = budget.call(lambda: memory_lines(m, spec, base, rt, device, log))
        result["memory_lines_gib"] = lines if isinstance(lines, dict) else {"status": lines,
                                                                            "note": budget.note(lines)}
    if "auto" in batches:
        from ..memory import plan_batch

        choice = budget.call(lambda: _with_probe(m, base, rt, device, lambda s: plan_batch(
            s, lambda b: cond_for(m, b, spec["text_len"], device), log=log)))
        fixed = {int(b) for b in batches if b != "auto"}
        if isinstance(choice, str):
            result["auto_batch"] = {"status": choice, "note": budget.note(choice)}
        else:
            result["auto_batch"] = choice.as_dict()
            fixed.add(choice.batch)
            rt = replace(rt, feedback_chunk=choice.chunk)
        batches = sorted(fixed)
        write(result)
    unguided: dict[int, dict] = {}  # feedback off, same CFG: one row per batch, shared by the frequencies
    for every in feedback_every:
        cfg = replace(base, feedback_every=every)
        n_fb = sum(cfg.is_feedback_step(i) for i in range(steps))  # scheduled; the sampler corrects it
        run = {"feedback_every": every, "feedback_steps": n_fb, "rows": [],
               "feedback_chunk": rt.feedback_chunk}
        result["runs"].append(run)
        rows = run["rows"]
        log(f"[{preset}] feedback every {every} step(s) ({n_fb} feedback steps)")
        cond1 = cond_for(m, 1, spec["text_len"], device)
        ref = row(rows, "reference (demo loop)", 1, lambda cfg=cfg, c1=cond1: sample_one(
            m.unet, m.vae, m.classifier, m.scheduler, cfg, c1, 3, 3, **reference_kwargs(m, cfg)))
        ref_s = ref["per_sample_s"]
        if ref_s is not None:
            ref["ratio"] = 1.0
        rows.append(dict(PAPER_V100))
        sampler = engine(cfg, rt)
        if isinstance(sampler, str):
            status_row(rows, "engine", None, sampler)
            continue
        n_fb = len(sampler.feedback_steps())  # the pushes that happen on this schedule (none at pure noise)
        run.update(feedback_steps=n_fb, scheduler=sampler.solver.name, feedback_mode=sampler.feedback_mode,
                   attention=sampler.attention, graphs=sampler.graphs_status, backend=sampler.backend,
                   channels_last=rt.channels_last)
        best = None
        for b in batches:
            cond = cond_for(m, b, spec["text_len"], device)
            labels, seeds = [k % sampler.classifier.num_classes for k in range(b)], list(range(b))
            r = row(rows, "engine", b, lambda c=cond, y=labels, s=seeds, smp=sampler: smp.sample(c, y, s))
            run["graphs"] = sampler.graphs_status  # after sampling: a failed capture shows here
            release(device, sampler)  # this batch's graph pools go before the next batch is captured
            if r["per_sample_s"] is not None:
                best = b
            if b not in unguided:
                off = replace(cfg, feedback_scale=0.0)
                unguided[b] = engine_row([], "engine, no feedback (same CFG)", off, rt, b)
            rows.append(dict(unguided[b]))
            budget.write()
        for r in rows:
            if r.get("per_sample_s") is not None and ref_s is not None:
                r["ratio"] = ref_s / r["per_sample_s"]
        if best is None:
            log(f"[{preset}] no engine batch fitted in memory (or in the time budget)")
            write(result)
            continue
        guided = next(r for r in rows if r["impl"] == "engine" and r["batch"] == best)
        if unguided[best]["per_sample_s"] is not None:
            run["feedback_cost_factor"] = guided["per_sample_s"] / unguided[best]["per_sample_s"]
        if sampler.graphs is not None:  # the same batch without CUDA graphs (their pools released above)
            r = engine_row(rows, "engine (eager, no CUDA graphs)", cfg, replace(rt, cuda_graphs=False), best)
            if r["per_sample_s"] is not None and ref_s is not None:
                r["ratio"] = ref_s / r["per_sample_s"]
        costs = step_costs(sampler, m, best, spec["text_len"], device, flops=True, budget=budget)
        run["breakdown_batch"], run["step_costs"] = best, costs
        run["breakdown"] = _breakdown(costs, steps, n_fb)
        flops = _flops_per_sample(costs, steps, n_fb, best)
        if flops is not None:
            tflops = flops / guided["per_sample_s"]
            guided.update(flops_per_sample=flops, tflops=tflops / 1e12)
            if peak is not None:
                guided.update(fraction_of_peak(tflops, peak))
                run["fraction_of_peak"] = guided["fraction_of_peak"]
        release(device, sampler)
        del sampler
        write(result)
    result["complete"] = not budget.over()
    write(result)
    return result
