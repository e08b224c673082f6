"""A recipe's keys as typed dataclasses, with every number key's range: what a recipe may say.

A recipe names the modalities (encoder + arguments + what is frozen), the data, and the stages.
``load_recipe`` checks every key against the dataclasses below (:mod:`bind.typed_yaml` reads the YAML
and converts it), then the rules across keys: encoder names and arguments, losses and augmenters
against their registries, data paths (:mod:`bind.recipe.checks`). Each error names the file, the
key, what was expected and what was found. The classes below never see the YAML: the trainer turns
them into plain arguments.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..typed_yaml import (
    BELOW_ONE,
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SHARE,
    Range,
    Ranges,
)


@dataclass
class DataSpec:
    """Where a modality's items come from: a registered dataset builder and its arguments."""

    source: str  # dataset builder: mnist, fsdd, digit_captions, moving_digits, manifest, shards, or a plugin's
    split: str = "train"  # the builder's split (digit datasets: train or eval; manifest: its split column, '*': all)
    args: dict[str, Any] = field(default_factory=dict)  # builder keyword arguments
    augment: dict[str, Any] = field(default_factory=dict)  # knobs of the encoder's augmenter (training only); {}: none
    stream: bool = False  # source shards: stream the tars (shuffle buffer, split over ranks and workers)
    shuffle_buffer: int = 1000  # stream: samples held for shuffling


@dataclass
class LoraSpec:
    """Low-rank adapters on the trunk (bind/lora.py): they and the head train, the trunk's weights do not."""

    rank: int = 8  # adapter rank: higher adapts more, trains more parameters (rank * (in + out) per layer)
    alpha: float = 16  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input, training only
    target_modules: list[str] | None = None  # layer names or dotted endings; null: per tower (BERT: query, value)


@dataclass
class ModalitySpec:
    """One modality: its encoder, what of it trains, and its data."""

    encoder: str  # registry name, see `bindkit encoders`
    args: dict[str, Any] = field(default_factory=dict)  # factory keyword arguments (embed_dim comes from the recipe)
    freeze: Literal["none", "trunk", "all"] = "none"  # none: all trains; trunk: the head trains; all: nothing trains
    unfreeze_last_blocks: int = 0  # with freeze trunk: the trunk's last this many blocks train too
    lora: LoraSpec | None = None  # train LoRA adapters instead of the trunk (freeze none acts as trunk); null: no LoRA
    share_trunk_with: str | None = None  # tie this encoder's trunk to that modality's (e.g. video frames to image)
    init_from: str | None = None  # start the trunk from this modality's trunk (e.g. image) when it first trains
    train_data: DataSpec | None = None  # training items; needed when a stage trains or pairs this modality
    eval_data: DataSpec | None = None  # evaluation items (zero-shot, retrieval); null: not evaluated


@dataclass
class OptimSpec:
    """AdamW with linear warmup, then cosine decay."""

    lr: float = 1e-3  # peak learning rate, reached after warmup
    weight_decay: float = 0.05  # not applied to norms, biases, logit scales
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW beta1, beta2
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0  # clip the gradient norm to this; null: no clipping
    grad_accum_steps: int = 1  # batches whose gradients add up to one optimizer step


@dataclass
class PairSpec:
    """One (anchor, modality) pairing inside a binding stage."""

    weight: float = 1.0  # this pair's share of the step's loss
    loss: str = "label_aware_info_nce"  # a bind loss (bind.list_losses("bind")): info_nce, label_aware_info_nce, ...
    batch_size: int = 128  # pairs per step, over all processes
    pairing: Literal["label", "row"] = "label"  # label: any anchor item of the same class; row: manifest rows


@dataclass
class StageSpec:
    """One training stage; stages run in order, each with its own optimizer."""

    name: str  # names the stage in logs and metrics.jsonl
    kind: Literal["pretrain", "bind"]  # pretrain: one modality alone; bind: pair modalities with the frozen anchor
    modality: str | None = None  # pretrain: the specialist's modality
    loss: str = "supcon"  # a pretrain loss (bind.list_losses("pretrain")): supcon, pairwise_cosine, ...
    temperature: float = 0.1  # pretrain losses' softmax temperature (supcon)
    batch_size: int = 256  # pretrain batch size, over all processes
    pairs: dict[str, PairSpec] = field(default_factory=dict)  # bind: modality -> pairing with the anchor
    freeze: dict[str, Literal["none", "trunk", "all"]] = field(default_factory=dict)  # modality -> freeze, this stage
    epochs: float | None = None  # passes over the largest training set of the stage
    steps: int | None = None  # or a fixed number of optimizer steps
    optimizer: OptimSpec = field(default_factory=OptimSpec)  # this stage's optimizer and learning-rate schedule
    log_every: int = 20  # optimizer steps between lines in metrics.jsonl (and the last step)
    chunk_size: int | None = None  # GradCache: embed in chunks of this many items (memory of one chunk, +1 forward)
    local_loss: bool = False  # multi-process: score this rank's rows against the global batch (N/W x N logits)


@dataclass
class EvalSpec:
    """Evaluation after training (and by `bindkit eval`)."""

    prompt_modality: str | None = (
        None  # zero-shot prototypes: mean of this modality's eval items per class; null: the one whose encoder reads text
    )
    max_items: int | None = None  # cap per modality, for quick runs
    tta: int = 1  # test-time augmentation: average each item's embedding over this many fixed views (1: off)
    sets: dict[str, dict[str, DataSpec]] = field(
        default_factory=dict
    )  # more eval sets by name: modality -> data replacing its eval_data there (the others keep theirs)


