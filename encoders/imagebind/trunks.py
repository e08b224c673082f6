"""ImageBind's transformer towers as bindkit modules: :class:`ImageBindTrunk` (stem, CLS token and positions,
pre-norm blocks, final LayerNorm, pooling) and :func:`imagebind_head` (the projection into the shared space)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bind import ConfigError, InputError

from .checkpoint_shapes import IMU_CHANNELS, VIDEO_FRAMES, check_config
from .keymaps import causal_mask

DROP_PATH = {"audio": 0.1, "imu": 0.7}  # ImageBind's stochastic depth when a tower trains (progressive over blocks)


class DropPath(nn.Module):
    """Stochastic depth: while training, drop a sample's residual branch with probability ``p`` (rescaling the rest)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """ImageBind's pre-norm block: LayerNorm (eps 1e-6), attention (optionally with learned key/value biases), MLP."""

    def __init__(self, width: int, heads: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"num_heads={heads} does not divide the tower's width {width}")
        self.attn = nn.MultiheadAttention(width, heads, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_1, self.norm_2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.mlp, self.drop_path = Mlp(width), DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm_1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0])
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class ImageBindTrunk(nn.Module):
    """Stem, CLS token and position embedding, transformer, final LayerNorm and pooling of one ImageBind tower.

    Input: images ``(B, 3, H, W)`` or two-frame clips ``(B, 3, 2, H, W)`` (vision), token ids ``(B, L)`` (text),
    spectrograms or maps ``(B, 1, H, W)`` (audio, depth, thermal), ``(B, 6, T)`` (IMU). Output ``(B, width)``.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = dict(cfg)
        m, width = cfg["modality"], cfg["width"]
        self.modality = m
        if m == "text":
            self.token_embedding = nn.Embedding(cfg["vocab_size"], width)
            self.pos_embed = nn.Parameter(torch.randn(1, cfg["context_length"], width) * 0.01)
            self.register_buffer("mask", causal_mask(cfg["context_length"]), persistent=False)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
        else:
            kernel, stride = cfg["kernel"], cfg["stride"]
            if m == "vision":
                self.patch_embed = nn.Conv3d(3, width, kernel, stride=stride, bias=False)
            elif m == "imu":
                self.patch_embed = nn.Linear(IMU_CHANNELS * kernel[0], width, bias=False)
            else:
                self.patch_embed = nn.Conv2d(1, width, kernel, stride=stride, bias=False)
            self.patch_norm = nn.LayerNorm(width) if m != "vision" else None
            self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches() + 1, width) * width**-0.5)
        self.norm_pre = nn.LayerNorm(width, eps=1e-6) if cfg["pre_norm"] else None
        top, depth = DROP_PATH.get(m, 0.0), cfg["depth"]
        rates = [top * i / max(depth - 1, 1) for i in range(depth)]  # progressive, as ImageBind's linspace
        self.blocks = nn.ModuleList(Block(width, cfg["heads"], cfg["add_bias_kv"], p) for p in rates)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):  # ImageBind's ("jax") initialisation, for towers trained from scratch
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def num_patches(self) -> int:
        cfg = self.cfg
        if self.modality == "imu":
            return cfg["input_size"][0] // cfg["kernel"][0]
        sizes = [VIDEO_FRAMES, *cfg["input_size"]] if self.modality == "vision" else cfg["input_size"]
        return math.prod((n - k) // s + 1 for n, k, s in zip(sizes, cfg["kernel"], cfg["stride"], strict=True))

    def tokens(self, x: Tensor) -> Tensor:
        if self.modality == "text":
            return self.token_embedding(x) + self.pos_embed
        if self.modality == "vision":
            x = x.unsqueeze(2) if x.ndim == 4 else x
            x = x.repeat(1, 1, VIDEO_FRAMES, 1, 1) if x.shape[2] == 1 else x  # an image is a 2-frame video
        if self.modality == "imu":
            k = self.cfg["kernel"][0]
            x = x.unfold(-1, k, k).permute(0, 2, 1, 3).flatten(2)  # (B, T / k, 6 * k): channels x time per patch
            x = self.patch_embed(x)
        else:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise InputError(
                f"ImageBind {self.modality} input gives {x.shape[1] - 1} patches; the tower has position "
                f"embeddings for {self.pos_embed.shape[1] - 1} (input size {self.cfg['input_size']})"
            )
        return x + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokens(x)
        if self.norm_pre is not None:
            h = self.norm_pre(h)
        mask = self.mask if self.modality == "text" else None
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        if self.modality == "text":  # the end token has the largest id: CLIP's pooling
            return h[torch.arange(h.shape[0], device=h.device), x.argmax(dim=-1)]
        return h[:, 0]


def imagebind_head(cfg: dict[str, Any]) -> nn.Module:
    """ImageBind's projection: bias-free, after dropout 0.5 for IMU (its head's LayerNorm is in the trunk)."""
    projection = nn.Linear(cfg["width"], cfg["out_dim"], bias=False)
    return nn.Sequential(nn.Dropout(0.5), projection) if cfg["modality"] == "imu" else projection
