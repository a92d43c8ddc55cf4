"""The schedulers a run can name: short names for the ones Stable Diffusion users run, or any diffusers
scheduler class (imported only when named). Its own file so that the solvers and the options read it
without importing each other."""

from __future__ import annotations

import inspect

# short name -> (diffusers class, config changes): the ones Stable Diffusion users run
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                     "use_karras_sigmas": False}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    # flow matching (SD3, Flux, Sana): only for flow models, and only these for them
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                      "prediction_type": "flow_prediction",
                                                      "use_flow_sigmas": True, "use_karras_sigmas": False}),
}
FLOW_SCHEDULER_NAMES = ("flow-euler", "flow-dpmpp-2m")


def scheduler_class(name: str):
    """The diffusers scheduler class ``name``, or a ValueError naming the choices."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (inspect.isclass(cls) and hasattr(cls, "step") and hasattr(cls, "set_timesteps")):
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers "
                         "scheduler class name (e.g. DPMSolverMultistepScheduler)")
    return cls



def scheduler_label(scheduler) -> str:
    """The scheduler's class and the config keys that select its algorithm (for logs and run.json)."""
    keys = ("algorithm_type", "solver_order", "use_karras_sigmas", "timestep_spacing", "prediction_type",
            "shift", "flow_shift", "use_dynamic_shifting")
    parts = [f"{k}={scheduler.config[k]}" for k in keys if k in scheduler.config]
    return f"{type(scheduler).__name__}({', '.join(parts)})"
