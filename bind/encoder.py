"""The contract every modality encoder follows.

An encoder is four steps, each overridable::

    raw item --preprocess--> tensor --collate--> batch --trunk--> features --head--> (B, embed_dim)
                                                                 --postprocess--> unit norm

``preprocess`` runs on one raw item (a path, a string, an array) on the CPU, in DataLoader workers;
``collate`` stacks preprocessed items; ``forward`` runs trunk, head and L2 normalisation. Each
encoder also owns a logit scale (1 / temperature), fixed or learnable, which the losses use when
this modality is contrasted with the anchor (ImageBind: learnable for text, fixed 20 for audio).

Encoders whose raw items may be longer than one clip (audio, video) return ``(num_clips, ...)``
from ``preprocess``; :meth:`ModalityEncoder.collate_clips` batches them as a :class:`ClipBatch`
and ``forward`` averages the clip embeddings of each item.

Example::

    enc = create_encoder("digits_cnn", embed_dim=64)
    enc.freeze("trunk")                  # train the head only; trunk stays in eval mode
    z = enc.embed([array_28x28, ...])    # (N, 64), unit norm
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import ConfigError


@dataclass
class ClipBatch:
    """Clips of several items batched together.

    ``clips`` holds every clip of every item along dim 0; ``item_index[k]`` is the item clip ``k``
    belongs to. Clip embeddings are averaged per item. ``counts``, when known (:meth:`ModalityEncoder.collate_clips`
    sets it), is how many clips each item has, the clips grouped by item in item order: a batch can then be split by
    item (GradCache's chunks) with plain slices, without reading ``item_index`` back from the GPU.
    """

    clips: Tensor | dict[str, Tensor]  # (total_clips, ...)
    item_index: Tensor  # (total_clips,) long
    num_items: int
    counts: tuple[int, ...] | None = None  # clips per item, in order (None: item_index says, in any order)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ClipBatch:
        index = self.item_index.to(device, non_blocking=non_blocking)
        return ClipBatch(move_to(self.clips, device, non_blocking), index, self.num_items, self.counts)

    def pin_memory(self) -> ClipBatch:
        """Page-locked copies (what a DataLoader with ``pin_memory=True`` calls): copies to CUDA from pinned
        memory run asynchronously; from pageable memory they wait for the host."""
        clips = {k: v.pin_memory() for k, v in self.clips.items()} if isinstance(self.clips, dict) else None
        pinned = self.clips.pin_memory() if clips is None else clips
        return ClipBatch(pinned, self.item_index.pin_memory(), self.num_items, self.counts)


Batch = Union[Tensor, dict[str, Tensor], ClipBatch]  # noqa: UP007  (a runtime alias: `|` fails on 3.10 here)
FreezePart = Literal["none", "trunk", "all"]
HeadKind = Literal["linear", "mlp", "identity"]


def move_to(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move a tensor, a dict of tensors or a :class:`ClipBatch` to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, ClipBatch):
        return batch.to(device, non_blocking)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    return batch


def build_head(kind: HeadKind, in_dim: int, embed_dim: int) -> nn.Module:
    """Projection from trunk features to the shared space."""
    if kind == "linear":
        return nn.Linear(in_dim, embed_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, embed_dim))
    if kind == "identity":
        if in_dim != embed_dim:
            raise ConfigError(f"head='identity' needs trunk features of size embed_dim={embed_dim}, got {in_dim}")
        return nn.Identity()
    raise ConfigError(f"head must be one of 'linear', 'mlp', 'identity'; got {kind!r}")


class ModalityEncoder(nn.Module):
    """Base class: preprocess + trunk + head + postprocess for one modality.

    Subclasses set the trunk and implement :meth:`preprocess` and, when the trunk does not take the
    collated batch directly, :meth:`forward_features`. Those with blocks (transformer layers,
    ResNet stages) return them from :meth:`trunk_blocks` so the last N can be unfrozen.

    Args:
        modality: any name ("image", "imu", ...); a modality is a string, not an enum.
        trunk: the feature extractor.
        trunk_dim: size of the features :meth:`forward_features` returns.
        embed_dim: size of the shared embedding space.
        head: projection kind, "linear", "mlp" or "identity".
        logit_scale: initial 1 / temperature used when this modality meets the anchor.
        learnable_logit_scale: train the logit scale (clamped to ``max_logit_scale``) or keep it fixed.

    ``takes_text``: True for encoders whose raw items are strings (the command line then passes its
    arguments as the texts themselves rather than as file paths). ``file_suffixes``: the file types
    ``preprocess`` reads (lower case, with the dot), so that a folder given on the command line
    yields only those; None takes every file.
    """

    takes_text: bool = False
    file_suffixes: tuple[str, ...] | None = None

    def __init__(
        self,
        modality: str,
        trunk: nn.Module,
        trunk_dim: int,
        embed_dim: int,
        head: HeadKind = "linear",
        logit_scale: float = 1 / 0.07,
        learnable_logit_scale: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if not modality or not isinstance(modality, str):
            raise ConfigError(f"modality must be a non-empty string, got {modality!r}")
        if logit_scale <= 0 or logit_scale > max_logit_scale:
            raise ConfigError(f"logit_scale must be in (0, {max_logit_scale}], got {logit_scale}")
        self.modality = modality
        self.embed_dim = embed_dim
        self.trunk_dim = trunk_dim
        self.trunk = trunk
        self.head = build_head(head, trunk_dim, embed_dim)
        self.max_logit_scale = max_logit_scale
        # Stored as a log, as CLIP does, so that a learnable scale stays positive.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=learnable_logit_scale)
        self.learnable_logit_scale = learnable_logit_scale
        self.build_args: dict[str, Any] = {}  # set by the registry: {"name": ..., "kwargs": {...}}
        self.frozen_part: FreezePart = "none"
        self.unfreeze_last_blocks = 0

    # ---- what subclasses provide -------------------------------------------------------------
    def preprocess(self, item: Any) -> Tensor | dict[str, Tensor]:
        """Turn one raw item into a tensor (CPU, no grad). Default: the item must already be a tensor."""
        if isinstance(item, Tensor):
            return item
        raise TypeError(f"{type(self).__name__} cannot preprocess {type(item).__name__}; pass a tensor")

    def preprocess_many(
        self, items: Sequence[Any], augment: Any = None, generators: Sequence[torch.Generator] | None = None
    ) -> list[Any]:
        """Preprocess (and augment) many items: what a DataLoader worker runs for one batch.

        The result equals, to float precision, ``[augment.augment_tensor(preprocess(augment.augment_raw(item, g)),
        g) for item, g in zip(items, generators)]`` (``[preprocess(item) ...]`` without ``augment``), with the same
        random draws. This default is that loop; an encoder overrides it where one batched operation does the
        work of many small ones (an image tower renders a whole batch's augmentations in one ``grid_sample``).
        An error names no item here: the caller retries item by item to find the bad one."""
        if augment is None:
            return [self.preprocess(item) for item in items]
        assert generators is not None and len(generators) == len(items)
        return [
            augment.augment_tensor(self.preprocess(augment.augment_raw(item, g)), g)
            for item, g in zip(items, generators, strict=True)
        ]

    def collate(self, samples: Sequence[Any]) -> Batch:
        """Batch preprocessed items. Default: stack tensors along a new dim 0."""
        return torch.stack(list(samples))

    def forward_features(self, batch: Tensor | dict[str, Tensor]) -> Tensor:
        """(B, ...) -> (B, trunk_dim). Default: ``trunk(batch)``."""
        return self.trunk(batch)

    def share_trunk_with(self, other: ModalityEncoder, mode: Literal["share", "copy"] = "share") -> ModalityEncoder:
        """Take ``other``'s trunk: ``"share"`` ties the weights (one module), ``"copy"`` copies them once.

        A recipe's ``share_trunk_with`` calls this. Encoders that can use another tower's trunk override
        it (a video encoder runs its frames through an image encoder's); the default refuses."""
        raise ConfigError(
            f"encoder {self.build_args.get('name', type(self).__name__)!r} ({self.modality}) cannot take the trunk of "
            f"the {other.modality!r} encoder; share_trunk_with needs an encoder built to use another's trunk"
        )

    def trunk_blocks(self) -> list[nn.Module]:
        """The trunk's ordered blocks, for ``unfreeze_last_blocks``. Default: none."""
        return []

    def export_assets(self, directory: Path) -> dict[str, Any]:
        """Write files the encoder needs besides its weights (tokenizer, HF config) into ``directory``.

        Returns keyword arguments that override the registry arguments when the encoder is rebuilt
        from a saved model; a ``path`` among them is relative to the model directory. Default: nothing.
        """
        return {}

    def example_inputs(self, n: int, seed: int = 0) -> list:
        """``n`` raw items of the kind :meth:`preprocess` accepts (arrays, strings, ...), reproducible from ``seed``.

        The contract checks (:mod:`bind.testing`, ``bindkit check-encoder``) feed them to ``embed`` and to
        training steps; sizes that vary a little between items exercise padding and batching.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define example_inputs(n, seed): define it to return a list of n raw "
            "items of the kind its preprocess accepts (used by bind.testing and `bindkit check-encoder`)"
        )

    # ---- shared machinery ----------------------------------------------------------------------
    @staticmethod
    def collate_clips(samples: Sequence[Tensor]) -> ClipBatch:
        """Batch items of shape (num_clips, ...) into a :class:`ClipBatch`."""
        counts = tuple(s.shape[0] for s in samples)
        index = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts))
        return ClipBatch(torch.cat(list(samples)), index, len(samples), counts)

    # The logit scale's bounds live here, in these two methods: the scale used is capped at ``max_logit_scale``
    # (ImageBind's LearnableLogitScaling clips the same way), and after each optimizer step a learnable scale is
    # put back in [1, max_logit_scale] (CLIP clamps at 100), so it cannot drift where the cap hides its gradient.
    @property
    def logit_scale(self) -> Tensor:
        """1 / temperature, capped at ``max_logit_scale``."""
        return self.log_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep a learnable logit scale in [1, ``max_logit_scale``], in place (the trainer calls it after each
        step); a fixed one is left as built."""
        if self.log_logit_scale.requires_grad:
            self.log_logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, trunk_dim) -> (B, embed_dim), not normalised."""
        return self.head(features)

    def forward(self, batch: Batch) -> Tensor:
        """Collated batch -> (B, embed_dim) unit-norm embeddings."""
        if isinstance(batch, ClipBatch):
            return self.embed_features(self.forward_features(batch.clips), batch.item_index, batch.num_items)
        return self.embed_features(self.forward_features(batch))

    def embed_features(
        self, features: Tensor, item_index: Tensor | None = None, num_items: int | None = None
    ) -> Tensor:
        """Trunk features -> unit-norm embeddings: head, normalise, and average the clips of each item.

        ``features`` is (B, trunk_dim), or (total_clips, trunk_dim) with ``item_index`` saying which item
        each clip belongs to. Split from :meth:`forward` so that a frozen trunk's features can be cached.
        """
        embeddings = F.normalize(self.forward_head(features), dim=-1)
        if item_index is None:
            return embeddings
        summed = embeddings.new_zeros(num_items, embeddings.shape[-1]).index_add(0, item_index, embeddings)
        return F.normalize(summed, dim=-1)  # mean then renormalise: same direction as the mean

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def embed(
        self, items: Sequence[Any], batch_size: int = 64, workers: int | None = 0, show_progress: bool = False
    ) -> Tensor:
        """Raw items -> (N, embed_dim) unit-norm embeddings on the encoder's device, in input order, no grad.

        Texts are batched longest first (:func:`length_order`), so each batch pads to a length close to its own.
        ``workers``: reader processes preprocessing the next batches while the model runs (:func:`embed_batches`;
        None: :func:`default_workers`)."""
        if len(items) == 0:
            return torch.empty(0, self.embed_dim, device=self.device)
        plan = batch_plan(self, items, 0, len(items), batch_size)
        out = torch.empty(len(items), self.embed_dim, device=self.device)
        batches = embed_batches(self, items, plan, workers, keep_device=True)
        for rows, z in zip(
            plan,
            tqdm(batches, total=len(plan), desc=f"embed {self.modality}", unit="batch", disable=not show_progress),
            strict=True,
        ):
            out[torch.tensor(rows, device=self.device)] = z.to(out.dtype)
        return out

    def freeze(self, part: FreezePart = "all", unfreeze_last_blocks: int = 0) -> ModalityEncoder:
        """Choose what trains.

        ``"none"``: everything trains. ``"trunk"``: the head (and a learnable logit scale) trains, the
        trunk is frozen except its last ``unfreeze_last_blocks`` blocks. ``"all"``: nothing trains.
        Frozen parts stay in eval mode even under ``model.train()``, so BatchNorm statistics and
        dropout are fixed.
        """
        if part not in ("none", "trunk", "all"):
            raise ConfigError(f"freeze must be 'none', 'trunk' or 'all'; got {part!r}")
        blocks = self.trunk_blocks()
        if unfreeze_last_blocks and part != "trunk":
            raise ConfigError("unfreeze_last_blocks only applies with freeze='trunk'")
        if unfreeze_last_blocks > len(blocks):
            raise ConfigError(
                f"unfreeze_last_blocks={unfreeze_last_blocks} but encoder {self.build_args.get('name', type(self).__name__)!r} "
                f"has {len(blocks)} trunk blocks"
            )
        for p in self.parameters():
            p.requires_grad_(part == "none")
        if part != "all":
            self.log_logit_scale.requires_grad_(self.learnable_logit_scale)
        if part == "trunk":
            trainable = [self.head, *blocks[len(blocks) - unfreeze_last_blocks :]]
            for p in (p for module in trainable for p in module.parameters()):
                p.requires_grad_(True)
            for name, p in self.trunk.named_parameters():  # LoRA adapters (bind/lora.py) are what a frozen trunk trains
                if ".lora_" in name:
                    p.requires_grad_(True)
        self.frozen_part, self.unfreeze_last_blocks = part, unfreeze_last_blocks
        return self.train(self.training)

    @property
    def trunk_frozen(self) -> bool:
        """True when the trunk's output cannot change during training (its features may be cached)."""
        return not any(p.requires_grad for p in self.trunk.parameters())

    @property
    def frozen(self) -> bool:
        """True when no parameter of this encoder trains."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> ModalityEncoder:
        """Like ``nn.Module.train``, but a module whose parameters are all frozen stays in eval mode.

        Deciding by ``requires_grad`` rather than by name keeps this right for a trunk shared with
        another encoder: the shared module follows the freezing of whoever trains it.
        """
        super().train(mode)
        if mode:
            _train_where_trainable(self, parent_training=True)
        return self

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}, embed_dim={self.embed_dim}, freeze={self.frozen_part!r}"


def length_order(texts: Sequence[Any]) -> list[int]:
    """Indices of ``texts`` longest first (in characters; what is not a string counts as 0), ties in input order:
    the order sentence-transformers embeds in, so that a batch pads its texts to about their own length."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]) if isinstance(texts[i], str) else 0)


class _Failed:
    """What a reader process returns for a batch with a bad item: that item's own error, raised again by the main
    process (an exception raised in a worker comes back wrapped in a multi-line traceback)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class BatchReader(torch.utils.data.Dataset):
    """Batch ``b`` of ``plan`` (lists of item indices) read and preprocessed: what one reader process does."""

    def __init__(self, encoder: ModalityEncoder, items: Sequence[Any], plan: Sequence[Sequence[int]]) -> None:
        self.encoder, self.items, self.plan = encoder, items, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> Any:
        try:
            raws = [self.items[i] for i in self.plan[b]]
            try:
                samples = self.encoder.preprocess_many(raws)  # one call: a tokenizer's or an image tower's batched path
            except Exception:  # noqa: BLE001  item by item, so that the error raised is the bad item's own
                samples = [self.encoder.preprocess(raw) for raw in raws]
            return self.encoder.collate(samples)
        except Exception as err:  # noqa: BLE001  raised again in the main process, unwrapped
            return _Failed(err)


def default_workers(encoder: ModalityEncoder, batches: int) -> int:
    """Reader processes beside the model: none for texts (tokenising costs a small part of a forward pass) or for
    a single batch; on a GPU one per spare core, at most four; on the CPU only cores torch's threads leave idle
    (a reader on a core the forward pass uses slows it more than it saves: measured on 2 cores, a ResNet-18
    embedded PNGs at 0.79 of its forward-only rate with one reader and 0.93 with none)."""
    if encoder.takes_text or batches < 2:
        return 0
    cores = os.cpu_count() or 1
    if encoder.device.type == "cuda":
        return max(1, min(4, cores - 1))
    return max(0, min(4, cores - torch.get_num_threads()))


def batch_plan(
    encoder: ModalityEncoder, items: Sequence[Any], start: int, stop: int, batch_size: int
) -> list[list[int]]:
    """The batches of rows ``start:stop`` of ``items``: texts longest first (:func:`length_order`), else in order."""
    rows = list(range(start, stop))
    if encoder.takes_text:
        rows = [start + i for i in length_order([items[r] for r in rows])]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


@torch.no_grad()  # on a generator function, torch turns grad off around each step only, not while suspended
def embed_batches(
    encoder: ModalityEncoder,
    items: Sequence[Any],
    plan: Sequence[Sequence[int]],
    workers: int | None = None,
    keep_device: bool = False,
) -> Iterator[Tensor]:
    """The embeddings of each batch of ``plan``, in order (float32 on the CPU, or where the encoder runs with
    ``keep_device``), with ``workers`` DataLoader processes reading and preprocessing the next batches meanwhile:
    the model waits on reading only when reading is the slower of the two. An item that cannot be read or
    preprocessed raises its own error (naming it) here, in the caller's process."""
    device = encoder.device
    workers = default_workers(encoder, len(plan)) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        BatchReader(encoder, items, plan),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=device.type == "cuda",
    )
    for batch in loader:
        if isinstance(batch, _Failed):
            raise batch.error
        z = encoder(move_to(batch, device, non_blocking=True))
        yield z if keep_device else z.float().cpu()


def _train_where_trainable(module: nn.Module, parent_training: bool) -> None:
    """Training mode for modules with a trainable parameter; parameter-free modules follow their parent."""
    params = list(module.parameters())
    training = any(p.requires_grad for p in params) if params else parent_training
    module.training = training
    for child in module.children():
        _train_where_trainable(child, training)


def find_blocks(module: nn.Module) -> list[nn.Module]:
    """The longest ``nn.ModuleList`` inside ``module``: the layer stack of most transformers."""
    best: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) > len(best):
            best = list(child)
    return best
