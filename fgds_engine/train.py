"""The thin training layer: a classifier on real + synthetic data, as the paper trains it.

Balanced Softmax (Ren et al. 2020): cross-entropy on ``logits + log p_y`` with p_y the class prior of the
training batches. With 50/50 mixed batches (half real at the real frequencies, half synthetic drawn
class-balanced) the prior the batches actually have is ``0.5 n_y / N + 0.5 / C``, and that is what is used.
Evaluation on a balanced test set reports overall, many-shot (> 100 training images), medium (20..100) and
few-shot (< 20) accuracy, and worst-group accuracy when groups are given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import IMAGENET_MEAN, IMAGENET_STD, check_fields, option
from .progress_bars import progress_bar

MANY, FEW = 100, 20  # many-shot: > MANY training images; few-shot: < FEW; medium: the rest


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor,
                          log_prior: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits + log_prior`` (Balanced Softmax; log_prior [C], e.g. log counts)."""
    return F.cross_entropy(logits.float() + log_prior.to(logits.device, torch.float32), labels)


def batch_log_prior(real_counts: Sequence[int], mixed: bool) -> torch.Tensor:
    """log of the class prior of the training batches: the real frequencies, or with 50/50 mixed batches and
    class-balanced synthetic halves, 0.5 n_y / N + 0.5 / C."""
    n = torch.tensor(real_counts, dtype=torch.float64)
    prior = n / n.sum()
    if mixed:
        prior = 0.5 * prior + 0.5 / len(n)
    return prior.clamp_min(1e-12).log().float()


