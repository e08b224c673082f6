"""Depth, thermal and IMU encoders: loading, value conventions, missing pixels, windowing and errors.

The forward/backward/freeze/save-load contract of every registered encoder is in test_registry.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bind import ConfigError, InputError, create_encoder, get_encoder_info
from encoders.depth import KINECT_BASELINE_M, KINECT_FOCAL_PX, depth_to_unit, load_depth
from encoders.imu import load_imu, normalize_windows, split_windows
from encoders.thermal import load_thermal, thermal_to_unit


def tiny(name: str, tmp_path, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder(name, **{**get_encoder_info(name).tiny_kwargs(tmp_path), **overrides}).eval()


# ---- depth -------------------------------------------------------------------------------------------
def test_metric_depth_is_clipped_and_scaled_by_max_depth():
    depth = torch.tensor([[2.0, 10.0], [25.0, 0.5]])
    torch.testing.assert_close(depth_to_unit(depth, "metric", max_depth=10.0), torch.tensor([[0.2, 1.0], [1.0, 0.05]]))


def test_disparity_is_baseline_times_focal_over_depth_and_decreases_with_depth():
    depth = torch.linspace(0.6, 50.0, 200)
    unit = depth_to_unit(depth, "disparity")
    assert (unit.diff() < 0).all() and unit.min() > 0 and unit.max() <= 1
    torch.testing.assert_close(unit[0], torch.tensor(KINECT_BASELINE_M * KINECT_FOCAL_PX / 0.6 / 75.0))
    assert depth_to_unit(torch.tensor([0.1]), "disparity").item() == 1.0  # nearer than ~0.52 m saturates


def test_preprocess_normalises_and_sets_missing_pixels_to_zero(tmp_path):
    enc = tiny("depth_cnn", tmp_path, image_size=4, max_depth=10.0)
    depth = np.full((4, 4), 2.0, np.float32)
    depth[0, :4] = [0.0, np.nan, np.inf, -1.0]  # all four conventions for "no return"
    x = enc.preprocess(depth)
    assert x.shape == (1, 4, 4)
    assert (x[0, 0] == 0).all()
    torch.testing.assert_close(x[0, 1:], torch.full((3, 4), (0.2 - 0.5) / 0.5))


def test_resizing_leaves_missing_pixels_out_of_the_interpolation(tmp_path):
    enc = tiny("depth_cnn", tmp_path, image_size=4)
    depth = np.full((8, 8), 2.0, np.float32)
    depth[3, 4] = np.nan  # one hole: its neighbours' value fills it, no dark halo
    torch.testing.assert_close(enc.preprocess(depth), torch.full((1, 4, 4), -0.6))
    depth[:, :4] = 0  # half the map missing: left stays missing (0), right keeps the exact value
    x = enc.preprocess(depth)[0]
    assert (x[:, 0] == 0).all()
    torch.testing.assert_close(x[:, -1], torch.full((4,), -0.6))


def test_all_invalid_depth_map_is_an_error():
    with pytest.raises(InputError, match="no valid pixel"):
        load_depth(np.zeros((5, 5), np.float32))
    with pytest.raises(InputError, match=r"\(H, W\)"):
        load_depth(np.ones((2, 5, 5), np.float32))


def test_depth_files_npy_metres_and_16_bit_png_millimetres_agree(tmp_path):
    metres = np.random.default_rng(0).uniform(0.5, 9.0, (12, 16)).round(3).astype(np.float32)
    metres[0, 0] = 0.0
    np.save(tmp_path / "d.npy", metres)
    Image.fromarray((metres * 1000).round().astype(np.uint16)).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    from_npy, from_png = load_depth(tmp_path / "d.npy"), load_depth(tmp_path / "d.png")
    assert torch.isnan(from_npy[0, 0]) and torch.isnan(from_png[0, 0])
    torch.testing.assert_close(from_png, from_npy, equal_nan=True, atol=1e-6, rtol=0)
    # integer arrays follow the PNG convention: millimetres
    torch.testing.assert_close(load_depth((metres * 1000).round().astype(np.uint16)), from_npy, equal_nan=True)


def test_bad_depth_files_are_named(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "vis.png")
    with pytest.raises(InputError, match="vis.png.*8-bit or colour.*16-bit PNG in millimetres"):
        load_depth(tmp_path / "vis.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        load_depth(tmp_path / "broken.png")
    with pytest.raises(InputError, match="missing.npy.*does not exist"):
        load_depth(tmp_path / "missing.npy")
    with pytest.raises(InputError, match="cannot read a depth map from a list"):
        load_depth([[1.0]])


def test_depth_mode_is_checked():
    with pytest.raises(ConfigError, match="'metric' or 'disparity'"):
        create_encoder("depth_cnn", mode="inverse")


# ---- thermal -----------------------------------------------------------------------------------------
def test_thermal_minmax_is_per_image_and_unit_free():
    celsius = torch.tensor([[20.0, 30.0], [40.0, 25.0]])
    expected = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    torch.testing.assert_close(thermal_to_unit(celsius), expected)
    torch.testing.assert_close(thermal_to_unit(celsius + 273.15), expected, atol=1e-5, rtol=0)
    assert (thermal_to_unit(torch.full((3, 3), 7.0)) == 0).all()


def test_thermal_fixed_range_clips_and_keeps_absolute_temperature(tmp_path):
    celsius = torch.tensor([[10.0, 25.0], [40.0, 50.0]])
    torch.testing.assert_close(thermal_to_unit(celsius, "fixed", (20.0, 40.0)), torch.tensor([[0.0, 0.25], [1.0, 1.0]]))
    enc = tiny("thermal_cnn", tmp_path, image_size=2, normalize="fixed", value_range=[20.0, 40.0])
    torch.testing.assert_close(enc.preprocess(celsius.numpy())[0], torch.tensor([[-1.0, -0.5], [1.0, 1.0]]))
    with pytest.raises(ConfigError, match="value_range"):
        create_encoder("thermal_cnn", normalize="fixed")


def test_thermal_files_keep_raw_counts(tmp_path):
    counts = np.random.default_rng(0).integers(7000, 9000, (10, 12), dtype=np.uint16)
    Image.fromarray(counts).save(tmp_path / "t16.png")
    np.save(tmp_path / "t.npy", counts.astype(np.float32))
    torch.testing.assert_close(load_thermal(tmp_path / "t16.png"), torch.from_numpy(counts.astype(np.float32)))
    torch.testing.assert_close(load_thermal(tmp_path / "t.npy"), load_thermal(tmp_path / "t16.png"))
    grey = (counts // 40).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "t8.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb_grey.png")  # LLVIP's storage
    torch.testing.assert_close(load_thermal(tmp_path / "rgb_grey.png"), load_thermal(tmp_path / "t8.png"))
    torch.testing.assert_close(load_thermal(tmp_path / "t8.png"), torch.from_numpy(grey.astype(np.float32)))


def test_bad_thermal_inputs_are_named(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "ironbow.png")
    with pytest.raises(InputError, match="ironbow.png.*false-colour"):
        load_thermal(tmp_path / "ironbow.png")
    with pytest.raises(InputError, match="thermal ndarray of shape \\(2, 2\\).*NaN or inf"):
        load_thermal(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(InputError, match=r"\(H, W\)"):
        load_thermal(np.zeros((4, 4, 3)))
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(InputError, match="empty.npy.*empty"):
        load_thermal(tmp_path / "empty.npy")


# ---- IMU ---------------------------------------------------------------------------------------------
def test_two_and_a_half_windows_give_three_the_last_padded():
    signal = torch.randn(6, 250)
    windows, valid = split_windows(signal, window=100, stride=100, max_windows=8)
    assert windows.shape == (3, 6, 100) and valid.tolist() == [100, 100, 50]
    torch.testing.assert_close(windows[1], signal[:, 100:200])
    torch.testing.assert_close(windows[2, :, :50], signal[:, 200:])
    assert (windows[2, :, 50:] == 0).all()
    overlapping, _ = split_windows(signal, window=100, stride=50, max_windows=8)
    assert overlapping.shape[0] == 4  # starts 0, 50, 100, 150
    thinned, _ = split_windows(torch.randn(6, 1000), window=100, stride=100, max_windows=3)
    assert thinned.shape[0] == 3


def test_short_series_is_padded_to_one_window():
    windows, valid = split_windows(torch.ones(6, 30), window=100, stride=100, max_windows=4)
    assert windows.shape == (1, 6, 100) and valid.tolist() == [30]
    assert (windows[0, :, :30] == 1).all() and (windows[0, :, 30:] == 0).all()


def test_fixed_normalisation_scales_each_sensor_group_by_its_unit():
    windows = torch.cat([torch.full((1, 3, 4), 9.80665), torch.full((1, 3, 4), 2.0)], dim=1)
    out = normalize_windows(windows, torch.tensor([3]), "fixed", accel_scale=9.80665, gyro_scale=1.0)
    torch.testing.assert_close(out[0, :3, :3], torch.ones(3, 3))
    torch.testing.assert_close(out[0, 3:, :3], torch.full((3, 3), 2.0))
    assert (out[..., 3] == 0).all()  # padding


def test_window_normalisation_uses_real_samples_and_keeps_axis_ratios():
    rng = torch.Generator().manual_seed(0)
    real = torch.randn(1, 6, 40, generator=rng) * torch.tensor([1.0, 2.0, 3.0, 0.1, 0.2, 0.3])[:, None] + 5
    windows = F.pad(real, (0, 24))
    out = normalize_windows(windows, torch.tensor([40]), "window", 1.0, 1.0)
    torch.testing.assert_close(out[..., :40].mean(-1), torch.zeros(1, 6), atol=1e-5, rtol=0)
    for group in (slice(0, 3), slice(3, 6)):
        torch.testing.assert_close(out[0, group, :40].pow(2).mean(), torch.tensor(1.0))
    stds = out[0, :, :40].std(-1)
    torch.testing.assert_close(stds[1] / stds[0], real[0, 1].std() / real[0, 0].std())  # ratio within a group kept
    assert (out[..., 40:] == 0).all()


def test_long_series_embeddings_are_averaged_per_item(tmp_path):
    enc = tiny("imu_transformer", tmp_path)  # 50 Hz, 32-sample windows
    long, short = np.random.default_rng(0).standard_normal((2, 6, 80)).astype(np.float32)
    batch = enc.collate([enc.preprocess(long), enc.preprocess(short[:, :20])])
    assert batch.item_index.tolist() == [0, 0, 0, 1] and batch.num_items == 2
    per_window = F.normalize(enc.forward_head(enc.forward_features(enc.preprocess(long))), dim=-1)
    expected = F.normalize(per_window.mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(enc(batch)[:1], expected, atol=1e-6, rtol=1e-5)


def test_imu_files_and_resampling(tmp_path):
    signal = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
    np.save(tmp_path / "s.npy", signal)
    rows = "\n".join(",".join(f"{v:.6f}" for v in row) for row in signal.T)
    (tmp_path / "s.csv").write_text("ax,ay,az,gx,gy,gz\n" + rows + "\n")
    torch.testing.assert_close(load_imu(tmp_path / "s.npy", 50), torch.from_numpy(signal))
    torch.testing.assert_close(load_imu(tmp_path / "s.csv", 50), torch.from_numpy(signal), atol=1e-6, rtol=0)
    t = np.arange(200) / 100
    slow = np.tile(np.sin(2 * np.pi * 2 * t), (6, 1)).astype(np.float32)  # 2 Hz at 100 Hz
    resampled = load_imu((slow, 100), 50)
    assert resampled.shape == (6, 100)
    torch.testing.assert_close(resampled[0, 10:-10], torch.from_numpy(slow[0, ::2][10:-10]), atol=0.02, rtol=0)


def test_bad_imu_inputs_are_named(tmp_path):
    with pytest.raises(InputError, match=r"shape \(40, 6\).*\(6, T\).*transpose"):
        load_imu(np.zeros((40, 6)), 50)
    with pytest.raises(InputError, match="NaN or inf"):
        load_imu(np.full((6, 10), np.nan), 50)
    (tmp_path / "seven.csv").write_text("t,ax,ay,az,gx,gy,gz\n" + "0,1,2,3,4,5,6\n" * 3)
    with pytest.raises(InputError, match="seven.csv.*7 columns.*drop timestamp"):
        load_imu(tmp_path / "seven.csv", 50)
    (tmp_path / "bad.csv").write_text("ax,ay,az,gx,gy,gz\n1,2,x,4,5,6\n")
    with pytest.raises(InputError, match="bad.csv.*could not be read"):
        load_imu(tmp_path / "bad.csv", 50)
    with pytest.raises(InputError, match="nope.npy.*does not exist"):
        load_imu(tmp_path / "nope.npy", 50)


def test_window_must_be_a_whole_number_of_patches():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        create_encoder("imu_transformer", sample_rate=50, window_seconds=0.5, patch_size=8)
