"""Audio encoders: a log-mel CNN for short clips, an ImageBind-style spectrogram ViT, and HF AST.

A raw audio item is a path to a WAV/FLAC file, a ``(waveform, sample_rate)`` tuple, or a 1-D
``(samples,)`` / 2-D ``(channels, samples)`` array or tensor already at the encoder's sample rate.
:mod:`encoders.audio_io` mixes it down to mono, resamples it and cuts it into clips of ``clip_seconds``: a
long recording gives up to ``max_clips`` evenly spaced clips whose embeddings are averaged, a short one is
zero-padded. The CNN and the ViT take features from :class:`~encoders.audio_frontend.AudioFrontend`; AST
uses its own feature extractor.

Example::

    enc = create_encoder("audio_cnn", embed_dim=64)
    z = enc.embed(["recordings/7_jackson_0.wav", (np.zeros(16000), 16000)])  # (2, 64)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from bind import ConfigError, HeadKind, ModalityEncoder, find_blocks, register_encoder

from ._hf import export_hf, hf_path_check, load_hf_model, load_hf_processor
from ._transformer import pre_norm_blocks
from .audio_augment import AudioAugment
from .audio_frontend import AudioFrontend, FeatureKind, NormKind
from .audio_io import AUDIO_SUFFIXES, example_waveforms, load_audio_clips
from .image_augment import augments_as


class SpectrogramEncoder(ModalityEncoder):
    """Audio encoder whose trunk takes ``(B, 1, n_mels, frames)`` features from an :class:`AudioFrontend`."""

    file_suffixes = AUDIO_SUFFIXES

    def __init__(
        self,
        trunk: nn.Module,
        trunk_dim: int,
        embed_dim: int,
        frontend: AudioFrontend,
        clip_seconds: float,
        max_clips: int,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        super().__init__("audio", trunk, trunk_dim, embed_dim, head, logit_scale, learnable_logit_scale)
        if max_clips < 1 or clip_seconds <= 0:
            raise ConfigError(f"need max_clips >= 1 and clip_seconds > 0, got {max_clips} and {clip_seconds}")
        self.frontend = frontend  # a plain object: not moved by .to(), preprocessing stays on the CPU
        self.clip_samples = round(clip_seconds * frontend.sample_rate)
        self.max_clips = max_clips

    def preprocess(self, item: Any) -> Tensor:
        """Raw audio -> ``(num_clips, 1, n_mels, frames)``."""
        clips, valid = load_audio_clips(item, self.frontend.sample_rate, self.clip_samples, self.max_clips)
        return self.frontend(clips, valid)[:, None]

    def preprocess_many(
        self, items: Sequence[Any], augment: Any = None, generators: Sequence[torch.Generator] | None = None
    ) -> list[Any]:
        """The clips of a batch through the frontend together (one STFT, one mel product): the values of
        :meth:`preprocess` item by item, with :class:`AudioAugment`'s waveform and feature steps around it."""
        if augment is not None and not augments_as(augment, AudioAugment):
            return super().preprocess_many(items, augment, generators)
        gens = generators if augment is not None else [None] * len(items)
        raws = items if augment is None else [augment.augment_raw(item, g) for item, g in zip(items, gens, strict=True)]
        loaded = [load_audio_clips(raw, self.frontend.sample_rate, self.clip_samples, self.max_clips) for raw in raws]
        clips, valid = torch.cat([c for c, _ in loaded]), torch.cat([v for _, v in loaded])
        feats = self.frontend(clips, valid)[:, None].split([len(c) for c, _ in loaded])
        if augment is None:
            return list(feats)
        return [augment.augment_tensor(x, g) for x, g in zip(feats, gens, strict=True)]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_waveforms(n, seed)

    def collate(self, samples: list[Tensor]) -> Any:
        return self.collate_clips(samples)

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)


