"""Models by folder or by Hugging Face hub id, both ways: resolve, publish, describe.

A bindkit model is a folder (``config.json`` + ``model.safetensors`` + ``assets/``), and a hub repository
holding such a folder is the same model by id, as with sentence-transformers and open_clip::

    model = BindModel.from_pretrained("runs/digits")        # a folder: a training run or save_pretrained's
    model = BindModel.from_pretrained("my-org/digits-bind")  # a hub id, through huggingface_hub's cache
    model.push_to_hub("my-org/digits-bind")                 # or: hf upload my-org/digits-bind runs/digits

Hub ids resolve through ``huggingface_hub``'s cache (``$HF_HOME``, ``$HF_HUB_CACHE``); with
``$HF_HUB_OFFLINE=1`` nothing is downloaded, and a model that is not cached is one line saying what to fetch.
A local folder always wins over a hub id of the same spelling.

:func:`write_model_card` writes the ``README.md`` a hub page shows (YAML front matter: the modalities,
encoders and size, the evaluation figures of ``eval.json``; how to load it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import BindError, DataError
from .model_files import CONFIG_NAME, WEIGHTS_NAME
from .safe_io import read_json, write_atomic

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")  # "org/name", "org/name@revision"
# what a bindkit model folder holds; nothing else of a repository is downloaded
MODEL_FILES = [CONFIG_NAME, WEIGHTS_NAME, "README.md", "recipe.yaml", "eval.json", "assets/**"]
CARD_NAME = "README.md"
CARD_MARK = "<!-- bindkit: generated model card; remove this line to keep your own edits on the next save -->"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``directory``, and the folder its files may resolve into (``confine``).

    A hub snapshot's files are links into the cache's ``blobs/``, so a hub model is confined to its repository's
    cache folder; a local folder to itself.
    """

    directory: Path
    confine: Path
    hub_id: str | None = None


