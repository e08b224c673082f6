"""The registry, and the contract every registered encoder signs up for by registering.

Each encoder's tiny variant must pass bind.testing's checks on its own example_inputs: embed raw inputs to
(B, D) unit-norm rows, backpropagate, respect ``freeze`` (no grads, eval mode), and survive a save/load
round trip with identical outputs. A plugin's author runs the same checks (``bindkit check-encoder``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import imu_plugin  # noqa: F401  (a third-party encoder, registered like any user's)
import numpy as np
import pytest
import torch
from conftest import raw_examples
from torch import nn

import bind.registry
from bind import (
    ConfigError,
    InputError,
    ModalityEncoder,
    UnknownEncoderError,
    create_encoder,
    get_encoder_info,
    list_encoders,
    register_encoder,
)
from bind.cli import build_parser
from bind.encoder import ClipBatch
from bind.testing import CONTRACT_CHECKS, EncoderCheckError, check_encoder

ALL_ENCODERS = list_encoders()
TESTS = Path(__file__).parent


def tiny(name: str, tmp_path) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder(name, **get_encoder_info(name).tiny_kwargs(tmp_path))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Encoders registered inside a test are gone after it."""
    monkeypatch.setattr(bind.registry, "_REGISTRY", dict(bind.registry._REGISTRY))


def test_builtin_modalities_are_registered():
    for modality in ("image", "text", "audio", "video", "depth", "thermal", "imu"):
        assert list_encoders(modality=modality), f"no {modality} encoder registered"
    assert "imu_test_cnn" in list_encoders(modality="imu")


def test_list_by_glob_and_modality():
    assert "digits_cnn" in list_encoders("digits_*")
    assert all(get_encoder_info(n).modality == "audio" for n in list_encoders(modality="audio"))
    released = list_encoders(pretrained=True)  # as open_clip.list_pretrained(): what loads released weights
    assert {"imagebind_audio", "open_clip_image", "minilm", "tv_resnet18", "hf_text"} <= set(released)
    assert not {"digits_cnn", "audio_cnn", "imu_test_cnn"} & set(released)
    assert list_encoders("imagebind_*", modality="audio", pretrained=True) == ["imagebind_audio"]
    assert list_encoders("no_such_*") == []


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownEncoderError, match="did you mean 'digits_cnn'"):
        create_encoder("digit_cnn")


def test_wrong_kwargs_name_the_encoder_and_the_accepted_arguments():
    with pytest.raises(ConfigError, match="'digits_cnn' does not take argument.*colour.*embed_dim"):
        create_encoder("digits_cnn", colour=3)


def test_registering_records_modality_and_build_args(tmp_path, scratch_registry):
    @register_encoder("thermal", tiny={"embed_dim": 8})
    def thermal_test_linear(embed_dim: int = 4) -> imu_plugin.ModalityEncoder:
        """A one-layer thermal encoder."""
        return imu_plugin.ModalityEncoder("thermal", torch.nn.Flatten(), 16, embed_dim)

    enc = create_encoder("thermal_test_linear", embed_dim=8)
    assert get_encoder_info("thermal_test_linear").modality == "thermal"
    assert get_encoder_info("thermal_test_linear").description == "A one-layer thermal encoder."
    assert enc.build_args == {"name": "thermal_test_linear", "kwargs": {"embed_dim": 8}}
    assert enc(torch.randn(2, 4, 4)).shape == (2, 8)


@pytest.mark.parametrize("check", CONTRACT_CHECKS)
@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_encoder_contract(name, check, tmp_path):
    """example_inputs, embed (unit norm, batching), backward, freeze all / trunk, save/load: see bind/testing.py."""
    check_encoder(name, tmp_path, checks=[check], strict=True)


def test_unfreeze_more_blocks_than_exist_is_an_error(tmp_path):
    enc = tiny("digits_cnn", tmp_path)
    with pytest.raises(ConfigError, match="has .* trunk blocks"):
        enc.freeze("trunk", unfreeze_last_blocks=99)


def test_clip_batch_averages_clip_embeddings(tmp_path):
    enc = tiny("digits_cnn", tmp_path).eval()
    clips = torch.randn(5, 1, 28, 28)
    batch = ClipBatch(clips, torch.tensor([0, 0, 0, 1, 1]), 2)
    per_clip = enc(clips)
    expected = torch.nn.functional.normalize(torch.stack([per_clip[:3].mean(0), per_clip[3:].mean(0)]), dim=-1)
    torch.testing.assert_close(enc(batch), expected, atol=1e-6, rtol=1e-5)


# ---- a plugin's author runs the same contract: bind.testing and `bindkit check-encoder` ------------------------
class PressureEncoder(ModalityEncoder):
    """A plugin encoder of a modality bindkit has never heard of: 4-channel pressure series of 32 samples."""

    def __init__(self, embed_dim: int, width: int) -> None:
        trunk = nn.Sequential(
            nn.Sequential(nn.Conv1d(4, width, 3, padding=1), nn.GELU()),
            nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.GELU()),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        super().__init__("pressure", trunk, width, embed_dim)

    def preprocess(self, item) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(item, dtype=np.float32))
        if x.shape != (4, 32):
            raise InputError(f"pressure item must be (4, 32), got {tuple(x.shape)}")
        return x

    def trunk_blocks(self) -> list[nn.Module]:
        return [self.trunk[0], self.trunk[1]]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(n)]