class AudioCNN(nn.Module):
    """Conv3x3-BN-ReLU blocks, width doubling and 2x2 max pooling every two blocks, global average pool."""

    def __init__(self, width: int, depth: int, dropout: float) -> None:
        super().__init__()
        blocks, channels = [], 1
        for i in range(depth):
            out = width * 2 ** (i // 2)
            layers = [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil_mode: a 1-pixel map stays 1 pixel
            blocks.append(nn.Sequential(*layers))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.dropout(x.mean(dim=(-2, -1)))


class SpectrogramViT(nn.Module):
    """ImageBind-style audio ViT: overlapping 2-D patches, CLS token, learned positions, pre-norm blocks."""

    def __init__(
        self,
        n_mels: int,
        frames: int,
        width: int,
        depth: int,
        heads: int,
        patch_size: int,
        patch_stride: int,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        grid = ((n_mels - patch_size) // patch_stride + 1, (frames - patch_size) // patch_stride + 1)
        if min(n_mels, frames) < patch_size:
            raise ConfigError(
                f"spectrogram of {n_mels} mel bins x {frames} frames is smaller than patch_size={patch_size}; "
                "raise n_mels / clip_seconds or lower patch_size"
            )
        self.patch_embed = nn.Conv2d(1, width, patch_size, patch_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = pre_norm_blocks(width, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = rearrange(self.patch_embed(x), "b d f t -> b (f t) d")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


@register_encoder(
    "audio", tiny={"embed_dim": 16, "width": 4, "depth": 2, "n_mels": 16, "clip_seconds": 0.5}, augmenter=AudioAugment
)
def audio_cnn(
    embed_dim: int = 128,
    sample_rate: int = 8000,
    clip_seconds: float = 1.0,
    n_mels: int = 64,
    f_min: float = 50.0,
    f_max: float | None = 4000.0,
    width: int = 32,
    depth: int = 6,
    features: FeatureKind = "logmel",
    normalize: NormKind = "utterance",
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
    max_clips: int = 3,
    dropout: float = 0.1,
    feature_mean: float = -4.27,
    feature_std: float = 9.14,
    lifter: int | None = None,
) -> SpectrogramEncoder:
    """2-D CNN over log-mel spectrograms of short clips (spoken words, sound events).

    Example: ``create_encoder("audio_cnn", embed_dim=64, depth=6)``. On spoken digits, 40 log-mel bins over
    50-4000 Hz at 8 kHz, ``lifter=20`` and ``normalize="utterance_bins"`` generalised best to an unseen speaker
    (recipes/digits.yaml)."""
    frontend = AudioFrontend(
        sample_rate, features, n_mels, f_min, f_max, normalize, feature_mean, feature_std, lifter=lifter
    )
    trunk = AudioCNN(width, depth, dropout)
    return SpectrogramEncoder(
        trunk, trunk.out_dim, embed_dim, frontend, clip_seconds, max_clips, head, logit_scale, learnable_logit_scale
    )


@register_encoder(
    "audio",
    tiny={"embed_dim": 16, "n_mels": 32, "clip_seconds": 0.5, "width": 32, "depth": 1, "heads": 2},
    augmenter=AudioAugment,
)
def audio_vit(
    embed_dim: int = 128,
    sample_rate: int = 16000,
    clip_seconds: float = 2.0,
    n_mels: int = 128,
    f_min: float = 20.0,
    f_max: float | None = None,
    width: int = 384,
    depth: int = 6,
    heads: int = 6,
    mlp_ratio: float = 4.0,
    patch_size: int = 16,
    patch_stride: int = 10,
    features: FeatureKind = "fbank",
    normalize: NormKind = "fixed",
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
    max_clips: int = 3,
    dropout: float = 0.0,
    feature_mean: float = -4.27,
    feature_std: float = 9.14,
) -> SpectrogramEncoder:
    """ViT over Kaldi fbank patches (kernel 16, stride 10), as ImageBind's audio tower.

    Example: ``create_encoder("audio_vit", width=768, depth=12, heads=12)`` is ImageBind's size.
    """
    frontend = AudioFrontend(sample_rate, features, n_mels, f_min, f_max, normalize, feature_mean, feature_std)
    frames = frontend.num_frames(round(clip_seconds * sample_rate))
    trunk = SpectrogramViT(n_mels, frames, width, depth, heads, patch_size, patch_stride, mlp_ratio, dropout)
    return SpectrogramEncoder(
        trunk, width, embed_dim, frontend, clip_seconds, max_clips, head, logit_scale, learnable_logit_scale
    )


class ASTEncoder(ModalityEncoder):
    """A Hugging Face Audio Spectrogram Transformer with its feature extractor."""

    file_suffixes = AUDIO_SUFFIXES

    def __init__(
        self,
        model: Any,
        extractor: Any,
        embed_dim: int,
        pooling: str,
        max_clips: int,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        super().__init__("audio", model, model.config.hidden_size, embed_dim, head, logit_scale, learnable_logit_scale)
        if pooling not in ("pooler", "mean"):
            raise ConfigError(f"pooling must be 'pooler' (CLS + distillation tokens) or 'mean', got {pooling!r}")
        if extractor.max_length != model.config.max_length or extractor.num_mel_bins != model.config.num_mel_bins:
            raise ConfigError(
                f"AST feature extractor makes {extractor.max_length} x {extractor.num_mel_bins} spectrograms but the "
                f"model expects {model.config.max_length} x {model.config.num_mel_bins}: save a matching extractor"
            )
        self.extractor, self.pooling, self.max_clips = extractor, pooling, max_clips
        self.sample_rate = int(extractor.sampling_rate)
        # the extractor uses Kaldi's 25 ms frames every 10 ms and keeps max_length frames
        self.win_length, hop = round(0.025 * self.sample_rate), round(0.010 * self.sample_rate)
        self.clip_samples = self.win_length + (extractor.max_length - 1) * hop

    def preprocess(self, item: Any) -> Tensor:
        """Raw audio -> ``(num_clips, max_length, num_mel_bins)``."""
        clips, valid = load_audio_clips(item, self.sample_rate, self.clip_samples, self.max_clips)
        # unpadded clips: the extractor pads the spectrogram itself, as the model was trained
        segments = [clip[: max(int(v), self.win_length)].numpy() for clip, v in zip(clips, valid, strict=True)]
        return self.extractor(segments, sampling_rate=self.sample_rate, return_tensors="pt")["input_values"]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_waveforms(n, seed)

    def collate(self, samples: list[Tensor]) -> Any:
        return self.collate_clips(samples)

    def forward_features(self, batch: Tensor) -> Tensor:
        out = self.trunk(input_values=batch)
        return out.pooler_output if self.pooling == "pooler" else out.last_hidden_state.mean(1)

    def trunk_blocks(self) -> list[nn.Module]:
        return find_blocks(self.trunk)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_hf(directory, self.trunk, self.extractor)


def _tiny_ast(scratch_dir: Path) -> dict[str, Any]:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    path = Path(scratch_dir) / "ast"
    if not (path / "config.json").is_file():
        config = ASTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            num_mel_bins=16,
            max_length=64,
            patch_size=8,
            frequency_stride=8,
            time_stride=8,
        )
        ASTModel(config).save_pretrained(path)
        ASTFeatureExtractor(num_mel_bins=16, max_length=64, sampling_rate=16000).save_pretrained(path)
    return {"path": str(path), "embed_dim": 16}


@register_encoder(
    "audio",
    pretrained="Hugging Face ASTModel hub id or local directory (path)",
    tiny=_tiny_ast,
    augmenter=AudioAugment,
    check_args=hf_path_check("hf_ast"),
)
def hf_ast(
    path: str,
    load_weights: bool = True,
    embed_dim: int = 128,
    pooling: str = "pooler",
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
    max_clips: int = 3,
) -> ASTEncoder:
    """Hugging Face Audio Spectrogram Transformer (ASTModel + ASTFeatureExtractor) from a local directory.

    Example: ``create_encoder("hf_ast", path="models/ast-finetuned-audioset")`` where the directory was
    written by ``ASTModel.save_pretrained`` and ``ASTFeatureExtractor.save_pretrained``.
    """
    from transformers import ASTFeatureExtractor, ASTModel

    model = load_hf_model(ASTModel, path, load_weights, what="hf_ast")
    extractor = load_hf_processor(ASTFeatureExtractor, path, what="hf_ast feature extractor")
    return ASTEncoder(model, extractor, embed_dim, pooling, max_clips, head, logit_scale, learnable_logit_scale)