def is_hub_id(text: str) -> bool:
    """``org/name`` (optionally ``@revision``): how the hub names a repository. A single name is a local path."""
    return bool(HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text


def resolve_model(ref: str | os.PathLike[str]) -> ModelSource:
    """The folder of model ``ref``: a local directory, else a hub id fetched through Hugging Face's cache.

    Raises :class:`DataError` in one line: no such folder (and not a hub id), or a hub id that is not cached
    and cannot be downloaded (offline, no network, no such repository), saying what to do.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return ModelSource(path, path)
    text = os.fspath(ref)
    if path.exists():
        raise DataError(f"{text}: a file, not a folder; expected a model folder (config.json + {WEIGHTS_NAME})")
    if not is_hub_id(text):
        raise DataError(
            f"{text}: no such directory; expected a model folder (written by `bindkit run` or "
            "BindModel.save_pretrained) or a Hugging Face hub id (org/name)"
        )
    snapshot = _download(text)
    return ModelSource(snapshot, snapshot.parent.parent, text)  # .../models--org--name/snapshots/<commit>


def _download(ref: str) -> Path:
    """The local snapshot of hub repository ``ref`` (``org/name[@revision]``), only a model's files."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = ref.partition("@")
    lead = f"{ref}: no such directory, and as a Hugging Face hub id"
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        state = "this process is offline ($HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        raise DataError(
            f"{lead} it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {state}: run "
            f"`hf download {repo}` on a machine with network access (with the same $HF_HOME), or pass a local folder"
        ) from None
    except GatedRepoError:
        raise DataError(f"{lead} it is gated: accept its terms on the hub, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise DataError(f"{lead} no such repository (or it is private: `hf auth login`); check the spelling") from None
    except RevisionNotFoundError:
        raise DataError(f"{lead} revision {revision!r} does not exist; check the branch, tag or commit") from None
    except (HfHubHTTPError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"{lead} it could not be downloaded ({first})") from None


# ---- the model card ----------------------------------------------------------------------------------------
def write_model_card(directory: Path, config: dict[str, Any], name: str | None = None) -> Path | None:
    """Write ``directory/README.md``: a hub model card for the model ``config`` describes, with ``eval.json``'s
    figures when the folder has them. A card a person wrote (without :data:`CARD_MARK`) is left alone."""
    path = directory / CARD_NAME
    if path.is_file() and CARD_MARK not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    results = _read_eval(directory / "eval.json")
    write_atomic(path, model_card(config, name or directory.resolve().name, results).encode())
    return path


def _read_eval(path: Path) -> dict[str, Any] | None:
    """``eval.json``'s figures, or None when absent or unreadable (a card is no place to fail a save)."""
    try:
        data = read_json(path, "the figures bindkit run writes", allow_nan=True) if path.is_file() else None
    except (BindError, OSError):
        return None
    return data if isinstance(data, dict) else None


def model_card(config: dict[str, Any], name: str, results: dict[str, Any] | None = None) -> str:
    """The card's text: YAML front matter the hub indexes, then what the model is and how to load it."""
    encoders = {m: spec.get("name") for m, spec in config["encoders"].items()}
    meta = {
        "library_name": "bindkit",
        "pipeline_tag": "feature-extraction",
        "tags": ["bindkit", "multimodal", "embeddings", *sorted(encoders)],
        "bindkit": {
            "anchor_modality": config["anchor_modality"],
            "embed_dim": config["embed_dim"],
            "encoders": encoders,
            "format_version": config["format_version"],
        },
    }
    if results:
        meta["bindkit"]["eval"] = _headline_figures(results)
    modalities = ", ".join(encoders)
    rows = "\n".join(
        f"| {m} | `{spec.get('name')}` | {spec.get('freeze', 'none')} |" for m, spec in config["encoders"].items()
    )
    first = next(iter(encoders))
    text = f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---
{CARD_MARK}

# {name}

A bindkit model: {len(encoders)} encoders ({modalities}) in one {config["embed_dim"]}-d
embedding space, anchored on `{config["anchor_modality"]}`. Every row it returns is unit-norm, so a dot product is
the cosine similarity, across modalities as within one.

| modality | encoder | frozen in training |
| --- | --- | --- |
{rows}

## Use

```python
from bind import BindModel

model = BindModel.from_pretrained("{name}")      # a folder, or the hub id this card is published under
z = model.encode("{first}", [...])                # (N, {config["embed_dim"]}) float32, unit-norm rows
```

From the command line: `bindkit embed MODEL --modality {first} --out z.npy FILES...` and
`bindkit retrieve MODEL --query-modality ... --gallery-modality ...`, where MODEL is the folder or the hub id.
"""
    if results:
        text += "\n## Evaluation (eval.json)\n\n" + _results_table(results) + "\n"
    return text


def _headline_figures(results: dict[str, Any]) -> dict[str, float]:
    """Zero-shot accuracies and R@1 per ordered pair, rounded: the figures a hub listing can show."""
    out = {f"zero_shot/{m}": round(float(r["accuracy"]), 4) for m, r in results.get("zero_shot", {}).items()}
    out |= {f"R@1/{pair}": round(float(r["R@1"]), 4) for pair, r in results.get("retrieval", {}).items()}
    return out


def _results_table(results: dict[str, Any]) -> str:
    lines = ["| figure | value | pair |", "| --- | --- | --- |"]
    for modality, r in results.get("zero_shot", {}).items():
        lines.append(
            f"| zero-shot {modality} -> {results.get('prompt_modality')} | {r['accuracy']:.3f} | {r['pair']} |"
        )
    for pair, r in results.get("retrieval", {}).items():
        lines.append(f"| R@1 {pair} | {r['R@1']:.3f} | {r['pair']} |")
    return "\n".join(lines)


# ---- publishing ------------------------------------------------------------------------------------------------
def push_folder(
    folder: Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload bindkit model",
) -> str:
    """Create hub repository ``repo_id`` if needed and upload a model ``folder``; returns the commit's URL."""
    from huggingface_hub import HfApi

    if not is_hub_id(repo_id) or "@" in repo_id:
        raise DataError(f"push_to_hub: {repo_id!r} is not a hub repository id (org/name)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=MODEL_FILES,
        commit_message=commit_message,
    )
    return str(getattr(info, "commit_url", info))
