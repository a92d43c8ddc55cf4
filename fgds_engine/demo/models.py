"""The demos' models: the small CNN classifier, the pixel-space class-conditional generator and its training,
the cache of trained weights, and the classifier statistics the variants use."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.formulas import join_prediction
from ..progress_bars import progress_bar
from .config import NUM_CLASSES, DemoConfig

LOSS_WINDOW = 100  # training steps per point of a generator's loss curve


class SmallCNN(nn.Sequential):
    """The demo's classifier: three conv blocks and a linear head (its input: the penultimate features)."""

    def __init__(self, num_classes: int = NUM_CLASSES, channels: int = 1):
        super().__init__(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(64, num_classes))


class Cache:
    """Files under OUT/cache named by what produced them (a hash of the config fields they depend on)."""

    def __init__(self, folder: Path, log):
        self.folder, self.log = folder, log
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, key: dict) -> Path:
        h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.folder / f"{name}-{h}.pt"

    def model(self, name: str, key: dict, build, train) -> nn.Module:
        """The cached weights of ``build()`` if present, else ``train(model)`` and store them (and what
        ``train`` returns, if a dict, as JSON beside them with its seconds: ``info``)."""
        p = self.path(name, key)
        model = build()
        if p.exists():
            model.load_state_dict(torch.load(p, weights_only=True))
            self.log(f"  {name}: cached ({p.name})")
        else:
            t0 = time.perf_counter()
            info = train(model)
            seconds = time.perf_counter() - t0
            if isinstance(info, dict):
                p.with_suffix(".json").write_text(json.dumps(info | {"seconds": seconds}) + "\n")
            torch.save(model.state_dict(), p)
            self.log(f"  {name}: trained in {seconds:.0f} s")
        return model.eval()

    def info(self, name: str, key: dict) -> dict | None:
        """What the training of a cached model returned (None for one trained before it was kept)."""
        p = self.path(name, key).with_suffix(".json")
        return json.loads(p.read_text()) if p.exists() else None


def make_generator(cfg: DemoConfig):
    """Class-conditional pixel-space UNet2DModel with ``cfg.channels`` channels (class NUM_CLASSES is the null
    class) and its scheduler: DDIM for the DDPM objectives (epsilon or v prediction; ``cfg.clip_sample``),
    FlowMatchEuler (no shift: 16 px) for rectified flow."""
    from diffusers import DDIMScheduler, UNet2DModel

    levels = len(cfg.gen_channels)
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(sample_size=16, in_channels=cfg.channels, out_channels=cfg.channels,
                       block_out_channels=cfg.gen_channels, layers_per_block=1, down_block_types=down,
                       up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
                       num_class_embeds=NUM_CLASSES + 1, norm_num_groups=8)
    if cfg.objective == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return unet, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=cfg.clip_sample,
                          timestep_spacing="trailing", set_alpha_to_one=True,
                          prediction_type="v_prediction" if cfg.objective == "v" else "epsilon")
    return unet, sched


def train_generator(unet, sched, x: torch.Tensor, y: torch.Tensor, cfg: DemoConfig, progress: bool) -> dict:
    """DDPM epsilon-prediction training (``cfg.objective`` "v": the target sqrt(a) n - sqrt(1 - a) x0 at the
    same timesteps; "flow": rectified flow, the velocity n - x0 at a uniform noise level s, timestep 1000 s;
    the same budget) with label dropout to the null class (for CFG); with ``cfg.ema_decay`` the model ends
    with the EMA of its weights (diffusers ``EMAModel``, warm-up on). Returns the loss curve: the mean
    training loss of every ``LOSS_WINDOW`` steps."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.gen_lr, weight_decay=0.0)
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    acp = getattr(sched, "alphas_cumprod", None)
    unet.train()
    steps = progress_bar(range(cfg.gen_steps), progress, desc="  training the generator", unit="step",
                         leave=False)
    losses = []
    for _ in steps:
        i = torch.randint(0, len(x), (cfg.gen_batch,), generator=g)
        x0, c = x[i], y[i].clone()
        c[torch.rand(len(c), generator=g) < cfg.label_dropout] = NUM_CLASSES
        if cfg.objective == "flow":  # rectified flow: x_s = (1 - s) x0 + s n, the velocity n - x0
            sig = torch.rand(len(i), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            s4 = sig.view(-1, 1, 1, 1)
            xt, target, t = (1 - s4) * x0 + s4 * noise, noise - x0, sig * 1000
        else:
            t = torch.randint(0, 1000, (len(i),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            # the output the sampler reads back as (x0, noise): the noise, or v = sqrt(a) n - sqrt(1 - a) x0
            target = join_prediction(x0, noise, acp[t], sched.config.prediction_type)
        loss = F.mse_loss(unet(xt, t, class_labels=c).sample, target)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        if ema is not None:
            ema.step(unet.parameters())
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    windows = [losses[k:k + LOSS_WINDOW] for k in range(0, len(losses), LOSS_WINDOW)]
    return {"loss_window": LOSS_WINDOW, "loss_curve": [sum(w) / len(w) for w in windows]}


@contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to ``n`` inside, the caller's after: float reductions depend on the count, so a
    demo's numbers are the same whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seeded(seed: int, build):
    """``build()`` with torch's global generator seeded first (model initialisation independent of what ran
    before, cached or not)."""
    torch.manual_seed(seed)
    return build()


def class_stats(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The hardness criterion's class Gaussians on the classifier's penultimate features of (x, y). A plain
    loop, not ``train.extract_features``: its DataLoader draws from torch's global generator, which would
    change the initialisation of the long-tail demo's classifiers trained after it."""
    from ..criteria import GaussianClassStats
    from ..models import Classifier

    with torch.no_grad():
        feats = torch.cat([Classifier(classifier)(x[i:i + 256], with_features=True)[1]
                           for i in range(0, len(x), 256)])
    return GaussianClassStats.fit(feats, y, NUM_CLASSES)


def entropy(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = model(x).softmax(1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
