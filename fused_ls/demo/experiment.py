"""One training run of the demo: data split, label noise, model, training with smoothed_xent,
temperature scaling and the clean-test metrics.

Everything random in a run comes from its seed, and runs that share a seed share their
data split, their noisy labels and their initial weights: a setting with label smoothing
and one without differ only in the loss, so the comparison between them is paired.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fused_ls import smoothed_xent

NUM_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram


@dataclass(frozen=True)
class Preset:
    """What is trained, on how much data, for how long."""

    purpose: str
    train_size: int  # images the model is trained on, drawn from the 60000 training images
    holdout_size: int  # further training images, never trained on, that temperature scaling is fitted on
    hidden: tuple[int, ...]  # widths of the MLP's hidden layers; () is a linear softmax classifier
    epochs: int
    batch_size: int
    lr: float  # Adam, no weight decay

    def summary(self, in_features: int = 784, num_classes: int = 10) -> str:
        widths = "-".join(str(w) for w in (in_features, *self.hidden, num_classes))
        model = f"MLP {widths}" if self.hidden else f"linear {widths}"
        return f"{model}, {self.epochs} epochs over {self.train_size} images"


PRESETS = {
    # Many epochs over few images with a model big enough to fit them: training accuracy
    # reaches ~95% against ~84% on test, and test confidence runs ahead of test accuracy,
    # the over-confidence that label smoothing is reported to cure (Guo et al. 2017;
    # Mueller, Kornblith & Hinton 2019).
    "overconfident": Preset(
        purpose="fits its few images far better than new ones and becomes over-confident",
        train_size=5000, holdout_size=5000, hidden=(256, 256), epochs=20, batch_size=128, lr=1e-3,
    ),
    # The same network, two passes over ten times the data: it stops long before it can
    # overfit, and plain cross-entropy already leaves it close to calibrated.
    "calibrated": Preset(
        purpose="stops long before it overfits; close to calibrated without smoothing",
        train_size=50000, holdout_size=5000, hidden=(256, 256), epochs=2, batch_size=128, lr=1e-3,
    ),
}


@dataclass(frozen=True)
class Setting:
    """The loss and the labels of one cell of the experiment (everything but the seed)."""

    label_smoothing: float
    convention: str  # "uniform" or "others"; "none" at label_smoothing 0, where the two coincide
    noise: float  # fraction of training labels (train and held-out split) replaced by another class

    @property
    def name(self) -> str:
        smoothing = "no smoothing" if self.label_smoothing == 0 else f"LS {self.label_smoothing:g} ({self.convention})"
        return f"{smoothing}, noise {self.noise:.0%}"


@dataclass
class Split:
    """One seed's data, on the training device, images already flattened and normalised."""

    train_x: torch.Tensor
    train_y_clean: torch.Tensor
    holdout_x: torch.Tensor
    holdout_y_clean: torch.Tensor
    noise_order: torch.Tensor  # permutation of train+holdout rows: the first round(noise * n) get a wrong label
    wrong_label_shift: torch.Tensor  # 1..C-1 per row: a corrupted label is (label + shift) mod C
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def noisy_labels(self, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and held-out labels with exactly round(noise * n) of them moved to a uniformly random
        other class (symmetric noise). The corrupted rows for a lower rate are a subset of those for
        a higher one, so noise levels are nested for a given seed."""
        clean = torch.cat([self.train_y_clean, self.holdout_y_clean])
        n_corrupt = round(noise * clean.numel())
        corrupt = self.noise_order[:n_corrupt]
        noisy = clean.clone()
        noisy[corrupt] = (clean[corrupt] + self.wrong_label_shift[corrupt]) % self.num_classes
        return noisy[: self.train_y_clean.numel()], noisy[self.train_y_clean.numel():]


def make_split(data: dict[str, torch.Tensor], preset: Preset, seed: int, device: torch.device) -> Split:
    images, labels = data["train_images"], data["train_labels"]
    needed = preset.train_size + preset.holdout_size
    if needed > images.shape[0]:
        raise ValueError(
            f"train size {preset.train_size} + held-out size {preset.holdout_size} = {needed} exceeds the "
            f"{images.shape[0]} training images"
        )
    num_classes = int(max(labels.max(), data["test_labels"].max())) + 1
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randperm(images.shape[0], generator=generator)[:needed]
    train_idx, holdout_idx = pool[: preset.train_size], pool[preset.train_size:]
    pixels = images[train_idx].float().div_(255)
    mean, std = pixels.mean(), pixels.std()  # from the training subset alone: nothing leaks from test

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).float().div_(255).sub_(mean).div_(std).to(device)

    return Split(
        train_x=prepare(images[train_idx]),
        train_y_clean=labels[train_idx].to(device),
        holdout_x=prepare(images[holdout_idx]),
        holdout_y_clean=labels[holdout_idx].to(device),
        noise_order=torch.randperm(needed, generator=generator).to(device),
        wrong_label_shift=torch.randint(1, num_classes, (needed,), generator=generator).to(device),
        test_x=prepare(data["test_images"]),
        test_y=data["test_labels"].to(device),
        num_classes=num_classes,
    )


def make_model(in_features: int, hidden: tuple[int, ...], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), by L-BFGS on log T."""
    logits = logits.detach().float()
    log_t = torch.zeros((), device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, 15-bin L1 ECE (torchmetrics) and mean top-1 confidence of `logits` against `labels`."""
    from torchmetrics.classification import MulticlassCalibrationError

    probs = logits.float().softmax(dim=-1)
    ece = MulticlassCalibrationError(num_classes=logits.shape[-1], n_bins=NUM_BINS, norm="l1").to(logits.device)
    confidence, prediction = probs.max(dim=-1)
    return {
        "accuracy": float((prediction == labels).float().mean()),
        "nll": float(F.cross_entropy(logits.float(), labels)),
        "ece": float(ece(probs, labels)),
        "confidence": float(confidence.mean()),
    }


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Per confidence bin: the count, the summed top-1 confidence and the number correct.

    Sums rather than means, so that bins add up over seeds. The bins are torchmetrics' own
    (equal width, right-closed), so that sum_b |correct_b - confidence_b| / N is its ECE.
    """
    confidence, prediction = logits.float().softmax(dim=-1).max(dim=-1)
    edges = torch.linspace(0, 1, NUM_BINS + 1, device=logits.device)
    bins = (torch.bucketize(confidence, edges, right=True) - 1).clamp_(0, NUM_BINS - 1)
    zeros = torch.zeros(NUM_BINS, device=logits.device)
    return {
        "count": zeros.index_add(0, bins, torch.ones_like(confidence)).tolist(),
        "confidence_sum": zeros.index_add(0, bins, confidence).tolist(),
        "correct_sum": zeros.index_add(0, bins, (prediction == labels).float()).tolist(),
    }


def train_and_evaluate(split: Split, preset: Preset, setting: Setting, seed: int, *, backend: str = "auto",
                       clean_holdout: bool = False, on_epoch=lambda: None) -> dict:
    """Train one model and measure it on the clean test set, before and after temperature scaling.

    The temperature is fitted on the held-out split with the labels it has in this setting (noisy
    when the training labels are), unless `clean_holdout`: a clean validation set is a luxury
    that noisy-label training seldom has.
    """
    train_y, holdout_y = split.noisy_labels(setting.noise)
    if clean_holdout:
        holdout_y = split.holdout_y_clean
    convention = "uniform" if setting.label_smoothing == 0 else setting.convention
    torch.manual_seed(seed)  # the same initial weights for every setting of this seed
    model = make_model(split.train_x.shape[1], preset.hidden, split.num_classes).to(split.train_x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    shuffle = torch.Generator().manual_seed(seed)
    n = split.train_x.shape[0]
    started = time.perf_counter()
    model.train()
    for _ in range(preset.epochs):
        for batch in torch.randperm(n, generator=shuffle).to(split.train_x.device).split(preset.batch_size):
            loss = smoothed_xent(
                model(split.train_x[batch]), train_y[batch], setting.label_smoothing,
                convention=convention, backend=backend,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        on_epoch()
    train_seconds = time.perf_counter() - started

    model.eval()
    with torch.no_grad():
        test_logits = model(split.test_x)
        holdout_logits = model(split.holdout_x)
        train_accuracy = float((model(split.train_x).argmax(-1) == train_y).float().mean())
    temperature = fit_temperature(holdout_logits, holdout_y)
    scaled = test_logits / temperature
    return {
        "seed": seed,
        "train_accuracy": train_accuracy,  # on the (possibly noisy) labels it was trained on
        "temperature": temperature,
        "train_seconds": train_seconds,
        "before": calibration_metrics(test_logits, split.test_y),
        "after_ts": calibration_metrics(scaled, split.test_y),
        "bins_before": reliability_bins(test_logits, split.test_y),
        "bins_after_ts": reliability_bins(scaled, split.test_y),
    }


def preset_dict(preset: Preset) -> dict:
    out = asdict(preset)
    out["hidden"] = list(preset.hidden)
    return out
