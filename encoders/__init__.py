"""Built-in modality encoders. Importing this package registers them.

Each encoder module registers its factories with :func:`bind.register_encoder`, and the file readers
``audio_io`` and ``image_io`` their shard decoders with :func:`bind.register_decoder`: the same
public API a third-party plugin uses; nothing in ``bind/`` names a modality.
"""

from . import audio, audio_io, depth, image, image_io, imagebind, imu, openclip, text, thermal, video  # noqa: F401
