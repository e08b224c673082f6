"""Audio and video encoders: loading, resampling, clip splitting and padding, and the video frame tower.

The forward/backward/freeze/save-load contract of every registered encoder is in test_registry.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import DATA_ROOT

from bind import ConfigError, InputError, create_encoder, get_encoder_info
from encoders.audio_frontend import AudioFrontend
from encoders.audio_io import load_audio, split_clips
from encoders.video_io import clip_indices, read_video, write_video

FSDD_FILE = DATA_ROOT / "fsdd" / "recordings" / "7_jackson_0.wav"


def tiny(name: str, tmp_path, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder(name, **{**get_encoder_info(name).tiny_kwargs(tmp_path), **overrides}).eval()


def harmonic_word(sample_rate: int, seconds: float = 0.6) -> np.ndarray:
    """A voiced, syllable-like sound band-limited below 3.4 kHz: the same signal at any sample rate >= 8 kHz."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    phase = 2 * np.pi * (140 * t + 20 * t**2 / seconds)  # pitch rising from 140 to 180 Hz
    wave = sum(np.sin(k * phase) / k for k in range(1, int(3400 // 180) + 1))
    return (0.3 * np.sin(np.pi * t / seconds) ** 2 * wave).astype(np.float32)


# ---- audio -------------------------------------------------------------------------------------------
def test_stereo_44k_file_gives_the_features_of_the_mono_8k_file(tmp_path):
    mono8k, sound44k = harmonic_word(8000), harmonic_word(44100)
    sf.write(tmp_path / "mono8k.wav", mono8k, 8000, subtype="FLOAT")
    # unequal channels whose mean is the signal: the mixdown must average them
    sf.write(tmp_path / "stereo44k.wav", np.stack([1.5 * sound44k, 0.5 * sound44k], axis=1), 44100, subtype="FLOAT")
    wave_a, wave_b = load_audio(tmp_path / "mono8k.wav", 8000), load_audio(tmp_path / "stereo44k.wav", 8000)
    assert wave_a.shape == wave_b.shape == (4800,)
    assert (wave_a - wave_b)[50:-50].abs().max() < 0.01 * wave_a.abs().max()  # same samples, away from the edges
    enc = create_encoder("audio_cnn")
    feats_a, feats_b = enc.preprocess(tmp_path / "mono8k.wav"), enc.preprocess(tmp_path / "stereo44k.wav")
    assert feats_a.shape == feats_b.shape == (1, 1, 64, 101)
    torch.testing.assert_close(feats_a, feats_b, atol=0.05, rtol=0)  # features are O(1): within 5%
    # the same through the (waveform, sample_rate) tuple, channels first
    torch.testing.assert_close(enc.preprocess((np.stack([sound44k, sound44k]), 44100)), feats_b, atol=1e-4, rtol=0)


def test_long_audio_gives_evenly_spaced_clips_whose_embeddings_are_averaged(tmp_path):
    enc = tiny("audio_cnn", tmp_path)  # 0.5 s clips, up to 3
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal(8000 * 3).astype(np.float32) * 0.1)
    clips, valid = split_clips(wave, 4000, 3)
    assert clips.shape == (3, 4000) and valid.tolist() == [4000] * 3
    torch.testing.assert_close(clips[0], wave[:4000])
    torch.testing.assert_close(clips[1], wave[10000:14000])
    torch.testing.assert_close(clips[2], wave[-4000:])
    x = enc.preprocess(wave.numpy())
    assert x.shape == (3, 1, 16, 51)
    per_clip = enc(x)  # (3, D), each unit norm
    expected = F.normalize(per_clip.mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(enc.embed([wave.numpy()]), expected, atol=1e-6, rtol=1e-5)
    assert enc.preprocess(wave[:4100].numpy()).shape[0] == 2  # just over one clip: two overlapping clips


def test_short_and_silent_audio_is_padded_without_changing_its_features(tmp_path):
    short = harmonic_word(8000, seconds=0.3)
    half_second = AudioFrontend(sample_rate=8000, n_mels=16)
    clips_a, valid_a = split_clips(torch.from_numpy(short), 4000, 3)
    clips_b, valid_b = split_clips(torch.from_numpy(short), 8000, 3)
    feats_a, feats_b = half_second(clips_a, valid_a), half_second(clips_b, valid_b)
    assert feats_a.shape == (1, 16, 51) and feats_b.shape == (1, 16, 101)
    # per-utterance statistics come from the real frames only, so more padding changes nothing ...
    torch.testing.assert_close(feats_a, feats_b[..., :51], atol=1e-4, rtol=0)
    # ... and padding repeats each bin's quietest real frame
    real = half_second.num_frames(len(short))
    torch.testing.assert_close(
        feats_b[..., real:], feats_b[..., :real].amin(-1, keepdim=True).expand(-1, -1, 101 - real)
    )
    enc = tiny("audio_cnn", tmp_path)
    for item in (np.zeros(1000, np.float32), np.zeros(1, np.float32), np.full(300, 0.5, np.float32)):
        x = enc.preprocess(item)
        assert x.shape == (1, 1, 16, 51) and torch.isfinite(x).all()


def test_frontend_on_a_batch_equals_frontend_per_waveform():
    waves = torch.randn(3, 4000, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.01], [0.1], [1.0]])
    for frontend in (
        AudioFrontend(8000),
        AudioFrontend(16000, "fbank", n_mels=32, f_min=20, f_max=None, normalize="fixed"),
    ):
        batched = frontend(waves)
        assert batched.shape == (3, frontend.n_mels, frontend.num_frames(4000))
        torch.testing.assert_close(batched, torch.stack([frontend(w) for w in waves]), atol=1e-5, rtol=1e-5)
    # per-utterance normalisation makes log-mel features independent of the gain (up to eps in quiet bins)
    for normalize in ("utterance", "utterance_bins"):
        frontend = AudioFrontend(8000, normalize=normalize)
        torch.testing.assert_close(frontend(waves[2]), frontend(waves[2] * 0.05), atol=1e-2, rtol=0)
    per_bin = AudioFrontend(8000, normalize="utterance_bins")(waves)
    torch.testing.assert_close(per_bin.mean(-1), torch.zeros(3, 64), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_bin.std((-2, -1), correction=0), torch.ones(3), atol=1e-4, rtol=0)


def test_bad_audio_raises_input_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match="garbage.wav"):
        load_audio(garbage, 8000)
    sf.write(tmp_path / "cut.wav", harmonic_word(8000), 8000)
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes((tmp_path / "cut.wav").read_bytes()[:44])
    with pytest.raises(InputError, match="header_only.wav"):
        load_audio(header_only, 8000)
    with pytest.raises(InputError, match="missing.flac.*does not exist"):
        load_audio(tmp_path / "missing.flac", 8000)
    with pytest.raises(InputError, match="NaN"):
        load_audio(np.array([0.0, np.nan, 0.1]), 8000)
    with pytest.raises(InputError, match="empty"):
        load_audio(np.zeros(0), 8000)
    with pytest.raises(InputError, match="transpose"):
        load_audio(np.zeros((8000, 2)), 8000)
    with pytest.raises(InputError, match="sample_rate"):
        load_audio((np.zeros(10), 0), 8000)
    with pytest.raises(ConfigError, match="f_max"):
        AudioFrontend(8000, f_max=6000)


