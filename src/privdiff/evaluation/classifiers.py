"""The small classifiers of the DP image-synthesis papers, and their one training loop.

Used twice: as the downstream classifiers (train on synthetic, test on real) and, trained on
public data, as the feature network of FID/KID/precision/recall. Inputs are float images
``[N, C, H, W]`` in [0, 1], the convention of every privdiff evaluation function.

Model selection (the epoch kept) is made on a held-out part of the *training* data only; the
caller scores the kept model on the real test split once, afterwards.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


class SmallCNN(nn.Module):
    """DPDM's downstream CNN: Conv32/64/128 (3×3, each with 2×2 max-pool and dropout 0.5) → FC128 → FC.

    ``embed`` returns the 128-d penultimate activations: the feature space of privdiff's FID.
    """

    num_features = 128

    def __init__(self, *, in_channels: int, num_classes: int, resolution: int):
        super().__init__()
        if resolution < 8:
            raise ValueError(f"SmallCNN needs images of at least 8x8 pixels, got {resolution}")
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5)]
        side = resolution // 8
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(128 * side * side, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x * 2 - 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the pixels (DPDM's "LogReg" column)."""

    def __init__(self, *, in_channels: int, num_classes: int, resolution: int):
        super().__init__()
        self.linear = nn.Linear(in_channels * resolution * resolution, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear((x * 2 - 1).flatten(1))


CLASSIFIERS: dict[str, type[nn.Module]] = {"cnn": SmallCNN, "logreg": LogisticRegression}


class Embedding(nn.Module):
    """A trained :class:`SmallCNN` as a feature extractor ``[N, C, H, W] in [0, 1] -> [N, 128]``.

    Features are divided by ``scale`` (their RMS on the network's own training data), so that
    they have Inception-like magnitude: KID's kernel (x·y/d + 1)³ is then not dominated by the
    features' mean. torchmetrics reads ``num_features``; the network stays in eval mode.
    """

    def __init__(self, cnn: SmallCNN, *, scale: float = 1.0):
        super().__init__()
        self.cnn = cnn.eval().requires_grad_(False)
        self.num_features = cnn.num_features
        self.scale = scale

    def train(self, mode: bool = True) -> "Embedding":  # never leave eval mode (dropout off)
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.cnn.embed(x.float()) / self.scale


@dataclass
class FitResult:
    model: nn.Module  # with the weights of the selected epoch, in eval mode
    selected_epoch: int  # 1-based
    epochs: int
    val_accuracy: float
    history: list[float] = field(default_factory=list)  # held-out accuracy after each epoch


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000) -> float:
    """Fraction of ``x`` that ``model`` labels as ``y``."""
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / max(len(x), 1)


def holdout_split(n: int, *, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Random (fit, held-out) index split of ``range(n)``; the held-out part has at least one example."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(n - 1, max(1, round(fraction * n)))
    return perm[k:], perm[:k]


def fit_classifier(
    kind: str,
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    holdout: float = 0.1,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> FitResult:
    """Train a ``kind`` classifier ("cnn" | "logreg") on ``(x, y)`` with Adam; keep the best epoch.

    A fraction ``holdout`` of ``(x, y)`` is set aside and the epoch with the best accuracy on it
    is returned: selection never looks at any data but the training data given here.
    """
    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown classifier '{kind}' (known: {', '.join(CLASSIFIERS)})")
    if x.ndim != 4 or len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"fit_classifier needs images [N, C, H, W] with N >= 2 and one label each, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    torch.manual_seed(seed)
    fit, held = holdout_split(len(x), fraction=holdout, seed=seed)
    model = CLASSIFIERS[kind](in_channels=x.shape[1], num_classes=num_classes, resolution=x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    best, best_acc, best_epoch, history = None, -1.0, 0, []
    bar = tqdm(
        range(1, epochs + 1), desc=desc or kind, unit="epoch", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    for epoch in bar:
        model.train()
        order = fit[torch.randperm(len(fit), generator=g)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(model, x[held], y[held])
        history.append(acc)
        if acc > best_acc:
            best, best_acc, best_epoch = copy.deepcopy(model.state_dict()), acc, epoch
        bar.set_postfix(held_out=f"{acc:.3f}", best=f"{best_acc:.3f}@{best_epoch}", refresh=False)
    model.load_state_dict(best)
    return FitResult(
        model=model.eval(), selected_epoch=best_epoch, epochs=epochs, val_accuracy=best_acc, history=history
    )
