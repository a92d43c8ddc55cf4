"""Any diffusers scheduler whose ``step`` consumes the model output: its own update, run eagerly.

Per batch a fresh scheduler (``from_config`` + ``set_timesteps``: diffusers schedulers keep their history
between steps), the pipeline's order: initial noise times ``init_noise_sigma``, then per step
``scale_model_input``, the model, the guidance combine, ``step(output, t, x, generator=<the batch's per-sample
generators>)``. Stochastic schedulers (Euler ancestral, DDPM, SDE-DPM-Solver) draw sample i's noise from its
own generator, so a sample does not depend on its batch. The update is elementwise and cheap; the UNet,
feedback pass and guidance combine before it run in the CUDA graphs.
"""

from __future__ import annotations

import inspect

import torch

from .base import EagerStep, SolverRun, StepTime


class DiffusersRun(SolverRun):
    def __init__(self, solver: DiffusersSolver, generators, device: torch.device):
        sched = type(solver.scheduler).from_config(solver.scheduler.config)
        sched.set_timesteps(solver.num_inference_steps, device=device)
        self.sched, self.device, self.c_in = sched, device, None
        self.timesteps = sched.timesteps
        self.init_noise_sigma = sched.init_noise_sigma
        self.step_kwargs = {"generator": list(generators)} if solver.takes_generator else {}
        # sigma-space (x = x0 + sigma eps, model input x / sqrt(1 + sigma^2)) or variance-preserving
        self.sigma_space = float(sched.init_noise_sigma) > 1.0
        self._one = torch.ones(1, device=device)
        if not self.sigma_space:  # the model input is x itself: its alpha-bar per step, computed once
            sigmas = getattr(sched, "sigmas", None)
            if sigmas is not None:
                s = sigmas[:len(self.timesteps)].float()
                abar = 1.0 / (1.0 + s * s)
            else:
                abar = sched.alphas_cumprod[self.timesteps.cpu().long()].float()
            self.abar = abar.to(device)
        # host copies, once per batch: the noise level sigma = sqrt((1 - a) / a) of each model input, and the
        # diffusion time t / T (cfg_interval, CADS)
        if self.sigma_space:
            self.sigmas_host = sched.sigmas[:len(self.timesteps)].double().cpu().tolist()
        else:
            a = self.abar.double().cpu()
            self.sigmas_host = ((1 - a) / a).sqrt().tolist()
        T = sched.config.num_train_timesteps
        self.t_host = (self.timesteps.double().cpu() / T).tolist()

    def model_input(self, i: int, x: torch.Tensor):
        """(model input, its alpha-bar as a 0-d fp32 device tensor, the input scale c_in or None for 1)."""
        t = self.timesteps[i]
        x_in = self.sched.scale_model_input(x, t)
        if not self.sigma_space:
            return x_in, self.abar[i], None
        c = self.sched.scale_model_input(self._one, t).float().reshape(())  # 1 / sqrt(1 + sigma^2)
        return x_in, c * c, c

    def inputs(self, i, x):
        """The scheduler's model input (its input scale kept for ``after``), t, a_t; no a_prev, no noise."""
        x_in, a_t, self.c_in = self.model_input(i, x)
        return StepTime(x_in, self.timesteps[i], a_t)

    def after(self, i, x, result):
        """The shift form's x_t + g back from the model input's scale, then the scheduler's own step."""
        if result.x_shifted is not None:
            x = result.x_shifted if self.c_in is None else (result.x_shifted.float() / self.c_in).to(x.dtype)
        return self.step(i, result.output, x)

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The scheduler's own update from x with the (guided) model output."""
        t = self.timesteps[i]
        return self.sched.step(out.to(x.dtype), t, x, return_dict=False, **self.step_kwargs)[0]


class DiffusersSolver(EagerStep):
    """A diffusers scheduler trained on the DDPM noise schedule (it has ``alphas_cumprod``)."""

    def __init__(self, scheduler, num_inference_steps: int):
        from .flow import is_flow

        name = type(scheduler).__name__
        if is_flow(scheduler):
            raise ValueError(f"{name} integrates a flow-matching model: it runs as a FlowSolver "
                             "(make_solver)")
        if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "scale_model_input"):
            raise ValueError(f"{name} is not supported: the engine runs schedulers of DDPM-trained UNets "
                             "(with alphas_cumprod), not EDM or flow-matching ones")
        params = inspect.signature(scheduler.step).parameters
        if "model_output" not in params:
            raise ValueError(f"{name}.step does not take a model output")
        self.scheduler, self.num_inference_steps = scheduler, num_inference_steps
        self.takes_generator = "generator" in params
        try:
            DiffusersRun(self, [], torch.device("cpu"))  # a bad step count or config fails here, not mid-run
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f"{name}: {str(e).splitlines()[0]}") from None

    def start(self, generators, device) -> DiffusersRun:
        return DiffusersRun(self, generators, device)

    def first_inputs(self, device):
        run = self.start([], device)
        x_in, a, _ = run.model_input(0, torch.zeros(1, device=device))
        return run.timesteps[0], a
