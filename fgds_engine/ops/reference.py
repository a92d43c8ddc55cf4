"""Plain-torch guided DDIM step: the one source of truth for the formula (DDIM, Song et al. 2021, eq. 12).

Key from code names to paper symbols:
    x        x_t, the current latent                a_t      alpha-bar at t
    a_prev   alpha-bar at the previous timestep     eps      epsilon prediction, x0 the predicted x_0
    w        classifier-free guidance scale         g        feedback gradient dC/dx_t
All arithmetic is fp32 whatever the input dtype; outputs are cast back to the dtype of ``x``.
"""

from __future__ import annotations

import torch

FEEDBACK_MODES = ("shift", "score")


def _bcast(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar, 0-d or per-sample [B] value shaped to broadcast against x (fp32)."""
    v = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() == 1 else v


def cfg_combine(eps_u: torch.Tensor, eps_c: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u), in fp32."""
    eps_u, eps_c = eps_u.float(), eps_c.float()
    return eps_u + _bcast(w, eps_c) * (eps_c - eps_u)


def normalise_feedback(g: torch.Tensor, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Per-sample rescaling of the feedback gradient: g / (||g|| + 1e-8) * ||x_t|| * scale (fp32 norms)."""
    b = g.shape[0]
    gf, xf = g.float().reshape(b, -1), x.float().reshape(b, -1)
    factor = xf.norm(dim=1) / (gf.norm(dim=1) + 1e-8) * torch.as_tensor(scale, dtype=torch.float32,
                                                                      device=g.device).reshape(-1)
    return (gf * factor[:, None]).reshape(g.shape)


def split_prediction(model_output: torch.Tensor, x: torch.Tensor, a_t, prediction_type: str):
    """(x0, eps) from a model output of the given prediction type at alpha-bar a_t (fp32)."""
    out, x = model_output.float(), x.float()
    a = _bcast(a_t, x)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (x - s1a * out) / sa, out
    if prediction_type == "sample":
        return out, (x - sa * out) / s1a
    if prediction_type == "v_prediction":
        return sa * x - s1a * out, sa * out + s1a * x
    raise NotImplementedError(f"prediction_type {prediction_type!r} is not supported")


def ddim_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    a_t,
    a_prev,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    eps_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t-1}; returns (x_prev, x0) in the dtype of x.

    ``eps_shift`` (optional, fp32) is subtracted from the derived eps before the update, with x0 re-derived
    from the shifted eps: the "score" form of guidance, eps' = eps - sqrt(1 - a_t) g.
    """
    a, ap = _bcast(a_t, x), _bcast(a_prev, x)
    x0, eps = split_prediction(model_output, x, a_t, prediction_type)
    xf = x.float()
    if eps_shift is not None:
        eps = eps - eps_shift
        x0 = (xf - (1 - a).sqrt() * eps) / a.sqrt()
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    # eq. 16 of DDIM: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    std = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    if use_clipped_model_output:
        eps = (xf - a.sqrt() * x0) / (1 - a).sqrt()
    # eq. 12 of DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    x_prev = ap.sqrt() * x0 + (1 - ap - std**2).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs the caller's noise (one tensor shaped like x)")
        x_prev = x_prev + std * noise.float()
    return x_prev.to(x.dtype), x0.to(x.dtype)


def guided_ddim_step(
    eps_u: torch.Tensor | None,
    eps_c: torch.Tensor,
    x: torch.Tensor,
    a_t,
    a_prev,
    *,
    guidance_scale: float = 1.0,
    grad: torch.Tensor | None = None,
    feedback_scale: float = 0.0,
    feedback_mode: str = "shift",
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG combine, feedback combine and DDIM update in one call; returns (x_prev, x0).

    Feedback (METHOD.md): g = grad / (||grad|| + 1e-8) * ||x_t|| * feedback_scale per sample, then
    ``shift``: the DDIM update runs from x_t + g with the CFG output computed before the shift (demo code);
    ``score``: eps' = eps - sqrt(1 - a_t) g (guided-diffusion's condition_score).
    """
    out = eps_c.float() if eps_u is None else cfg_combine(eps_u, eps_c, guidance_scale)
    shift = None
    if grad is not None:
        if feedback_mode not in FEEDBACK_MODES:
            raise ValueError(f"feedback_mode must be one of {FEEDBACK_MODES}, got {feedback_mode!r}")
        g = normalise_feedback(grad, x, feedback_scale)
        if feedback_mode == "shift":
            x = (x.float() + g).to(x.dtype)
        else:
            shift = (1 - _bcast(a_t, g)).sqrt() * g
    return ddim_step(out, x, a_t, a_prev, prediction_type=prediction_type, eta=eta, noise=noise,
                     clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                     use_clipped_model_output=use_clipped_model_output, eps_shift=shift)
