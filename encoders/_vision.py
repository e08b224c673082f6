"""The image-like trunks: ``digits_cnn``'s CNN and torchvision's ViT, each built with its blocks.

``digits_cnn`` and ``tv_vit_b_16`` build their trunks here, and so do the depth and thermal CNNs and ViTs:
a depth or thermal tower has the parameter names of its image counterpart, so
:func:`bind.train.warm_start.init_from_encoder` can start it from image weights (a ViT's RGB patch stem summed to one channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from bind import ConfigError

# tv_vit_b_16's tiny variant; the depth and thermal ViTs use it too, so a test can start one from the other
VIT_TINY = {"image_size": 32, "patch_size": 16, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


@dataclass
class Trunk:
    """A feature extractor, the size of the features it returns, and its ordered blocks.

    ``blocks`` are submodules of ``module`` (ResNet stages, transformer layers): what an encoder's
    ``trunk_blocks()`` returns, so ``freeze("trunk", unfreeze_last_blocks=N)`` trains the last N.
    """

    module: nn.Module
    dim: int
    blocks: list[nn.Module]


def conv_block(c_in: int, c_out: int, convs: int, pool: bool) -> nn.Sequential:
    """``convs`` conv3x3-BN-ReLU layers from ``c_in`` to ``c_out`` channels, then a 2x2 max pool if ``pool``."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def cnn_trunk(width: int) -> Trunk:
    """``digits_cnn``'s trunk on one channel: three conv blocks (two halve the size), a global average pool; 4*width-d.

    Its blocks are the three conv blocks.
    """
    module = nn.Sequential(
        conv_block(1, width, 2, pool=True),
        conv_block(width, 2 * width, 2, pool=True),
        conv_block(2 * width, 4 * width, 1, pool=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Trunk(module, 4 * width, list(module[:3]))


def vit_trunk(
    name: str,
    image_size: int,
    patch_size: int,
    num_layers: int,
    num_heads: int,
    hidden_dim: int,
    mlp_dim: int,
    channels: int = 3,
) -> Trunk:
    """torchvision's ViT without its classification head: class-token features (hidden_dim), one block a layer.

    ``channels=1`` replaces the RGB patch stem by a single-channel one (depth, thermal), with torchvision's
    initialisation. ``name`` (the encoder's) starts the error a bad ``image_size`` raises.
    """
    if image_size % patch_size:
        raise ConfigError(f"{name}: image_size={image_size} must be a multiple of patch_size={patch_size}")
    import torchvision

    model = torchvision.models.VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
    model.heads = nn.Identity()
    if channels != 3:
        model.conv_proj = nn.Conv2d(channels, hidden_dim, patch_size, patch_size)
        fan_in = channels * patch_size**2
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))  # torchvision's stem init
        nn.init.zeros_(model.conv_proj.bias)
    return Trunk(model, hidden_dim, list(model.encoder.layers))
