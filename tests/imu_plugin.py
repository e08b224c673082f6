"""A third-party encoder as a user would write it: a 6-channel IMU encoder in its own module.

Imported by tests through ``load_plugins(["imu_plugin"])`` or ``--plugin imu_plugin``; bindkit's
own code never names it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bind import ModalityEncoder, register_encoder


class IMUEncoder(ModalityEncoder):
    def __init__(self, embed_dim: int, width: int) -> None:
        trunk = nn.Sequential(
            nn.Conv1d(6, width, 5, padding=2),
            nn.GELU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2),
            nn.GELU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        super().__init__("imu", trunk, width, embed_dim, logit_scale=5.0, learnable_logit_scale=False)

    def preprocess(self, item) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(item, dtype=np.float32))
        if x.ndim != 2 or x.shape[0] != 6:
            raise ValueError(f"IMU item must be (6, T), got {tuple(x.shape)}")
        return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        """What the contract checks (bind.testing, `bindkit check-encoder`) feed it: n (6, 50) windows."""
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((6, 50)).astype(np.float32) for _ in range(n)]


@register_encoder("imu", tiny={"width": 8, "embed_dim": 16})
def imu_test_cnn(embed_dim: int = 64, width: int = 32) -> IMUEncoder:
    """Test plugin: 1-D CNN over 6 x T accelerometer + gyroscope windows."""
    return IMUEncoder(embed_dim, width)
