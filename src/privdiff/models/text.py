"""A small text encoder that privdiff trains itself: word tokenizer + pre-norm transformer.

Text-to-image models condition on the per-token outputs of a text encoder through
cross-attention. No pretrained encoder is downloaded; privdiff's is trained jointly with the
latent diffusion model on captions of public data (as latent diffusion trains its BERT-style
conditioner from scratch). It is built only from Embedding, Linear and LayerNorm layers, so
every part of it can be fine-tuned with per-example clipping.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.captions import caption_variants, words

__all__ = ["TextConfig", "TextEncoder", "WordTokenizer"]

PAD, UNK = "<pad>", "<unk>"


class WordTokenizer:
    """Whole-word vocabulary; texts become fixed-length id rows, padded with ``<pad>`` (id 0)."""

    def __init__(self, vocab: list[str], max_length: int):
        if vocab[:2] != [PAD, UNK]:
            raise ValueError("vocab must start with <pad>, <unk>")
        self.vocab, self.max_length = list(vocab), int(max_length)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def for_classes(cls, *class_name_sets: tuple[str, ...]) -> "WordTokenizer":
        """The vocabulary of every caption of every class, sorted (the same on every machine)."""
        texts = [text for names in class_name_sets for name in names for text in caption_variants(name)]
        vocab = sorted({w for text in texts for w in words(text)})
        return cls([PAD, UNK, *vocab], max(len(words(t)) for t in texts))

    def encode(self, texts: list[str], *, warn: bool = False) -> Tensor:
        """[len(texts), max_length] long ids; unknown words map to ``<unk>``, long texts are cut."""
        out = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        unknown: set[str] = set()
        for i, text in enumerate(texts):
            toks = words(text)
            unknown |= {w for w in toks if w not in self.ids}
            ids = [self.ids.get(w, 1) for w in toks][: self.max_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if warn and unknown:
            print(f"privdiff: words the text encoder never saw (read as <unk>): {', '.join(sorted(unknown))}", file=sys.stderr)
        return out

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        return cls(list(d["vocab"]), int(d["max_length"]))


@dataclass(frozen=True)
class TextConfig:
    """Size of privdiff's text encoder; recipe keys under ``ldm.text.``."""

    width: int = 64  # token embedding width = the UNet's cross-attention dimension
    layers: int = 2
    heads: int = 4
    caption_dropout: float = 0.1  # p of training a draw with the empty caption (classifier-free guidance)


class _Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        R, L, D = x.shape
        # q, k, v per head from LN(x)
        q, k, v = self.qkv(self.norm1(x)).view(R, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # x ← x + W_o·softmax(q kᵀ/√d)·v
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(R, L, D))
        # x ← x + W₂·GELU(W₁·LN(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    """Token ids [R, L] → per-token features [R, L, width] (token + position embeddings, blocks, final LayerNorm)."""

    def __init__(self, tokenizer: WordTokenizer, config: TextConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"ldm.text.width={config.width} is not divisible by ldm.text.heads={config.heads}")
        self.tokenizer, self.config = tokenizer, config
        self.token = nn.Embedding(len(tokenizer.vocab), config.width)
        self.position = nn.Embedding(tokenizer.max_length, config.width)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)  # per row, for per-example clipping
        x = self.token(ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