def test_int16_pcm_arrays_are_scaled_like_float_audio():
    wave = harmonic_word(8000)
    pcm = np.round(wave * 32767).astype(np.int16)
    torch.testing.assert_close(load_audio(pcm, 8000), torch.from_numpy(wave), atol=1e-4, rtol=0)


def test_real_fsdd_recording_loads_in_every_audio_encoder(tmp_path):
    if not FSDD_FILE.is_file():
        pytest.skip(f"FSDD data not found at {FSDD_FILE}")
    wave = load_audio(FSDD_FILE, 8000)
    assert wave.shape == (3457,) and 0.05 < wave.abs().max() <= 1
    assert create_encoder("audio_cnn").preprocess(FSDD_FILE).shape == (1, 1, 64, 101)
    for name in ("audio_cnn", "audio_vit", "hf_ast"):
        z = tiny(name, tmp_path).embed([FSDD_FILE, str(FSDD_FILE)])
        assert z.shape == (2, 16) and torch.isfinite(z).all()
        torch.testing.assert_close(z[0], z[1])


def test_ast_cuts_long_audio_into_clips_of_its_spectrogram_length(tmp_path):
    enc = tiny("hf_ast", tmp_path)  # 16 kHz, 64 frames of 10 ms
    assert enc.clip_samples == 400 + 63 * 160
    x = enc.preprocess((np.random.default_rng(0).standard_normal(8000 * 4).astype(np.float32) * 0.1, 8000))
    assert x.shape == (3, 64, 16) and torch.isfinite(x).all()
    # a short item goes through the extractor unpadded, as AST was trained
    short = np.random.default_rng(1).standard_normal(3000).astype(np.float32) * 0.1
    direct = enc.extractor([short], sampling_rate=16000, return_tensors="pt")["input_values"]
    torch.testing.assert_close(enc.preprocess(short), direct)


