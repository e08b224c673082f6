"""ImageBind's towers, loaded from its released checkpoint: bind a new modality into ImageBind's space.

``imagebind_image``, ``imagebind_text``, ``imagebind_audio``, ``imagebind_depth``, ``imagebind_thermal``,
``imagebind_imu`` and ``imagebind_video`` each take ``checkpoint=PATH``: a state-dict file in the format of
ImageBind's ``imagebind_huge.pth`` (keys under ``modality_preprocessors.``, ``modality_trunks.``,
``modality_heads.``, ``modality_postprocessors.``), read with ``torch.load(weights_only=True, mmap=True)`` so that
one tower of the 4.5 GB file is all that reaches memory. Widths, depths, patch kernels, strides, input sizes and
the output size are read off the tensors (:func:`infer_config`), so a smaller model saved in the same format
loads too. The number of attention heads is not stored in any tensor: it is the released model's for the
released widths, ``width // 64`` otherwise, or ``num_heads=``.

Each tower applies ImageBind's own preprocessing (``imagebind/data.py``) to raw items, and its head (LayerNorm,
the CLS token or the text's end token, a bias-free projection), so that :meth:`~bind.ModalityEncoder.embed` gives
ImageBind's embeddings after L2 normalisation:

- image: RGB (the stored pixels: ImageBind ignores EXIF), resize the short side to 224 (PIL bicubic), centre crop,
  CLIP's mean and std; the vision stem sees it as a 2-frame video (the frame repeated);
- text: CLIP's BPE tokenizer (:mod:`encoders.clip_bpe`), 77 tokens, causal attention, the end token pooled;
- audio: 16 kHz, three 2 s clips evenly spaced over the file (pytorchvideo's ``ConstantClipsPerVideoSampler``),
  each made zero-mean (in place on the shared waveform, as ImageBind does), Kaldi fbank of the first channel
  (128 bins, 25 ms Hann windows every 10 ms), cut or zero-padded to 204 frames, ``(x + 4.268) / 9.138``;
- video: five 2 s clips, each its first and last frame, short side scaled to 224 (bilinear), CLIP's mean and std,
  three crops along the long side: 15 two-frame clips through the vision tower;
- depth, thermal, IMU: ImageBind's repository ships no loader for them. bindkit's: depth in metres -> disparity
  in [0, 1] (:func:`encoders.depth.depth_to_unit`, missing pixels 0), thermal min-max scaled to [0, 1], both
  resized (short side) and centre-cropped to the tower's size; IMU ``(6, T)`` at 200 Hz (accelerometer then
  gyroscope), centre-cropped or zero-padded to the tower's 2,000 samples.

The clip embeddings of one item are averaged as ImageBind averages them (its scaled unit vectors; the direction is
the same). ImageBind's weights are licensed by Meta (CC-BY-NC 4.0) and never shipped with bindkit: download
https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth yourself. Without ``checkpoint=`` a tower is refused,
so that a recipe that forgot it does not bind to a random "ImageBind": ``random_init=True`` builds imagebind_huge's
architecture with random weights on purpose, and ``config=`` (how a saved model rebuilds a tower before its own
weights load) gives the sizes.

Example::

    image = create_encoder("imagebind_image", checkpoint="imagebind_huge.pth").eval()
    image.embed(["dog.jpg"]).shape   # (1, 1024)

The package's modules:

- :mod:`~encoders.imagebind.keymaps`: the checkpoint's keys per tower, renamed to bindkit's and back;
- :mod:`~encoders.imagebind.checkpoint_io`: reading a checkpoint file (:func:`read_checkpoint`);
- :mod:`~encoders.imagebind.checkpoint_shapes`: a tower's sizes, read off its tensors, checked, or the release's;
- :mod:`~encoders.imagebind.trunks`: the transformer towers and the projection;
- :mod:`~encoders.imagebind.preprocess`: ImageBind's preprocessing of raw items;
- :mod:`~encoders.imagebind.encoder`: :class:`ImageBindEncoder`, one tower as a bindkit encoder;
- :mod:`~encoders.imagebind.factories`: the seven registered factories, made from one table;
- :mod:`~encoders.imagebind.tiny`: a tiny checkpoint in the same format, for tests.
"""

from __future__ import annotations

from .checkpoint_io import read_checkpoint
from .checkpoint_shapes import (
    IMU_CHANNELS,
    KNOWN_HEADS,
    LIMITS,
    NEEDED,
    RELEASED,
    RELEASED_SIZES,
    SIZE_KEYS,
    VIDEO_FRAMES,
    _audio_stride,
    _guess_heads,
    check_config,
    infer_config,
    released_config,
    tower_config,
)
from .encoder import FILE_SUFFIXES, LOGIT_SCALE, MODALITY, ImageBindEncoder
from .factories import (
    FILES,
    PRETRAINED,
    TOWERS,
    check_weights,
    imagebind_audio,
    imagebind_depth,
    imagebind_image,
    imagebind_imu,
    imagebind_text,
    imagebind_thermal,
    imagebind_video,
)
from .keymaps import CHECKPOINT_URL, PREFIXES, causal_mask, from_imagebind, key_map, to_imagebind, tower_keys
from .preprocess import (
    AUDIO_MEAN,
    AUDIO_RATE,
    AUDIO_STD,
    CLIP_MEAN,
    CLIP_STD,
    IMU_RATE,
    audio_clips,
    clip_times,
    image_pixels,
    load_waveform,
    video_clips,
)
from .tiny import TINY_SIZES, save_tiny_checkpoint, tiny_config
from .trunks import DROP_PATH, Block, DropPath, ImageBindTrunk, Mlp, imagebind_head

__all__ = [
    "AUDIO_MEAN",
    "AUDIO_RATE",
    "AUDIO_STD",
    "CHECKPOINT_URL",
    "CLIP_MEAN",
    "CLIP_STD",
    "DROP_PATH",
    "FILES",
    "FILE_SUFFIXES",
    "IMU_CHANNELS",
    "IMU_RATE",
    "KNOWN_HEADS",
    "LIMITS",
    "LOGIT_SCALE",
    "MODALITY",
    "NEEDED",
    "PREFIXES",
    "PRETRAINED",
    "RELEASED",
    "RELEASED_SIZES",
    "SIZE_KEYS",
    "TINY_SIZES",
    "TOWERS",
    "VIDEO_FRAMES",
    "Block",
    "DropPath",
    "ImageBindEncoder",
    "ImageBindTrunk",
    "Mlp",
    "_audio_stride",
    "_guess_heads",
    "audio_clips",
    "causal_mask",
    "check_config",
    "check_weights",
    "clip_times",
    "from_imagebind",
    "image_pixels",
    "imagebind_audio",
    "imagebind_depth",
    "imagebind_head",
    "imagebind_image",
    "imagebind_imu",
    "imagebind_text",
    "imagebind_thermal",
    "imagebind_video",
    "infer_config",
    "key_map",
    "load_waveform",
    "read_checkpoint",
    "released_config",
    "save_tiny_checkpoint",
    "tiny_config",
    "to_imagebind",
    "tower_config",
    "tower_keys",
    "video_clips",
]
