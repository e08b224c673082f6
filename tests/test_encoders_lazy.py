"""``import encoders`` (and so every registry look-up) must not pay for the heavy optional libraries.

torchvision (which pulls in torch._dynamo), torchaudio, PyAV, soundfile, transformers, open_clip and PIL are
imported by the encoders at their first real use (building a tower, reading a file, augmenting), never when
the package registers its factories: ``bindkit validate`` and ``bindkit list`` stay fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torchvision", "torchaudio", "av", "soundfile", "transformers", "open_clip", "PIL")
ROOT = Path(__file__).resolve().parents[1]

LOADED = f"sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in {HEAVY!r}}})"

REGISTRY = f"""
import json, sys
import encoders
from bind.registry import get_encoder_info, list_encoders
names = list_encoders()
info = get_encoder_info("minilm")
get_encoder_info("digits_cnn")
print(json.dumps({{"loaded": {LOADED}, "count": len(names), "doc": bool(info.factory.__doc__)}}))
import numpy as np, torch
from bind import create_encoder
enc = create_encoder("digits_cnn", width=4, embed_dim=8).eval()
with torch.no_grad():
    out = enc.embed([np.zeros((28, 28), dtype=np.uint8), np.full((32, 32), 200, dtype=np.uint8)])
print(json.dumps({{"shape": list(out.shape), "finite": bool(torch.isfinite(out).all())}}))
"""

# what bind's own data package loads (its digits builder reads WAV and PNG files): not the encoders' doing
BIND_DATA = f"import json, sys\nimport bind.data\nprint(json.dumps({LOADED}))"


def _run(script: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_import_encoders_loads_no_heavy_library() -> None:
    first, second = (json.loads(line) for line in _run(REGISTRY)[-2:])
    by_bind = set(json.loads(_run(BIND_DATA)[-1]))
    print("heavy modules after import encoders:", first["loaded"], "of which bind.data loads", sorted(by_bind))
    assert sorted(set(first["loaded"]) - by_bind) == []
    assert not {"torchvision", "torchaudio", "av", "transformers", "open_clip"} & set(first["loaded"])
    assert first["count"] > 10 and first["doc"]
    assert second == {"shape": [2, 8], "finite": True}  # the tower builds and embeds in that same process