# ---- video -------------------------------------------------------------------------------------------
def moving_square(frames: int = 10, size: int = 28) -> np.ndarray:
    video = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        video[t, 4 + t : 12 + t, 6:18] = (250, 120, 30)
    return video


def test_mp4_round_trip_keeps_the_frames(tmp_path):
    video = moving_square()
    frames = read_video(write_video(tmp_path / "square.mp4", video, fps=8))
    assert frames.shape == video.shape and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - video).mean() < 1.0  # lossy codec, near-lossless setting
    gray = read_video(write_video(tmp_path / "gray.mp4", video[..., 0]))
    assert gray.shape == video.shape and np.abs(gray[..., 1].astype(int) - video[..., 0]).mean() < 1.0
    avi = read_video(write_video(tmp_path / "square.avi", video))
    assert avi.shape == video.shape and np.abs(avi.astype(int) - video).mean() < 8


def test_bad_video_raises_input_error_naming_the_file(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="noise.mp4"):
        read_video(tmp_path / "noise.mp4")
    whole = write_video(tmp_path / "whole.mp4", moving_square()).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated.mp4"):
        read_video(tmp_path / "truncated.mp4")
    with pytest.raises(InputError, match="gone.mp4.*does not exist"):
        read_video(tmp_path / "gone.mp4")
    enc = tiny("video_frames", tmp_path)
    with pytest.raises(InputError, match="0 frames"):
        enc.preprocess(np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(InputError, match="expected"):
        enc.preprocess(np.zeros((4, 28, 28, 5), np.uint8))
    with pytest.raises(ConfigError, match="even"):
        write_video(tmp_path / "odd.webm", np.zeros((2, 27, 28, 3), np.uint8))


def test_frames_are_sampled_into_evenly_spaced_clips_and_padded_with_the_last_frame(tmp_path):
    assert clip_indices(3, 4, 2).tolist() == [[0, 1, 2, 2]]
    assert clip_indices(30, 4, 2).tolist() == [[0, 1, 2, 3], [26, 27, 28, 29]]
    assert clip_indices(30, 4, 2, stride=3).tolist() == [[0, 3, 6, 9], [20, 23, 26, 29]]
    enc = tiny("video_frames", tmp_path)  # digits_cnn frames, 4 frames per clip, up to 2 clips
    video = (np.arange(30, dtype=np.uint8)[:, None, None] * 8).repeat(28, 1).repeat(28, 2)  # frame t has value 8t
    x = enc.preprocess(video)
    assert x.shape == (2, 4, 1, 28, 28)
    frame_value = torch.round((x[..., 0, 0, 0] * 0.3081 + 0.1307) * 255 / 8)  # undo digits_cnn's MNIST normalisation
    assert frame_value.tolist() == [[0, 1, 2, 3], [26, 27, 28, 29]]
    # every layout of the same frames gives the same input
    rgb = np.repeat(video[..., None], 3, axis=-1)
    for layout in (rgb, torch.from_numpy(rgb).permute(0, 3, 1, 2), torch.from_numpy(video)):
        torch.testing.assert_close(enc.preprocess(layout), x)


def test_video_file_embeds_like_its_frames(tmp_path):
    enc = tiny("video_frames", tmp_path)
    video = moving_square(frames=9)
    path = write_video(tmp_path / "clip.mp4", video, crf=0)
    z_file, z_array = enc.embed([path, str(path)]), enc.embed([read_video(path)])
    torch.testing.assert_close(z_file[0], z_array[0])
    torch.testing.assert_close(z_file[0], enc.embed([video])[0], atol=1e-3, rtol=0)  # crf=0: off by 1 at most


def test_share_ties_the_frame_trunk_and_copy_does_not(tmp_path):
    image = tiny("digits_cnn", tmp_path)
    shared, copied = tiny("video_frames", tmp_path), tiny("video_frames", tmp_path)
    with torch.no_grad():
        for p in image.trunk.parameters():
            p.add_(torch.randn_like(p))
    shared.share_trunk_with(image, mode="share")
    copied.share_trunk_with(image, mode="copy")
    pairs = list(
        zip(image.trunk.parameters(), shared.trunk.frames.parameters(), copied.trunk.frames.parameters(), strict=True)
    )
    for p_image, p_shared, p_copied in pairs:
        assert p_shared.data_ptr() == p_image.data_ptr()
        assert p_copied.data_ptr() != p_image.data_ptr()
        torch.testing.assert_close(p_copied, p_image)
    video = [moving_square()]
    before_shared, before_copied = shared.embed(video), copied.embed(video)
    with torch.no_grad():
        for p in image.trunk.parameters():
            p.mul_(-1.5)
    assert not torch.allclose(shared.embed(video), before_shared)  # the image tower's training moves the video's
    torch.testing.assert_close(copied.embed(video), before_copied)
    with pytest.raises(ConfigError, match="same frame_encoder"):
        tiny("video_frames", tmp_path).share_trunk_with(tiny("digits_cnn", tmp_path, width=8), mode="share")
    with pytest.raises(ConfigError, match="cannot copy"):
        tiny("video_frames", tmp_path).share_trunk_with(tiny("tv_resnet18", tmp_path, embed_dim=16), mode="copy")


def test_attention_pooling_sees_frame_order_and_mean_pooling_does_not(tmp_path):
    clips = torch.randn(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reversed_clips = clips.flip(1)
    mean, attention = tiny("video_frames", tmp_path, temporal="mean"), tiny("video_frames", tmp_path)
    torch.testing.assert_close(mean(clips), mean(reversed_clips), atol=1e-6, rtol=1e-5)
    assert (attention(clips) - attention(reversed_clips)).abs().max() > 1e-4
    assert attention.trunk_blocks()[-1] is attention.trunk.temporal and len(mean.trunk_blocks()) == 3


def test_videomae_takes_clips_of_its_own_length(tmp_path):
    enc = tiny("hf_videomae", tmp_path)  # 4 frames, 32 px
    x = enc.preprocess(moving_square(frames=12))
    assert x.shape == (2, 4, 3, 32, 32)
    assert enc.preprocess(moving_square(frames=2)[..., 0]).shape == (1, 4, 3, 32, 32)  # grayscale, repeated frames
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        enc.preprocess(np.full((4, 28, 28), 3.0, np.float32))


def test_the_lifter_keeps_the_envelope_and_drops_the_pitch_ripple():
    """lifter=K is a projection onto the first K DCT coefficients of each frame's log-mel spectrum: all of them
    change nothing, and a fast ripple across the bins (a voice's harmonics) is removed while a slow tilt stays."""
    wave = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    plain = AudioFrontend(8000, n_mels=32, normalize="none")
    torch.testing.assert_close(AudioFrontend(8000, n_mels=32, normalize="none", lifter=32)(wave), plain(wave))
    smooth = AudioFrontend(8000, n_mels=32, normalize="none", lifter=6)
    bins = torch.arange(32.0) + 0.5
    envelope = torch.cos(torch.pi * 2 * bins / 32)[None, :, None]  # DCT basis 2: a slow envelope
    ripple = torch.cos(torch.pi * 30 * bins / 32)[None, :, None]  # DCT basis 30: harmonics, bin to bin
    out = torch.einsum("bmt,mn->bnt", (envelope + ripple).expand(1, 32, 5), smooth.smoother)
    torch.testing.assert_close(out, envelope.expand(1, 32, 5), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="lifter must be a number of cepstral coefficients in 1..n_mels=32"):
        AudioFrontend(8000, n_mels=32, lifter=40)
