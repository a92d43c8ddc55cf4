"""The demos' settings, variants and knobs (``DemoConfig``); the constants of the colored-digits setting."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError

SETTINGS = ("long-tail", "groups")


NUM_CLASSES = 10
# the stroke colors of the groups setting (RGB in [0, 1]); digit d's majority color is d mod 4


PALETTE = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.15), "blue": (0.15, 0.35, 1.0),
           "yellow": (1.0, 0.9, 0.1)}


COLORS = tuple(PALETTE)
BETWEEN, EMPTY = len(COLORS), len(COLORS) + 1  # stroke_colors' codes beyond the palette


PRIORS = {"matched": 0.9, "milder": 0.55}  # the generator's majority-color share in the groups setting
# the generator's training objective: epsilon prediction on the DDPM schedule, v prediction on it (both
# sampled by DDIM), rectified flow (sampled by FlowMatchEuler)
OBJECTIVES = ("ddpm", "v", "flow")


@dataclass(frozen=True)
class Variant:
    """A synthesis variant: no feedback (criterion None) or a criterion at a scale through a gradient path."""

    name: str
    criterion: str | None = None
    scale: float = 0.0
    grad_path: str = "full"
    scheduler: str | None = None  # None: the generator's own (DDIM or FlowMatchEuler); else a name
    steps: int | None = None  # None: the config's sample_steps
    feedback_mode: str = "auto"
    # the coverage terms (SamplerConfig's fields of the same names); None / 0: the config's CFG, off
    guidance_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    cads: tuple[float, float] | None = None
    repulsion_scale: float = 0.0

    def key(self) -> dict:
        """What a cached result of this variant depends on: its fields, the coverage ones only where set
        (the keys of the variants that predate them stay the same)."""
        d = asdict(self)
        for k in ("guidance_scale", "cfg_interval", "cads", "repulsion_scale"):
            if not d[k]:
                d.pop(k)
        return d


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs. Defaults: the long-tail setting, measured on a 2-core CPU to finish in about 2
    minutes cold; ``DemoConfig.groups()`` gives the groups setting's (fixed before any feedback run)."""

    seed: int = 0
    test_per_class: int = 50
    head: int = 120  # training images of the most frequent class
    imbalance: float = 60.0  # head / tail
    gen_channels: tuple[int, ...] = (16, 32, 32)
    gen_steps: int = 800
    gen_batch: int = 64
    gen_lr: float = 2e-3
    label_dropout: float = 0.1
    sample_steps: int = 25
    guidance_scale: float = 1.5
    feedback_scale: float = 0.03
    feedback_every: int = 5
    sample_batch: int = 128
    clf_epochs: int = 30
    oracle_epochs: int = 30
    budget_cap: int | None = None  # at most this many synthetic images per class (None: fill to the head)
    threads: int = 2  # torch CPU threads while the demo runs: float reductions depend on it
    timing_repeats: int = 3  # rounds of the variants' interleaved timing (the fastest is kept)
    # the groups setting
    setting: str = "long-tail"
    color_prior: str = "matched"  # the generator's color prior: matched (90% majority) | milder (55%)
    classifier_majority: float = 0.9  # majority-color share of the classifier's training set
    color_jitter: float = 0.08  # per-image uniform jitter of each RGB channel of the stroke color
    synthetic_per_class: int = 60
    ema_decay: float | None = None  # the generator's weights: an EMA (diffusers EMAModel) at this decay
    scales: tuple[float, ...] = ()  # further entropy feedback scales (the scale curve)
    # the scheduler grid: (scheduler name, steps) pairs, each unguided and with entropy feedback, in place of
    # the criteria variants (benchmarks/experiments/schedulers.py)
    solvers: tuple[tuple[str, int], ...] = ()
    # the coverage grid (benchmarks/experiments/coverage_terms.py; README "Coverage beyond the prior") in
    # place of the criteria variants
    coverage: bool = False
    # recipes in place of the criteria variants (benchmarks/experiments/budget.py and blind_selection.py):
    # (criterion or None, feedback scale, CFG scale or None for the config's); see ``recipe_variant``
    recipes: tuple[tuple[str | None, float, float | None], ...] = ()
    # the budget curve: per variant, besides the full budget, a classifier on the first k synthetic images of
    # every class for each k here (nested subsets of the same samples: the jobs and seeds a smaller budget
    # gets: long-tail's ``budget_cap`` = k, groups' ``synthetic_per_class`` = k)
    budget_caps: tuple[int, ...] = ()
    # the generator's training objective: "ddpm" (epsilon prediction on the DDPM schedule, sampled by DDIM),
    # "v" (v prediction on the same schedule and sampler: its x0 estimate stays bounded at high noise, where
    # epsilon's multiplies the network's error by sqrt((1 - a) / a); experiments/generator.py) or "flow"
    # (rectified flow: velocity prediction, sampled by FlowMatchEuler; benchmarks/experiments/flow.py)
    objective: str = "ddpm"
    # DDIM clips the generator's x0 estimate to [-1, 1] at every step (diffusers' clip_sample). Epsilon
    # prediction needs it (without it, the groups generator's fidelity fell to 15-46% on each seed measured);
    # v prediction is hurt by it: with it, fidelity at CFG 3.0 fell to 29-63% on each of 10 seeds and at 100
    # steps to 68-90%; without it, 99.3-100% (docs/experiments.md, "The groups generator")
    clip_sample: bool = True

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise InputError(f"setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.color_prior not in PRIORS:
            raise InputError(f"color prior must be one of {', '.join(PRIORS)}, got {self.color_prior!r}")
        if any(k < 1 for k in self.budget_caps):
            raise InputError(f"budget caps must be at least 1 image per class, got {list(self.budget_caps)}")
        for criterion, scale, cfg in self.recipes:
            if (criterion is None) != (scale == 0) or scale < 0 or (cfg is not None and cfg < 1):
                raise InputError(f"a recipe is (criterion, feedback scale > 0, CFG >= 1 or None) or "
                                 f"(None, 0, CFG or None), got {(criterion, scale, cfg)!r}")

    @classmethod
    def quick(cls, seed: int = 0, setting: str = "long-tail", **kw) -> DemoConfig:
        """A minute-long run for tests and CI: every stage, tiny budgets (numbers mean nothing; one timing
        round)."""
        if setting == "groups":
            return cls.groups(seed, gen_steps=40, sample_steps=6, feedback_every=2, clf_epochs=3,
                              oracle_epochs=2, synthetic_per_class=6, sample_batch=64, timing_repeats=1, **kw)
        return cls(seed=seed, gen_steps=40, sample_steps=6, feedback_every=2, clf_epochs=3, oracle_epochs=3,
                   budget_cap=6, sample_batch=64, timing_repeats=1, **kw)

    @classmethod
    def groups(cls, seed: int = 0, prior: str = "matched", **kw) -> DemoConfig:
        """The groups setting: 3x the long-tail generator's steps (a 3-channel prior needs them) with an EMA,
        trained with v prediction (with epsilon's, the generator missed the gate on each of the 7 seeds
        measured, with v's it passes on 10 of 10: docs/experiments.md, "The groups generator"), 60 synthetic
        images per class, the paper's feedback (0.03 every 5th of 25 steps, CFG 1.5), DDIM without clipping
        the x0 estimate (``clip_sample``: what v prediction needs)."""
        return cls(**{"seed": seed, "setting": "groups", "color_prior": prior, "gen_steps": 2400,
                      "ema_decay": 0.999, "oracle_epochs": 15, "objective": "v", "clip_sample": False} | kw)

    @property
    def channels(self) -> int:
        return 3 if self.setting == "groups" else 1

    def variants(self) -> list[Variant]:
        """The synthesis variants of this setting, in the order they run."""
        if self.solvers:
            return self.solver_variants()
        if self.coverage:
            return self.coverage_variants()
        if self.recipes:
            return [self.recipe_variant(*r) for r in self.recipes]
        base = [Variant("no feedback")] + [Variant(c, c, self.feedback_scale)
                                           for c in ("loss", "entropy", "hardness")]
        if self.setting == "long-tail":
            return base
        return base + [Variant("entropy x0", "entropy", self.feedback_scale, "x0")] + [
            Variant(f"entropy {s:g}", "entropy", s) for s in self.scales if s != self.feedback_scale]


    def recipe_variant(self, criterion: str | None, scale: float, cfg: float | None) -> Variant:
        """A recipe as a variant, named as the other grids name the same variant (so their cached samples
        and classifiers serve it): "no feedback", "loss", "entropy 0.1" (a scale other than the config's),
        "cfg 3.0 entropy" (a CFG other than the config's)."""
        if cfg == self.guidance_scale:
            cfg = None
        name = ("no feedback" if criterion is None else criterion if scale == self.feedback_scale
                else f"{criterion} {scale:g}")
        if cfg is not None:
            name = f"cfg {cfg:.1f}" + ("" if criterion is None else f" {name}")
        return Variant(name, criterion, scale, guidance_scale=cfg)

    def solver_variants(self) -> list[Variant]:
        """DDIM at ``sample_steps`` unguided, with entropy feedback (auto form: shift) and in the score form;
        then per (scheduler, steps) of ``solvers`` unguided and with entropy feedback at the same scale
        (feedback steps: see ``feedback_every_for``)."""
        e = self.feedback_scale
        out = [Variant("no feedback"), Variant("entropy", "entropy", e),
               Variant("entropy score", "entropy", e, feedback_mode="score")]
        for name, steps in self.solvers:
            out += [Variant(f"{name} {steps}", scheduler=name, steps=steps),
                    Variant(f"{name} {steps} entropy", "entropy", e, scheduler=name, steps=steps)]
        return out

    def coverage_variants(self) -> list[Variant]:
        """The grid fixed before any result (README): CFG 1.5 (the config's), 1.0 and 3.0, interval CFG 1.5
        and 3.0 at the published (0.28, 5.42], CADS at its published defaults, particle repulsion at
        feedback's per-step push on feedback's steps; each unguided and with entropy feedback."""
        e, interval = self.feedback_scale, (0.28, 5.42)
        terms = [("cfg 1.0", dict(guidance_scale=1.0)), ("cfg 3.0", dict(guidance_scale=3.0)),
                 ("interval 1.5", dict(cfg_interval=interval)),
                 ("interval 3.0", dict(guidance_scale=3.0, cfg_interval=interval)),
                 ("cads", dict(cads=(0.6, 0.9))), ("repulsion", dict(repulsion_scale=e))]
        out = [Variant("no feedback"), Variant("entropy", "entropy", e)]
        for name, kw in terms:
            out += [Variant(name, **kw), Variant(f"{name} entropy", "entropy", e, **kw)]
        return out

    def feedback_every_for(self, steps: int) -> int:
        """The rule fixed before any scheduler result: a shorter schedule keeps the number of feedback steps
        (sample_steps / feedback_every, 5 of 25), spread over the whole schedule from the first step: every
        (steps * feedback_every / sample_steps)-th step (10 steps: every 2nd, 15: 3rd, 20: 4th)."""
        return max(1, round(steps * self.feedback_every / self.sample_steps))