class NotNormalised(PressureEncoder):
    def forward(self, batch) -> torch.Tensor:  # skips the L2 normalisation
        return self.forward_head(self.forward_features(batch))


class DeadParameter(PressureEncoder):
    def __init__(self, embed_dim: int, width: int) -> None:
        super().__init__(embed_dim, width)
        self.unused = nn.Linear(2, 2)  # trainable, never used in forward


class NoExamples(PressureEncoder):
    example_inputs = ModalityEncoder.example_inputs  # as an encoder written before example_inputs existed


def register_pressure(cls: type[PressureEncoder], name: str) -> None:
    def factory(embed_dim: int = 32, width: int = 8) -> PressureEncoder:
        return cls(embed_dim, width)

    factory.__qualname__ = f"{cls.__name__}_factory"
    register_encoder("pressure", name=name, tiny={"embed_dim": 16, "width": 4})(factory)


def test_a_plugin_encoder_of_a_new_modality_passes_the_contract(tmp_path, scratch_registry):
    register_pressure(PressureEncoder, "pressure_test_cnn")
    results = check_encoder("pressure_test_cnn", tmp_path)
    assert [(r.encoder, r.check, r.ok, r.message) for r in results] == [
        ("pressure_test_cnn", check, True, "") for check in CONTRACT_CHECKS
    ]
    assert [str(r) for r in results][0] == "pressure_test_cnn example_inputs: ok"
    assert len(raw_examples("pressure", 2)) == 2  # the tests' raw inputs now come from any modality's encoder


@pytest.mark.parametrize(
    ("cls", "failing", "message"),
    [
        (NotNormalised, "embed", r"embeddings are not unit norm: row norms \[.*\]; forward must end with L2"),
        (DeadParameter, "backward", r"2 trainable parameter\(s\) get no gradient: unused\.weight, unused\.bias"),
    ],
)
def test_a_broken_encoder_fails_the_matching_check_with_a_clear_message(
    tmp_path, scratch_registry, cls, failing, message
):
    register_pressure(cls, "pressure_broken")
    results = {r.check: r for r in check_encoder("pressure_broken", tmp_path)}
    assert {c for c, r in results.items() if not r.ok} == {failing}
    assert re.search(message, results[failing].message), results[failing].message
    assert str(results[failing]).startswith(f"pressure_broken {failing}: FAIL: ")
    with pytest.raises(EncoderCheckError, match=f"encoder 'pressure_broken' fails check '{failing}': {message}"):
        check_encoder("pressure_broken", tmp_path / "strict", strict=True)


def test_an_encoder_without_example_inputs_fails_naming_example_inputs(tmp_path, scratch_registry, capsys):
    register_pressure(NoExamples, "pressure_no_examples")
    results = check_encoder("pressure_no_examples", tmp_path)
    failed = [r for r in results if not r.ok]
    assert [r.check for r in failed] == [c for c in CONTRACT_CHECKS if c != "freeze_trunk"]  # all that feed items
    assert failed[0].message.startswith("NoExamples does not define example_inputs(n, seed): define it to return")
    assert all("example_inputs" in r.message for r in failed)
    # the command prints a FAIL line per check and exits 1
    args = build_parser().parse_args(["check-encoder", "pressure_no_examples", "--check", "embed"])
    assert args.func(args) == 1
    assert capsys.readouterr().out.splitlines() == [f"pressure_no_examples embed: FAIL: {results[1].message}"]


def test_check_encoder_refuses_unknown_encoders_and_checks(tmp_path):
    with pytest.raises(UnknownEncoderError, match="unknown encoder 'digit_cnn'; did you mean 'digits_cnn'"):
        check_encoder("digit_cnn", tmp_path)
    args = build_parser().parse_args(["check-encoder", "digits_cnn", "digit_cnn"])
    with pytest.raises(UnknownEncoderError, match="unknown encoder 'digit_cnn'"):  # the CLI prints it as one line
        args.func(args)
    with pytest.raises(ConfigError, match="unknown contract check 'embedding'; did you mean 'embed'"):
        check_encoder("digits_cnn", tmp_path, checks=["embedding"])


def test_check_encoder_description_is_plain_text():
    import bind.cli.check_encoder

    assert (
        "``" not in bind.cli.check_encoder.__doc__ and ":func:" not in bind.cli.check_encoder.__doc__
    )  # help covered by test_cli


def test_check_encoder_command_on_a_plugin_encoder():
    done = subprocess.run(
        [sys.executable, "-m", "bind", "check-encoder", "imu_test_cnn", "--plugin", "imu_plugin"],
        capture_output=True,
        text=True,
        cwd=TESTS,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"imu_test_cnn {check}: ok" for check in CONTRACT_CHECKS]
