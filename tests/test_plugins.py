"""A user's encoder, registered from their own module, binds to a frozen image anchor."""

from __future__ import annotations

import math

import pytest
import torch

from bind import ConfigError, create_encoder, list_encoders, load_plugins
from bind.data.digits import mnist
from bind.losses import info_nce, supcon_loss
from bind.model import BindModel


def test_plugin_module_by_name_registers_and_a_bad_name_says_so():
    load_plugins(["imu_plugin"])
    assert "imu_test_cnn" in list_encoders(modality="imu")
    with pytest.raises(ConfigError, match="plugin module 'no_such_plugin' could not be imported"):
        load_plugins(["no_such_plugin"])


def imu_window(digit: int, rng: torch.Generator) -> torch.Tensor:
    """A 6 x 64 signal whose frequency says the digit: the concept shared with the image."""
    t = torch.linspace(0, 1, 64)
    phase = torch.rand(6, 1, generator=rng) * 2 * math.pi
    return torch.sin(2 * math.pi * (digit + 1) * t + phase) + 0.1 * torch.randn(6, 64, generator=rng)


def pretrain_anchor(image_encoder, prototypes: torch.Tensor, steps: int = 30) -> None:
    opt = torch.optim.AdamW(image_encoder.parameters(), lr=1e-2)
    labels = torch.arange(10).repeat(4)
    image_encoder.train()
    for _ in range(steps):
        views = prototypes[labels] + 0.1 * torch.randn(40, 1, 28, 28)
        loss = supcon_loss(image_encoder(views), labels, temperature=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_imu_encoder_binds_to_a_frozen_image_anchor(data_root):
    load_plugins(["imu_plugin"])
    torch.manual_seed(0)
    model = BindModel(
        {
            "image": create_encoder("digits_cnn", width=4, embed_dim=16),
            "imu": create_encoder("imu_test_cnn", width=16, embed_dim=16),
        },
        anchor_modality="image",
    )
    digits = mnist(data_root, "train", limit=100)  # one real image per digit
    prototypes = torch.stack(
        [model["image"].preprocess(digits[int((digits.labels == d).nonzero()[0])]) for d in range(10)]
    )
    pretrain_anchor(model["image"], prototypes)  # a random CNN maps all images to about one direction
    model["image"].freeze("all")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(150):
        digits = torch.randperm(10, generator=rng)[:8]
        imu = torch.stack([model["imu"].preprocess(imu_window(int(d), rng)) for d in digits])
        loss = info_nce(model("image", prototypes[digits]), model("imu", imu), model["imu"].logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10
    # the anchor did not move, and an unseen IMU window now retrieves its own digit's image
    model.eval()
    with torch.no_grad():
        image_emb = model("image", prototypes)
        probe = torch.stack([model["imu"].preprocess(imu_window(d, rng)) for d in range(10)])
        hits = (model("imu", probe) @ image_emb.T).argmax(1) == torch.arange(10)
    assert hits.float().mean() >= 0.4  # chance is 0.1
