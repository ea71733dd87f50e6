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

__all__ = ["HFTextEncoder", "TextConfig", "TextEncoder", "WordTokenizer", "build_text_encoder"]

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
            print(
                f"privdiff: words the text encoder never saw (read as <unk>): {', '.join(sorted(unknown))}",
                file=sys.stderr,
            )
        return out

    def null_ids(self) -> Tensor:
        """The ids of "no text" (all ``<pad>``)."""
        return torch.zeros(self.max_length, dtype=torch.long)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        return cls(list(d["vocab"]), int(d["max_length"]))


@dataclass(frozen=True)
class TextConfig:
    """Size of privdiff's text encoder; recipe keys under ``ldm.text.``."""

    encoder: str = (
        "builtin"  # builtin: privdiff's own, trained on captions; or a local Hugging Face text model directory
    )
    width: int = (
        64  # token feature width = the UNet's cross-attention dimension (a Hugging Face encoder is projected to it)
    )
    layers: int = 2  # builtin only
    heads: int = 4  # builtin only
    max_length: int = 16  # tokens per prompt for a Hugging Face tokenizer (builtin: the longest caption)
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

    width = property(lambda self: self.config.width)

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
        positions = torch.arange(ids.shape[1], device=ids.device).expand(
            ids.shape[0], -1
        )  # per row, for per-example clipping
        x = self.token(ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class HFTokenizer:
    """A local Hugging Face tokenizer with privdiff's tokenizer interface (fixed-length id rows)."""

    def __init__(self, path: str, max_length: int):
        from transformers import AutoTokenizer

        self.path, self.max_length = str(path), int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(path), local_files_only=True)

    def encode(self, texts: list[str], *, warn: bool = False) -> Tensor:
        return self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids.to(torch.long)

    def null_ids(self) -> Tensor:
        """The ids of the empty prompt (special tokens and padding)."""
        return self.encode([""])[0]

    def to_dict(self) -> dict:
        return {"path": self.path, "max_length": self.max_length}


class HFTextEncoder(nn.Module):
    """A local Hugging Face text model (frozen unless fine-tuned on purpose) and a trained projection to ``width``."""

    width = property(lambda self: self.config.width)

    def __init__(self, config: TextConfig):
        super().__init__()
        from transformers import AutoModel

        self.config = config
        self.tokenizer = HFTokenizer(config.encoder, config.max_length)
        try:
            self.model = AutoModel.from_pretrained(config.encoder, local_files_only=True).requires_grad_(False)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"ldm.text.encoder={config.encoder}: not a local Hugging Face text model ({str(e).splitlines()[0][:160]})"
            ) from None
        hidden = self.model.config.hidden_size
        self.proj = nn.Linear(hidden, config.width)
        self.pad_id = self.tokenizer.tokenizer.pad_token_id

    def forward(self, ids: Tensor) -> Tensor:
        mask = None if self.pad_id is None else (ids != self.pad_id).long()
        return self.proj(self.model(input_ids=ids, attention_mask=mask).last_hidden_state)


def _tokenizer_dir(path: str) -> str:
    """The tokenizer of a text model directory: in it, or in a sibling ``tokenizer/`` (the diffusers pipeline layout)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"ldm.text.encoder={path}: no such directory (Hugging Face text models are read from disk, never downloaded)"
        )
    sibling = p.parent / "tokenizer"
    has_own = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"))
    return str(p if has_own or not sibling.is_dir() else sibling)


def build_text_encoder(config: TextConfig, *, class_names: tuple[tuple[str, ...], ...]) -> nn.Module:
    """privdiff's text encoder with the vocabulary of every caption of ``class_names``, or the local Hugging Face one."""
    if config.encoder == "builtin":
        return TextEncoder(WordTokenizer.for_classes(*class_names), config)
    return HFTextEncoder(config)
