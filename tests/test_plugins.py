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


def _evil_plugin(folder, marker):
    """A module whose import leaves a mark: the stand-in for code nobody asked to run."""
    path = folder / "evil_plugin.py"
    path.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return path


def test_a_run_that_names_a_plugin_runs_it_only_when_trusted(tiny_run, tmp_path):
    import shutil
    import sys

    import yaml

    from bind import UntrustedPluginError
    from bind.runs import load_run

    run = tmp_path / "downloaded_run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "marker"
    plugin = _evil_plugin(tmp_path, marker)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["plugins"] = [str(plugin)]
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(
        UntrustedPluginError, match=r"recipe.yaml: plugins names plugin code.*evil_plugin.py.*--trust-plugins"
    ):
        load_run(run)
    assert not marker.exists()
    try:
        model, _ = load_run(run, trust_plugins=True)
        assert marker.read_text() == "ran" and "image" in model.modalities
    finally:
        sys.modules.pop("evil_plugin", None)


def test_a_recipe_that_names_a_plugin_needs_consent_on_the_command_line(tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import DATA_ROOT, DIGITS

    marker = tmp_path / "marker"
    _evil_plugin(tmp_path, marker)
    recipe = yaml.safe_load(DIGITS.read_text())
    recipe["plugins"] = ["evil_plugin"]
    recipe["data_root"] = str(DATA_ROOT)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    def validate(*flags):
        return subprocess.run(
            [sys.executable, "-m", "bind", "validate", "r.yaml", *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = validate()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"'evil_plugin' ({tmp_path / 'evil_plugin.py'})" in refused.stderr and "--trust-plugins" in refused.stderr
    assert not marker.exists()
    named = validate("--plugin", "evil_plugin")  # the user names the module: that is consent
    assert named.returncode == 0, named.stderr
    assert marker.read_text() == "ran"
    marker.unlink()
    trusted = validate("--trust-plugins")
    assert trusted.returncode == 0, trusted.stderr
    assert marker.read_text() == "ran"