@dataclass
class Recipe:
    """A whole recipe: the top-level keys of the YAML file."""

    anchor_modality: str  # the modality whose space the others bind to (frozen in bind stages)
    modalities: dict[str, ModalitySpec]  # modality name -> its encoder, freezing and data
    stages: list[StageSpec]  # training stages, run in order
    embed_dim: int = 128  # size of the shared embedding space (every encoder's output)
    seed: int = 0  # seeds Python, NumPy and torch, data order and augmentation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if available, else CPU
    data_root: str | None = None  # default: $BINDKIT_DATA, else ../shared/data
    num_workers: int = 0  # DataLoader workers; 0 preprocesses in the main process
    plugins: list[str] = field(default_factory=list)  # modules that register encoders or datasets
    tensorboard: bool = False  # also log scalars to RUN_DIR/tensorboard (needs the tensorboard package)
    feature_cache: bool = True  # compute frozen, unaugmented trunks' features once per stage (false: every step)
    cache_dir: str | None = None  # keep those features on disk here (memory-mapped, reused across runs); null: RAM
    # tf32: float32 matmuls and convolutions on CUDA's TF32 tensor cores (~1e-3 relative error, several times faster)
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"  # auto: bf16 on CUDA; fp32: TF32 off; tf32: TF32 on
    channels_last: bool = False  # Conv2d towers: NHWC memory format (faster convolutions with bf16 on CUDA)
    # eager and aot_eager trace without generating code: a quick check that the towers compile without graph breaks
    compile: bool | Literal["inductor", "eager", "aot_eager"] = False  # torch.compile trained trunks (true: inductor)
    distributed_timeout_s: float | None = None  # torchrun: seconds a collective may wait (null: torch's, 10 min NCCL)
    checkpoint_every: int | None = 200  # optimizer steps between checkpoints (also at epoch ends); null: epochs only
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN_DIR/checkpoints
    on_bad_item: Literal["skip", "fail"] = "skip"  # skip: a corrupt item is replaced by the next one and counted
    max_bad_fraction: float = 0.01  # stop when more than this share of a training set is bad
    max_nonfinite_steps: int = 5  # NaN/inf losses are skipped; this many in a row stop the run
    eval: EvalSpec = field(default_factory=EvalSpec)  # evaluation settings
    source: str = "<recipe>"  # where it was loaded from (set by load_recipe)


# ---- value ranges --------------------------------------------------------------------------------
# Every number key and the values it takes, in one place: `build` checks each as it reads it (floats are
# already finite then: NaN and inf are refused everywhere). tests/test_recipe_values.py fails on a number key
# missing here. Rules across keys (epochs or steps, a positive pair weight) are bind.recipe.checks'.
RANGES: Ranges = {
    Recipe: {
        "embed_dim": POSITIVE_INT,
        "seed": Range("an integer in [0, 2**32) (NumPy's seed range)", lambda v: 0 <= v < 2**32),
        "num_workers": COUNT,
        "checkpoint_every": POSITIVE_INT,
        "distributed_timeout_s": POSITIVE,
        "keep_checkpoints": POSITIVE_INT,
        "max_bad_fraction": SHARE,
        "max_nonfinite_steps": POSITIVE_INT,
    },
    DataSpec: {"shuffle_buffer": POSITIVE_INT},
    LoraSpec: {"rank": POSITIVE_INT, "alpha": POSITIVE, "dropout": Range("a probability in [0, 1)", BELOW_ONE.accepts)},
    ModalitySpec: {"unfreeze_last_blocks": COUNT},
    OptimSpec: {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "betas": BELOW_ONE,  # each of the two
        "warmup_steps": COUNT,
        "min_lr_ratio": SHARE,
        "grad_clip": POSITIVE,
        "grad_accum_steps": POSITIVE_INT,
    },
    PairSpec: {"weight": NON_NEGATIVE, "batch_size": POSITIVE_INT},
    StageSpec: {
        "temperature": POSITIVE,
        "batch_size": POSITIVE_INT,
        "epochs": POSITIVE,
        "steps": POSITIVE_INT,
        "log_every": POSITIVE_INT,
        "chunk_size": POSITIVE_INT,
    },
    EvalSpec: {"max_items": POSITIVE_INT, "tta": Range("an integer in 1..16", lambda v: 1 <= v <= 16)},
}


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (written to the run directory as recipe.yaml)."""
    data = dataclasses.asdict(recipe)
    data.pop("source")
    return json.loads(json.dumps(data))  # tuples -> lists, so a safe YAML dumper can write it


# keys that change where and how a run reads and writes, not what it computes
RUN_ONLY_KEYS = frozenset(
    {
        "source",
        "data_root",
        "num_workers",
        "cache_dir",
        "tensorboard",
        "checkpoint_every",
        "keep_checkpoints",
        "distributed_timeout_s",
    }
)


def changed_keys(saved: Any, recipe: Recipe) -> list[str]:
    """Top-level keys whose values differ between a saved recipe (plain data) and ``recipe``, run-only keys aside."""
    saved = saved if isinstance(saved, dict) else {}
    current = recipe_to_dict(recipe)
    return sorted(k for k in (set(saved) | set(current)) - RUN_ONLY_KEYS if saved.get(k) != current.get(k))
