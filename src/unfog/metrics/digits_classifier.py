"""A small CNN for 16x16 handwritten digits: accuracy of generated digits, and FID features.

Inception-v3 features mean nothing on 16x16 greyscale digits, so the digits FID uses the
128-d penultimate layer of this classifier instead, trained by us on the digits train split
(``unfog.datasets.digits``). The trained weights ship with the package
(``unfog/weights/digits_classifier.safetensors``, made by ``scripts/train_digit_classifier.py``);
``load_digit_classifier()`` returns them in eval mode.

    (B, 1, 16, 16) -conv3x3,ReLU,maxpool-> (B, 32, 8, 8) -conv3x3,ReLU,maxpool-> (B, 64, 4, 4)
        -flatten,linear,ReLU-> (B, 128) = features -linear-> (B, 10) = logits
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "digits_classifier.safetensors"
FORMAT = "unfog.digits_classifier.v1"


@dataclass(frozen=True)
class DigitClassifierConfig:
    image_size: int = 16  # input is (B, 1, image_size, image_size) in [-1, 1]
    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128
    num_classes: int = 10


@dataclass(frozen=True)
class DigitTrainConfig:
    """The training recipe; the seed and the number of epochs are arguments of the run."""

    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 2  # augmentation: random translation by up to this many pixels
    dropout: float = 0.25  # on the features, during training only


class DigitClassifier(nn.Module):
    def __init__(self, config: DigitClassifierConfig = DigitClassifierConfig(), dropout: float = 0.0):
        super().__init__()
        if config.image_size % 4 != 0:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x poolings), got {config.image_size}")
        self.config = config
        c1, c2 = config.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (config.image_size // 4) ** 2, config.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, 1, S, S) in [-1, 1]."""
        s = self.config.image_size
        if x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ValueError(f"expected images (B, 1, {s}, {s}), got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, S/2, S/2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, c2, S/4, S/4)
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, num_classes) logits


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (B, C, H, W) by up to ``max_shift`` pixels, filling with -1 (paper)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, C, H + 2m, W + 2m)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)  # (B, 1) each
    rows = (dy + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]  # (B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


@torch.no_grad()
def extract_features(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (N, feature_dim) of images (N, 1, S, S) in [-1, 1], batched."""
    return torch.cat([model.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` (N, 1, S, S) that ``model`` labels correctly."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    model.train(was_training)
    return correct / len(labels)


def train_digit_classifier(
    seed: int = 0,
    epochs: int = 30,
    *,
    config: DigitTrainConfig = DigitTrainConfig(),
    model_config: DigitClassifierConfig = DigitClassifierConfig(),
    verbose: bool = False,
) -> DigitClassifier:
    """Train on the digits train split (AdamW, cosine decay, random shifts); eval mode on return.

    Deterministic given ``seed``. It runs on one CPU thread: the net is so small that a
    second thread gains little (7 s against 9 s on an idle 2-core machine), while on shared
    cores OpenMP's spinning threads made it ten times slower (97 s against 11 s), and one
    thread also makes the result independent of the core count. Torch's global RNG and
    thread count are left as they were.
    """
    from unfog.datasets.digits import digits_tensors  # needs scikit-learn; only for training

    images, labels = digits_tensors("train", model_config.image_size)  # (N, 1, S, S), (N,)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, labels, seed, epochs, config, model_config, verbose).eval()
    finally:
        torch.set_num_threads(threads)


def _train(
    images: torch.Tensor,  # (N, 1, S, S) in [-1, 1]
    labels: torch.Tensor,  # (N,) int64
    seed: int,
    epochs: int,
    config: DigitTrainConfig,
    model_config: DigitClassifierConfig,
    verbose: bool,
) -> DigitClassifier:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter init and dropout use the global RNG
        model = DigitClassifier(model_config, dropout=config.dropout)
        steps_per_epoch = -(-len(labels) // config.batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(labels), generator=gen)
            for i in range(0, len(labels), config.batch_size):
                idx = order[i : i + config.batch_size]
                x = random_shift(images[idx], config.max_shift, gen)
                loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(f"epoch {epoch + 1:3d}/{epochs}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f}s")
    return model


def save_digit_classifier(model: DigitClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save weights with the model config (and any extra string metadata) to safetensors."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "model_config": json.dumps(asdict(model.config)), **(metadata or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def default_weights_path() -> Path:
    return Path(str(resources.files("unfog") / "weights" / WEIGHTS_FILE))


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (or the one at ``path``), in eval mode on the CPU."""
    from safetensors.torch import load_file

    path = default_weights_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no digit classifier weights at {path}; run scripts/train_digit_classifier.py")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a digit classifier file (format {meta.get('format')!r}, expected {FORMAT!r})")
    cfg = json.loads(meta["model_config"])
    model = DigitClassifier(DigitClassifierConfig(**{**cfg, "channels": tuple(cfg["channels"])}))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
