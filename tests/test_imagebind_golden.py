"""bindkit's ImageBind towers against numbers ImageBind's own code gave (golden values, computed once outside).

``tests/golden/imagebind_53680b0.json`` holds what facebookresearch/ImageBind at commit 53680b0 computed for a
small model (2 blocks of width 32, 16-d output, ImageBind's own input sizes) whose weights are drawn from a
seeded generator in its state dict's order: the keys and shapes, the seed, the buffers the model was built with
(logit scales, the text tower's causal mask), and the embeddings its ``data.load_and_transform_*`` and ``forward`` gave for two PNGs, three strings,
two WAVs (decoded with soundfile) and seeded depth, thermal and IMU tensors. Here the same weights are drawn
again, saved in ImageBind's format and loaded by bindkit: each embedding must match ImageBind's direction, and
each tower's logit scale ImageBind's output norm. Every constant bindkit copies (CLIP's mean and std, the fbank
settings, clip sampling, end-token pooling, the logit scales) is checked against ImageBind, not against itself.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_ROOT
from PIL import Image

from bind import create_encoder

GOLDEN = json.loads((Path(__file__).parent / "golden" / "imagebind_53680b0.json").read_text())
RECORDINGS = DATA_ROOT / "fsdd" / "recordings"
TOWERS = {"vision": "imagebind_image", "text": "imagebind_text", "audio": "imagebind_audio",
          "depth": "imagebind_depth", "thermal": "imagebind_thermal", "imu": "imagebind_imu"}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The golden model's weights, drawn again as ImageBind's script drew them, in imagebind_huge.pth's format."""
    generator = torch.Generator().manual_seed(GOLDEN["seed"])
    state = {}
    for key, shape in GOLDEN["spec"]:
        drawn = torch.randn(shape, generator=generator) * GOLDEN["std"]  # drawn for every key, kept ones too
        state[key] = torch.tensor(GOLDEN["kept"][key]) if key in GOLDEN["kept"] else drawn
        if key in GOLDEN["causal_masks"]:  # the text preprocessor's buffer: -inf above the diagonal
            state[key] = torch.full(shape, float("-inf")).triu(1)
    path = tmp_path_factory.mktemp("golden") / "imagebind_small.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """The two PNGs the golden script wrote: MNIST's first digit (grey, 28 px) and an 80 x 48 RGB gradient."""
    folder = tmp_path_factory.mktemp("images")
    raw = gzip.decompress((DATA_ROOT / "mnist" / "images-idx3-ubyte.gz").read_bytes())
    Image.fromarray(np.frombuffer(raw, np.uint8, 784, offset=16).reshape(28, 28)).save(folder / "digit0.png")
    y, x = np.mgrid[0:48, 0:80]
    rgb = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "gradient.png")
    return [str(folder / "digit0.png"), str(folder / "gradient.png")]


def tensors() -> dict[str, torch.Tensor]:
    """Depth, thermal and IMU inputs as the golden script drew them (ImageBind has no loader for these)."""
    generator = torch.Generator().manual_seed(7)
    depth = torch.rand(2, 1, 224, 224, generator=generator)
    thermal = torch.rand(2, 1, 224, 224, generator=generator)
    return {"depth": depth, "thermal": thermal, "imu": torch.randn(2, 6, 2000, generator=generator)}


def tower(modality: str, checkpoint: str):
    return create_encoder(TOWERS[modality], checkpoint=checkpoint, num_heads=2).eval()


def expected(modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageBind's output directions and norms (its logit scale: 1 for vision, which it only normalises)."""
    out = torch.tensor(GOLDEN["embeddings"][modality])
    return torch.nn.functional.normalize(out, dim=-1), out.norm(dim=-1)


@pytest.mark.parametrize("modality", ["vision", "text", "audio"])
def test_embed_from_files_gives_imagebinds_embeddings(modality, checkpoint, images):
    items = {"vision": images, "text": GOLDEN["texts"], "audio": [str(RECORDINGS / w) for w in GOLDEN["wavs"]]}
    encoder = tower(modality, checkpoint)
    directions, norms = expected(modality)
    with torch.no_grad():
        z = encoder.embed(items[modality])
    torch.testing.assert_close(z, directions, atol=5e-7, rtol=0)
    if modality != "vision":
        torch.testing.assert_close(encoder.logit_scale.detach().expand(len(norms)), norms, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("modality", ["depth", "thermal", "imu"])
def test_forward_on_tensors_gives_imagebinds_embeddings(modality, checkpoint):
    encoder = tower(modality, checkpoint)
    directions, norms = expected(modality)
    with torch.no_grad():
        z = encoder(tensors()[modality])
    torch.testing.assert_close(z, directions, atol=5e-7, rtol=0)
    torch.testing.assert_close(encoder.logit_scale.detach().expand(len(norms)), norms, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_preprocessing_gives_imagebinds_tensors(modality, checkpoint, images):
    """Each item's tensor as ImageBind's data.load_and_transform_* made it: shape, sums and 64 sampled values
    (pixels after CLIP's mean and std; fbank clips after 16 kHz resampling and ImageBind's mean and std; tokens)."""
    items = {"vision": images, "text": GOLDEN["texts"], "audio": [str(RECORDINGS / w) for w in GOLDEN["wavs"]]}
    encoder = tower(modality, checkpoint)
    for item, reference in zip(items[modality], GOLDEN["preprocessed"][modality], strict=True):
        x = encoder.preprocess(item).double()
        if modality == "vision" and x.dim() == 4:  # an image repeated to the 2-frame stem here: compare one frame
            x = x[:, 0]
        assert list(x.shape) == reference["shape"]
        np.testing.assert_allclose(x.reshape(-1)[reference["picks"]].numpy(), reference["values"], atol=1e-5, rtol=0)
        assert float(x.sum()) == pytest.approx(reference["sum"], rel=1e-6, abs=1e-3)
        assert float((x**2).sum()) == pytest.approx(reference["sum_sq"], rel=1e-6)


@pytest.mark.parametrize("modality", ["text", "audio", "depth", "thermal", "imu"])
def test_a_tower_built_without_a_checkpoint_has_imagebinds_logit_scale(modality):
    """The scales bindkit gives a tower it builds itself (random_init, a saved config) are the ones ImageBind's
    model is built with: the checkpoint's buffers above, read back as ImageBind wrote them."""
    from encoders.imagebind import tower_config

    config = tower_config(modality, 32, 1, 2, 16, **{"vocab_size": 49408, "context_length": 77} if modality == "text"
                          else {"kernel": [8], "stride": [8], "input_size": [400]} if modality == "imu"
                          else {"kernel": [16, 16], "stride": [16, 16], "input_size": [32, 32]})  # fmt: skip
    encoder = create_encoder(TOWERS[modality], config=config)
    key = f"modality_postprocessors.{modality}.1.log_logit_scale"
    assert float(encoder.logit_scale.detach()) == pytest.approx(float(np.exp(GOLDEN["kept"][key])), rel=1e-6)