class MixedBatchSampler:
    """Batches of indices into ``ConcatDataset([real, synthetic])``: exactly half real, half synthetic.

    Real side: a fresh permutation of the real set each epoch (its natural class frequencies). Synthetic side:
    rounds of one sample per class in random order, so over an epoch every class appears equally often (to
    within one); within a class, its samples in a fresh random order. An epoch has ceil(N_real / (B/2))
    batches. Without synthetic data, plain shuffled batches of the real set. Deterministic given the seed and
    the epoch (``set_epoch``), which makes resumed training exact.
    """

    def __init__(self, real_labels: Sequence[int], synthetic_labels: Sequence[int] | None, batch_size: int, *,
                 seed: int = 0):
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be even and >= 2 for 50/50 batches, got {batch_size}")
        self.real = list(map(int, real_labels))
        self.synth = None if not synthetic_labels else list(map(int, synthetic_labels))
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        if self.synth is not None:
            self.by_class: dict[int, list[int]] = {}
            for i, y in enumerate(self.synth):
                self.by_class.setdefault(y, []).append(len(self.real) + i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.synth is None:
            return math.ceil(len(self.real) / self.batch_size)
        return math.ceil(len(self.real) / (self.batch_size // 2))

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.synth is None:
            perm = torch.randperm(len(self.real), generator=g).tolist()
            yield from (perm[i:i + self.batch_size] for i in range(0, len(perm), self.batch_size))
            return
        half, n = self.batch_size // 2, len(self)
        real = []
        while len(real) < n * half:
            real += torch.randperm(len(self.real), generator=g).tolist()
        classes = sorted(self.by_class)
        queues = {c: [] for c in classes}
        synth = []
        while len(synth) < n * half:
            for k in torch.randperm(len(classes), generator=g).tolist():
                c = classes[k]
                if not queues[c]:
                    items = self.by_class[c]
                    queues[c] = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
                synth.append(queues[c].pop())
        for b in range(n):
            yield real[b * half:(b + 1) * half] + synth[b * half:(b + 1) * half]


@dataclass(frozen=True)
class TrainConfig:
    """Classifier training. Defaults: the paper's SGD recipe scaled down (its ImageNet-LT run: 150 epochs,
    lr 0.1, weight decay 5e-4)."""

    epochs: int = option(30, "training epochs", low=1)
    batch_size: int = option(64, "images per batch (with --synthetic: half real, half synthetic)", low=2)
    lr: float = option(0.05, "SGD learning rate", low=0.0)
    momentum: float = option(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = option(5e-4, "weight decay", low=0.0)
    schedule: str = option("cosine", "cosine | step (x0.1 at 60% and 85%)")
    balanced_softmax: bool = option(True, "Balanced Softmax loss")
    amp: bool = option(True, "bfloat16 autocast on CUDA")
    seed: int = option(0, "seed of the batches")

    def __post_init__(self):
        check_fields(self)
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")


def _scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    marks = (int(0.6 * total), int(0.85 * total))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** sum(s >= m for m in marks))


def _save(path: Path, state: dict) -> None:
    from .writers import atomic_write

    atomic_write(path, lambda f: torch.save(state, f))


def train_classifier(model: nn.Module, real, real_labels: Sequence[int], synthetic=None,
                     synthetic_labels: Sequence[int] | None = None, *, config: TrainConfig | None = None,
                     num_classes: int | None = None, checkpoint: str | Path | None = None,
                     stop_after_epoch: int | None = None, progress: bool = False) -> list[dict]:
    """Train ``model`` in place; returns per-epoch {"epoch", "loss", "lr"}.

    Args:
        real, synthetic: datasets of (image, label); labels also given as sequences (no pass over the data).
        checkpoint: a file written after every epoch (model, optimizer, schedule, history); if it exists,
            training resumes from it and ends with the same weights as an uninterrupted run.
        stop_after_epoch: end early after this epoch (to test resuming).
    """
    cfg = config or TrainConfig()
    device = next(model.parameters()).device
    num_classes = num_classes or (max(real_labels) + 1)
    counts = torch.bincount(torch.as_tensor(list(real_labels)), minlength=num_classes).tolist()
    mixed = synthetic is not None and len(synthetic) > 0
    log_prior = batch_log_prior(counts, mixed).to(device)
    data = torch.utils.data.ConcatDataset([real, synthetic]) if mixed else real
    sampler = MixedBatchSampler(real_labels, synthetic_labels if mixed else None, cfg.batch_size,
                                seed=cfg.seed)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg, len(sampler))
    history, start = [], 0
    path = Path(checkpoint) if checkpoint else None
    if path is not None and path.exists():
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
    amp = cfg.amp and device.type == "cuda"
    epochs = progress_bar(range(start, cfg.epochs), progress, desc="training", unit="epoch", initial=start,
                          total=cfg.epochs)
    for epoch in epochs:
        model.train()
        sampler.set_epoch(epoch)
        total, n = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            if cfg.balanced_softmax:
                loss = balanced_softmax_loss(logits, y, log_prior)
            else:
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(y), n + len(y)
        history.append({"epoch": epoch + 1, "loss": total / max(n, 1), "lr": sched.get_last_lr()[0]})
        if path is not None:
            _save(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "history": history, "epoch": epoch + 1,
                         "config": asdict(cfg)})
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    model.eval()
    return history


def shot_groups(train_counts: Sequence[int], many: int = MANY, few: int = FEW) -> dict[str, list[int]]:
    """Classes by training-set size: many (> many), medium (few..many), few (< few)."""
    out = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        out["many" if n > many else "few" if n < few else "medium"].append(c)
    return out


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max class of every image (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def class_errors(model: nn.Module, dataset: ImageList, classes: Sequence[str]) -> dict[str, float]:
    """The error rate of ``model`` on each class of ``dataset`` (label i: ``classes[i]``; ``fgds plan
    --allocate errors``)."""
    preds, labels = predict(model, torch.stack([x for x, _ in dataset])), torch.tensor(dataset.labels)
    return {c: 1 - (preds[labels == i] == i).float().mean().item() for i, c in enumerate(classes)}


def evaluate(predictions: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int] | None, *,
             groups: torch.Tensor | None = None, many: int = MANY, few: int = FEW) -> dict:
    """Accuracy overall (mean over test samples), per class, per shot group (mean over the group's test
    samples; None for an empty group; no shot groups without ``train_counts``) and, with ``groups`` (a
    group id per test sample), per group (``per_group``: {group id: accuracy}), the worst group's accuracy
    (``worst_group``) and its id (``worst_group_id``, the smallest id on a tie)."""
    correct = (predictions == labels).float()
    classes = range(len(train_counts)) if train_counts is not None else labels.unique().tolist()
    per_class = {c: correct[labels == c].mean().item() for c in classes if (labels == c).any()}
    out = {"overall": correct.mean().item(), "per_class": per_class}
    shots = shot_groups(train_counts, many, few) if train_counts is not None else {}
    for name, classes in shots.items():
        mask = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
        out[name] = correct[mask].mean().item() if mask.any() else None
    if groups is not None:
        per_group = {int(g): correct[groups == g].mean().item() for g in groups.unique().tolist()}
        worst = min(per_group, key=lambda g: (per_group[g], g))
        out.update(per_group=per_group, worst_group=per_group[worst], worst_group_id=worst)
    return out


def format_table(rows: dict[str, dict], columns: Sequence[str] = ("overall", "many", "medium", "few"),
                 headers: Sequence[str] | None = None) -> str:
    """Accuracy table (in %), one row per variant, one column per key of its metrics (None: "-")."""
    cell = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    headers = list(headers or columns)
    widths = [max(6, len(h)) for h in headers]
    lines = [f"{'':22}" + "".join(f" {h:>{w}}" for h, w in zip(headers, widths))]
    for name, m in rows.items():
        lines.append(f"{name:22}" + "".join(f" {cell(m[c]):>{w}}" for c, w in zip(columns, widths)))
    return "\n".join(lines)


def save_metrics(path: str | Path, metrics: dict) -> None:
    Path(path).write_text(json.dumps(metrics, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- folders


class ImageList(torch.utils.data.Dataset):
    """Images from a list of paths with given labels (real and synthetic folders share class indices by
    class name, even where a synthetic folder lacks a class)."""

    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


def folder_dataset(root: str | Path, classes: list[str], transform, *, required: bool = True) -> ImageList:
    """ImageList of root/<class>/<image> for the given classes (index = position in ``classes``)."""
    from .data import image_files
    from .errors import InputError

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"folder {root} does not exist")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = image_files(root / c)
        if required and not files:
            raise InputError(f"class {c!r} has no images in {root}")
        paths += [root / c / f for f in files]
        labels += [i] * len(files)
    return ImageList(paths, labels, transform)


def image_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to ``size``, center crop, tensor, normalise (no augmentation)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


@torch.no_grad()
def iter_features(classifier: nn.Module, dataset, *, batch_size: int = 64, progress: bool = False):
    """Batches of (penultimate features [n, D] fp32 on the CPU, labels [n]), via ``models.Classifier``."""
    from .models import Classifier

    clf = classifier if isinstance(classifier, Classifier) else Classifier(classifier)
    clf.eval()
    device = next(clf.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    with torch.no_grad():
        for x, y in progress_bar(loader, progress, desc="features", unit="batch"):
            yield clf(x.to(device), with_features=True)[1].float().cpu(), torch.as_tensor(y)


def extract_features(classifier: nn.Module, dataset, *, batch_size: int = 64, progress: bool = False):
    """(penultimate features [N, D], labels [N]) of a dataset, via ``models.Classifier``."""
    feats, labels = zip(*iter_features(classifier, dataset, batch_size=batch_size, progress=progress))
    return torch.cat(feats), torch.cat(labels)
