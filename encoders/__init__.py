"""Built-in modality encoders. Importing this package registers them.

Each module registers its factories with :func:`bind.register_encoder`, the same public API a
third-party plugin uses; nothing in ``bind/`` names a modality.
"""

from . import audio, depth, image, imu, text, thermal, video  # noqa: F401  (imported for registration)
