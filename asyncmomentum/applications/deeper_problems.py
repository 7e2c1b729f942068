"""Two problems closer to what users train, small enough for the ``--quick`` sweep on 2 cores.

- ``resnet``: a residual CNN with batch normalization (two residual blocks, 16 channels) on
  scikit-learn's digits; batch statistics in training and in the full loss alike
  (``track_running_stats=False``), so a run is a pure function of its parameters.
- ``charlm``: a one-layer causal transformer (2 heads, width 32) that predicts the next byte of
  Python source: the standard library's own ``.py`` files, which every Python install has.
  The corpus is a fixed list of modules read from the running interpreter's library, so two
  machines with the same Python minor version see the same bytes.

They plug into :data:`asyncmomentum.applications.problems.PROBLEMS` like the others; their
calibration is in that module's docstring.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CHARLM_CONTEXT",
    "CharLM",
    "ResidualCNN",
    "charlm_batches",
    "charlm_eval_batch",
    "charlm_loss",
    "load_corpus",
]

# -- resnet ---------------------------------------------------------------------------------------


class _Block(nn.Module):
    """``x + conv-bn-relu-conv-bn(x)``, then ReLU: the basic residual block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, track_running_stats=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResidualCNN(nn.Module):
    """A small ResNet for ``(N, 1, 8, 8)`` digits: stem, two residual blocks, pooling, linear.

    Batch norm always uses the batch's statistics (no running averages), so the full training
    loss is a function of the parameters alone.

    Args:
        channels: width of the stem and the blocks.
        classes: number of classes.
    """

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(_Block(channels), _Block(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images shaped ``(N, 1, 8, 8)``."""
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


# -- charlm ---------------------------------------------------------------------------------------

#: Modules of the standard library whose source is the corpus (in this order).
CORPUS_MODULES: tuple[str, ...] = (
    "textwrap.py",
    "string.py",
    "bisect.py",
    "heapq.py",
    "fnmatch.py",
    "glob.py",
    "shlex.py",
    "calendar.py",
)
#: Bytes of the corpus used (the head of the concatenated modules).
CORPUS_BYTES = 120_000
#: Vocabulary: the 128 ASCII bytes (any other byte is mapped to 0).
VOCAB = 128
#: Characters the model sees at once (and predicts, shifted by one).
CHARLM_CONTEXT = 32
#: Sequences per training batch.
CHARLM_BATCH = 16
#: Sequences of the fixed evaluation batch on which the "full" loss is measured.
CHARLM_EVAL_SEQUENCES = 256


@lru_cache(maxsize=1)
def load_corpus() -> torch.Tensor:
    """The corpus as a 1-D ``int64`` tensor of byte codes (< :data:`VOCAB`).

    Raises:
        FileNotFoundError: this Python has none of :data:`CORPUS_MODULES` as source.
    """
    library = Path(sysconfig.get_paths()["stdlib"])
    chunks = [
        (library / name).read_bytes() for name in CORPUS_MODULES if (library / name).is_file()
    ]
    if not chunks:
        raise FileNotFoundError(
            f"the charlm problem reads the standard library's source, and {library} holds none "
            f"of {list(CORPUS_MODULES)}"
        )
    data = torch.frombuffer(bytearray(b"".join(chunks)[:CORPUS_BYTES]), dtype=torch.uint8)
    data = data.long()
    return torch.where(data < VOCAB, data, torch.zeros_like(data))


def _windows(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    corpus = load_corpus()
    index = starts[:, None] + torch.arange(CHARLM_CONTEXT + 1)[None, :]
    sequences = corpus[index]
    return sequences[:, :-1], sequences[:, 1:]


def charlm_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless seeded stream of ``(inputs, next bytes)`` batches of random windows.

    Args:
        seed: seeds the window positions.
    """
    gen = torch.Generator().manual_seed(seed)
    high = load_corpus().numel() - CHARLM_CONTEXT - 1
    while True:
        yield _windows(torch.randint(0, high, (CHARLM_BATCH,), generator=gen))


def charlm_eval_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of evenly spaced windows: the data the "full" loss is measured on.

    Args:
        seed: unused (the evaluation data is the same for every seed); kept for the
            problem's ``curvature_batch`` signature.
    """
    high = load_corpus().numel() - CHARLM_CONTEXT - 1
    starts = torch.linspace(0, high, CHARLM_EVAL_SEQUENCES).long()
    return _windows(starts)


class CharLM(nn.Module):
    """A one-layer causal transformer over bytes: embedding, one encoder layer, a linear head.

    Args:
        width: model width.
        heads: attention heads.
    """

    mask: torch.Tensor  # a buffer

    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(CHARLM_CONTEXT, width) / math.sqrt(width))
        self.layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=2 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.head = nn.Linear(width, VOCAB)
        mask = torch.triu(torch.full((CHARLM_CONTEXT, CHARLM_CONTEXT), -math.inf), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte logits, shaped ``(N, T, VOCAB)``, of byte codes shaped ``(N, T)``."""
        steps = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:steps]
        hidden = self.layer(hidden, src_mask=self.mask[:steps, :steps], is_causal=True)
        return self.head(hidden)


def charlm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-byte cross-entropy of a batch.

    Args:
        model: a :class:`CharLM`.
        batch: ``(inputs, targets)``, both ``(N, T)`` byte codes.
    """
    inputs, targets = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
