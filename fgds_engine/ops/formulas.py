"""Plain torch: the one source of truth for the guidance combine (``guide``: CFG, then feedback in shift or
score form, for any solver) and for the DDIM update (``ddim_step``, Song et al. 2021, eq. 12); their
composition ``guided_ddim_step`` is what the fused Triton and CUDA steps implement.

Key from code names to paper symbols:
    x        x_t, the current latent                a_t      alpha-bar at t
    a_prev   alpha-bar at the previous timestep     eps      epsilon prediction, x0 the predicted x_0
    w        classifier-free guidance scale         g        feedback gradient dC/dx_t
All arithmetic is fp32 whatever the input dtype; outputs are cast back to the dtype of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FEEDBACK_MODES = ("shift", "score")


@dataclass(frozen=True)
class StepOptions:
    """The options of one guided step, shared by every backend and every solver (one home for the list).

    guidance_scale, feedback_scale: floats, 0-d or per-sample [B] tensors (device tensors in a CUDA graph).
    feedback_mode: "shift" (x_t += g before the update, the demo code) | "score" (eps -= sqrt(1 - a_t) g).
    prediction_type, eta, clip_sample, clip_sample_range, use_clipped_model_output: as diffusers'
    ``DDIMScheduler`` (eta and the clipping are the DDIM update's; the guidance uses the rest).
    """

    guidance_scale: float | torch.Tensor = 1.0
    feedback_scale: float | torch.Tensor = 0.0
    feedback_mode: str = "shift"
    prediction_type: str = "epsilon"
    eta: float = 0.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    use_clipped_model_output: bool = False

    @classmethod
    def of(cls, opts: StepOptions | None = None, **changes) -> StepOptions:
        """``opts`` (default: the defaults) with keyword changes: ``of(guidance_scale=5.0)``."""
        opts = opts or cls()
        return replace(opts, **changes) if changes else opts


def _bcast(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar, 0-d or per-sample [B] value shaped to broadcast against x (fp32)."""
    v = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() == 1 else v


def cfg_combine(eps_u: torch.Tensor, eps_c: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u), in fp32."""
    eps_u, eps_c = eps_u.float(), eps_c.float()
    return eps_u + _bcast(w, eps_c) * (eps_c - eps_u)


def pipeline_cfg_combine(eps_u: torch.Tensor, eps_c: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the outputs' own dtype, rounded as the diffusers pipelines round it:
    ``eps_u + w * (eps_c - eps_u)`` with w a Python float, i.e. each op in the outputs' dtype, the product
    computed in fp32 (the scalar kept in fp32, as torch's bf16 / fp16 kernels do) before its rounding.
    Equal to ``cfg_combine`` in fp32; under bf16 / fp16 bit-equal to the pipelines' own combine (the
    solvers that run the scheduler's own step: ``solvers.EagerStep``)."""
    if eps_c.dtype == torch.float32:
        return cfg_combine(eps_u, eps_c, w)
    d = eps_c - eps_u
    return eps_u + (d.float() * _bcast(w, d).float()).to(d.dtype)


def normalise_feedback(g: torch.Tensor, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Per-sample rescaling of the feedback gradient: g / (||g|| + 1e-8) * ||x_t|| * scale (fp32 norms)."""
    b = g.shape[0]
    gf, xf = g.float().reshape(b, -1), x.float().reshape(b, -1)
    factor = xf.norm(dim=1) / (gf.norm(dim=1) + 1e-8) * torch.as_tensor(scale, dtype=torch.float32,
                                                                      device=g.device).reshape(-1)
    return (gf * factor[:, None]).reshape(g.shape)


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / (||v|| + 1e-8) per sample (fp32 norm), shaped like v."""
    vf = v.float().flatten(1)
    return (vf / (vf.norm(dim=1, keepdim=True) + 1e-8)).reshape(v.shape)


def combine_pushes(pushes: list[tuple[torch.Tensor, float | torch.Tensor]]):
    """The pushes of a step's terms as the one (gradient d, per-sample scale) the guidance combine takes.

    One push (g, s) is itself (the combine gives g / ||g|| * ||x_t|| * s). Several: d = sum_k unit(g_k) s_k,
    whose scale is ||d||, so the combine gives the sum of the unit pushes, each at its own scale, times
    ||x_t||.
    """
    if len(pushes) == 1:
        return pushes[0]
    d = None
    for g, s in pushes:
        s = torch.as_tensor(s, dtype=torch.float32, device=g.device).reshape((-1,) + (1,) * (g.dim() - 1))
        d = unit(g) * s if d is None else d + unit(g) * s
    return d, d.flatten(1).norm(dim=1)


def noise_coefficients(a_t, prediction_type: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with x = alpha x0 + sigma eps at the noise level of alpha-bar a_t (fp32, shaped to
    broadcast against ``like``): variance-preserving (sqrt(a), sqrt(1 - a)); flow matching ("flow":
    x = (1 - s) x0 + s eps) carries a_t as the alpha-bar of the same signal-to-noise ratio,
    a = (1 - s)^2 / ((1 - s)^2 + s^2), so s = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)) and (1 - s, s)."""
    a = _bcast(a_t, like)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type != "flow":
        return sa, s1a
    s = s1a / (sa + s1a)
    return 1 - s, s


def flow_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """The alpha-bar of a flow-matching noise level s: (1 - s)^2 / ((1 - s)^2 + s^2) (0 at s = 1)."""
    s = sigma.double()
    return ((1 - s) ** 2 / ((1 - s) ** 2 + s**2)).float()


def split_prediction(model_output: torch.Tensor, x: torch.Tensor, a_t, prediction_type: str):
    """(x0, eps) from a model output of the given prediction type at alpha-bar a_t (fp32). "flow": the
    velocity v = eps - x0 of rectified flow, x0 = x - s v and eps = x + (1 - s) v (``noise_coefficients``)."""
    out, x = model_output.float(), x.float()
    if prediction_type == "flow":
        _, s = noise_coefficients(a_t, "flow", x)
        return x - s * out, x + (1 - s) * out
    a = _bcast(a_t, x)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (x - s1a * out) / sa, out
    if prediction_type == "sample":
        return out, (x - sa * out) / s1a
    if prediction_type == "v_prediction":
        return sa * x - s1a * out, sa * out + s1a * x
    raise NotImplementedError(f"prediction_type {prediction_type!r} is not supported")


def join_prediction(x0: torch.Tensor, eps: torch.Tensor, a_t, prediction_type: str) -> torch.Tensor:
    """The model output of the given prediction type whose ``split_prediction`` is (x0, eps) (fp32)."""
    a = _bcast(a_t, eps)
    if prediction_type == "flow":
        return eps - x0
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    raise NotImplementedError(f"prediction_type {prediction_type!r} is not supported")


def guide(eps_u: torch.Tensor | None, eps_c: torch.Tensor, x: torch.Tensor, a_t, opts: StepOptions,
          grad: torch.Tensor | None = None, *, pipeline_rounding: bool = False, adjust=None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The guidance combine, independent of the solver: (model output, x_t), both to feed an update.

    CFG: out = eps_u + w (eps_c - eps_u) (fp32; eps_u None: eps_c). Feedback (docs/method.md), g = grad /
    (||grad|| + 1e-8) * ||x_t|| * feedback_scale per sample, then ``shift``: x_t + g is returned with the CFG
    output computed before the shift (demo code); ``score``: eps' = eps - sigma g with x_t = alpha x0 + sigma
    eps (``noise_coefficients``: sqrt(1 - a_t) in the variance-preserving case), with the output given back
    in ``opts.prediction_type`` (x0 re-derived from eps' at the same x_t). Under flow matching (x = c x_vp,
    c^2 = (1 - s)^2 + s^2) both forms are the variance-preserving push at the same signal-to-noise ratio:
    the shift is the same, the score form is eps' = eps - s / c^2 g (docs/method.md, "One push scale").
    ``x`` is the model's input (a sigma-space solver's ``scale_model_input(x)``) and ``a_t`` the alpha-bar of
    its noise level. At a_t = 0 (pure noise: a flow schedule's s = 1) the score form is unbounded; the
    sampler makes no push there (``SolverRun.pushes_at``).
    ``pipeline_rounding``: the CFG combine in the outputs' dtype as the pipelines round it
    (``pipeline_cfg_combine``; the same bytes in fp32), for a scheduler step that runs in that dtype.
    ``adjust``: a function of the combined output, applied before any push (a guidance term's ``adjust``).
    """
    combine = pipeline_cfg_combine if pipeline_rounding else cfg_combine
    out = eps_c.float() if eps_u is None else combine(eps_u, eps_c, opts.guidance_scale)
    if adjust is not None:
        out = adjust(out)
    if grad is None:
        return out, x
    if opts.feedback_mode not in FEEDBACK_MODES:
        raise ValueError(f"feedback_mode must be one of {FEEDBACK_MODES}, got {opts.feedback_mode!r}")
    g = normalise_feedback(grad, x, opts.feedback_scale)
    if opts.feedback_mode == "shift":
        return out, (x.float() + g).to(x.dtype)
    alpha, sigma = noise_coefficients(a_t, opts.prediction_type, g)
    _, eps = split_prediction(out, x, a_t, opts.prediction_type)
    if opts.prediction_type == "flow":  # the variance-preserving push at the same SNR: x = c x_vp
        eps = eps - sigma / (alpha**2 + sigma**2) * g
    else:
        eps = eps - sigma * g
    x0 = (x.float() - sigma * eps) / alpha
    return join_prediction(x0, eps, a_t, opts.prediction_type), x


def ddim_step(model_output: torch.Tensor, x: torch.Tensor, a_t, a_prev, opts: StepOptions | None = None, *,
              noise: torch.Tensor | None = None, **changes) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t-1} (DDIM eq. 12); returns (x_prev, x0) in the dtype of x.

    ``opts`` (or keyword ``StepOptions`` fields) gives prediction_type, eta, clip_sample, clip_sample_range
    and use_clipped_model_output; eta > 0 needs the caller's ``noise``.
    """
    o = StepOptions.of(opts, **changes)
    a, ap = _bcast(a_t, x), _bcast(a_prev, x)
    x0, eps = split_prediction(model_output, x, a_t, o.prediction_type)
    xf = x.float()
    if o.clip_sample:
        x0 = x0.clamp(-o.clip_sample_range, o.clip_sample_range)
    # eq. 16 of DDIM: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    std = o.eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    if o.use_clipped_model_output:
        eps = (xf - a.sqrt() * x0) / (1 - a).sqrt()
    # eq. 12 of DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    x_prev = ap.sqrt() * x0 + (1 - ap - std**2).sqrt() * eps
    if o.eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs the caller's noise (one tensor shaped like x)")
        x_prev = x_prev + std * noise.float()
    return x_prev.to(x.dtype), x0.to(x.dtype)


def guided_ddim_step(eps_u: torch.Tensor | None, eps_c: torch.Tensor, x: torch.Tensor, a_t, a_prev,
                     opts: StepOptions | None = None, *, grad: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None, **changes) -> tuple[torch.Tensor, torch.Tensor]:
    """``guide`` then ``ddim_step``: the formula every fused backend implements; returns (x_prev, x0)."""
    o = StepOptions.of(opts, **changes)
    out, x = guide(eps_u, eps_c, x, a_t, o, grad)
    return ddim_step(out, x, a_t, a_prev, o, noise=noise)
