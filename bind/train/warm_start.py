"""Start a new modality's trunk from another encoder's trunk weights (ImageBind's recipe for depth, thermal, video).

ImageBind starts depth and thermal towers from image-like patch stems and inflates its image ViT for video.
:func:`init_from_encoder` does the same between any two registered encoders whose trunks share parameter
names (``digits_cnn`` -> ``depth_cnn``/``thermal_cnn``; ``tv_vit_b_16`` -> ``depth_vit``/``thermal_vit`` with
the same architecture arguments):

- same name, same shape: copied (BatchNorm running statistics included);
- a convolution weight differing only in input channels: the kernel is summed over the source's channels and
  spread evenly over the target's, so an input that is the same on every channel (a grey image, replicated)
  gives the target the response it gave the source: RGB 3 -> 1 sums, 1 -> 3 repeats and divides by 3;
- a Conv3d weight from a Conv2d one (video inflation, I3D): repeated over time and divided by the temporal
  size, so a static clip gives the image response;
- anything else (another shape, a name the source lacks) keeps the target's initialisation and is reported.

Heads and logit scales are never touched.

Example::

    image = create_encoder("digits_cnn")
    image.load_state_dict(...)                        # a trained image tower
    depth = create_encoder("depth_cnn", image_size=28)
    report = init_from_encoder(depth, image)          # {"copied": [...], "adapted": [...], "skipped": [...]}
"""

from __future__ import annotations

import logging
from itertools import chain

import torch
from torch import Tensor, nn

from ..encoder import ModalityEncoder
from ..errors import ConfigError

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def init_from_encoder(target: ModalityEncoder, source: ModalityEncoder) -> dict[str, list[str]]:
    """Copy ``source``'s trunk weights into ``target``'s trunk where names match; adapt convolution stems.

    Returns the target's state-dict names (``trunk.…``) under ``"copied"``, ``"adapted"`` and ``"skipped"``.
    Raises :class:`ConfigError` when nothing matched.
    """
    source_tensors = dict(chain(source.trunk.named_parameters(), source.trunk.named_buffers()))
    report: dict[str, list[str]] = {"copied": [], "adapted": [], "skipped": []}
    reasons: list[str] = []
    with torch.no_grad():
        for name, tensor in chain(target.trunk.named_parameters(), target.trunk.named_buffers()):
            full_name = f"trunk.{name}"
            src = source_tensors.get(name)
            if src is None:
                report["skipped"].append(full_name)
                reasons.append(f"{full_name}: not in the source trunk")
            elif src.shape == tensor.shape:
                tensor.copy_(src)
                report["copied"].append(full_name)
            elif (adapted := _adapt_conv_weight(src, tensor, _owner(target.trunk, name), name)) is not None:
                tensor.copy_(adapted)
                report["adapted"].append(full_name)
            else:
                report["skipped"].append(full_name)
                reasons.append(f"{full_name}: source {tuple(src.shape)} vs target {tuple(tensor.shape)}")
    names = f"{_describe(source)} -> {_describe(target)}"
    if not report["copied"] and not report["adapted"]:
        target_names = list(dict(target.trunk.named_parameters()))[:3]
        source_names = list(dict(source.trunk.named_parameters()))[:3]
        raise ConfigError(
            f"init_from_encoder {names}: no trunk weight matched (target trunk has {target_names}..., source "
            f"{source_names}...); initialise from an encoder with the same trunk layout, e.g. digits_cnn -> "
            "depth_cnn, or tv_vit_b_16 -> depth_vit with the same image_size, patch_size and widths"
        )
    log.info(
        "init_from_encoder %s: %d copied, %d adapted, %d skipped",
        names,
        len(report["copied"]),
        len(report["adapted"]),
        len(report["skipped"]),
    )
    for reason in reasons:
        log.debug("skipped %s", reason)
    return report


def _adapt_conv_weight(src: Tensor, dst: Tensor, module: nn.Module, name: str) -> Tensor | None:
    """``src`` reshaped to ``dst``'s shape if ``dst`` is a convolution weight differing in input channels and/or
    by an inflated temporal dimension; otherwise ``None``."""
    if not name.endswith("weight") or not isinstance(module, _CONVS) or module.groups != 1:
        return None
    if dst.ndim == src.ndim + 1 and isinstance(module, nn.Conv3d):  # (O, I, kh, kw) -> (O, I, T, kh, kw)
        frames = dst.shape[2]
        src = src.unsqueeze(2).expand(-1, -1, frames, *src.shape[2:]) / frames
    if dst.ndim != src.ndim or dst.shape[0] != src.shape[0] or dst.shape[2:] != src.shape[2:]:
        return None
    if dst.shape[1] != src.shape[1]:
        src = src.sum(1, keepdim=True).expand_as(dst) / dst.shape[1]
    return src


def _owner(trunk: nn.Module, name: str) -> nn.Module:
    return trunk.get_submodule(name.rpartition(".")[0])


def _describe(encoder: ModalityEncoder) -> str:
    return f"{encoder.build_args.get('name', type(encoder).__name__)!r} ({encoder.modality})"
