"""The pre-norm transformer layer the from-scratch towers stack: audio's spectrogram ViT, the IMU transformer and
video's temporal attention build theirs here, so they share one definition (GELU, batch first, LayerNorm first).
"""

from __future__ import annotations

from torch import nn


def pre_norm_layer(width: int, heads: int, mlp_dim: int, dropout: float) -> nn.TransformerEncoderLayer:
    """One pre-norm transformer layer on ``(B, N, width)`` tokens: attention and a ``mlp_dim`` GELU MLP."""
    return nn.TransformerEncoderLayer(width, heads, mlp_dim, dropout, "gelu", batch_first=True, norm_first=True)


def pre_norm_blocks(width: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
    """``depth`` :func:`pre_norm_layer` blocks with an MLP of ``int(width * mlp_ratio)``, to run in order."""
    return nn.ModuleList(pre_norm_layer(width, heads, int(width * mlp_ratio), dropout) for _ in range(depth))
