"""LoRA adapters on any encoder's trunk, through ``peft``: low-rank updates train, the tower's own weights do not.

``apply_lora`` injects peft's LoRA layers into ``encoder.trunk`` in place (``peft.inject_adapter_in_model``),
so the trunk stays the same module, Hugging Face model or plain torchvision ``nn.Module`` alike, and only
the adapted layers gain ``base_layer`` / ``lora_A`` / ``lora_B`` children. A saved model keeps every weight
in its ``model.safetensors`` (one file to reload); :func:`save_adapter` also writes the adapter in peft's own
format (``adapter_config.json`` + ``adapter_model.safetensors``) next to the encoder's other assets.

What trains: the LoRA matrices, the head and a learnable logit scale, plus the last
``unfreeze_last_blocks`` blocks when the encoder was frozen with them. ``lora_B`` starts at zero, so an
adapted tower computes exactly what it did before until it trains.

Example::

    enc = create_encoder("minilm", embed_dim=256).freeze("trunk")
    apply_lora(enc, rank=8, alpha=16)          # query/value of every BERT layer
    [n for n, p in enc.named_parameters() if p.requires_grad]   # lora_A/lora_B, head, log_logit_scale
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .encoder import ModalityEncoder
from .errors import ConfigError
from .recipe import RANGES, LoraSpec
from .typed_yaml import build

ADAPTER_NAME = "default"  # peft's name for a model's only adapter
ADAPTER_DIR = "adapter"  # under assets/<modality>/ of a saved model
# peft's PeftModel.save_pretrained prefixes adapter keys so; written the same, PeftModel.from_pretrained reads them.
PEFT_KEY_PREFIX = "base_model.model."

# Defaults per tower family, tried in order: the first whose every name matches a layer of the trunk wins.
DEFAULT_TARGETS: list[tuple[str, list[str]]] = [
    ("BERT, RoBERTa, MiniLM (Hugging Face)", ["query", "value"]),  # the LoRA paper's choice: W_q and W_v
    ("CLIP and most other Hugging Face towers", ["q_proj", "v_proj"]),
    # torchvision ViT: nn.MultiheadAttention packs q/k/v into one in_proj_weight parameter (no nn.Linear to
    # wrap) and never calls out_proj's forward (LoRA there would be silently ignored); peft's workaround
    # merges weights on every forward and re-creates the base parameters, so the MLP linears are adapted.
    ("torchvision ViT", ["mlp.0", "mlp.3"]),
]
# Anything else (ResNets, digits_cnn, plugins): every Linear and Conv layer of the trunk.


def _adaptable(module: nn.Module) -> bool:
    """Layers peft's LoRA wraps as plain modules (transformers' GPT-2 ``Conv1D`` included)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or type(module).__name__ == "Conv1D"


def adaptable_layers(trunk: nn.Module) -> list[str]:
    """Full names of the trunk's layers LoRA can adapt (``nn.MultiheadAttention.out_proj`` excluded: see above)."""
    inside_attention = {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in trunk.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }
    return [n for n, m in trunk.named_modules() if n and _adaptable(m) and n not in inside_attention]


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the full name, or its ending after a dot."""
    return name == target or name.endswith(f".{target}")


def _layer_summary(names: Sequence[str], limit: int = 40) -> str:
    """Layer names with block indices collapsed (``encoder.layer.*.attention.self.query``), for error messages.

    Only indices followed by more of the name are blocks; a last index names the layer (``mlp.0``, ``mlp.3``).
    """
    patterns = list(dict.fromkeys(re.sub(r"(?<=[._])\d+(?=\.)", "*", n) for n in names))
    shown = ", ".join(patterns[:limit]) + (f", ... ({len(patterns) - limit} more)" if len(patterns) > limit else "")
    return shown or "none"


def resolve_target_modules(encoder: ModalityEncoder, target_modules: Sequence[str] | None = None) -> list[str]:
    """The target names peft gets: ``target_modules`` checked against the trunk, or the family default.

    Each name must match (as peft matches: the full name or its ending after a dot) at least one layer LoRA
    can adapt, and nothing else; a :class:`ConfigError` names the modality and lists the layers there are.
    """
    trunk = encoder.trunk
    layers = adaptable_layers(trunk)
    if target_modules is None:
        for _family, names in DEFAULT_TARGETS:
            if all(any(_matches(layer, t) for layer in layers) for t in names):
                return list(names)
        if not layers:
            raise ConfigError(
                f"lora: the {encoder.modality!r} encoder's trunk ({type(trunk).__name__}) has no Linear or Conv "
                "layer to adapt; drop lora for this modality"
            )
        # peft also matches a name's dotted ending; keep the names that reach adaptable layers only
        names, adaptable = [n for n, _ in trunk.named_modules() if n], set(layers)
        return [t for t in layers if all(n in adaptable for n in names if _matches(n, t))]
    if isinstance(target_modules, str) or not target_modules:
        raise ConfigError(f"lora.target_modules: expected a non-empty list of layer names, got {target_modules!r}")
    all_modules = dict(trunk.named_modules())
    name = encoder.build_args.get("name", type(encoder).__name__)
    for target in target_modules:
        matched = [n for n in all_modules if n and _matches(n, target)]
        wrong = [n for n in matched if n not in layers]
        if matched and not wrong:
            continue
        if wrong:
            found = ", ".join(f"{n} ({type(all_modules[n]).__name__})" for n in wrong[:3])
            what = f"matches {found}, which LoRA cannot adapt (it needs Linear or Conv layers)"
        else:
            what = "matches no layer"
        raise ConfigError(
            f"lora.target_modules: {target!r} {what} in the {encoder.modality!r} encoder ({name}); its Linear and "
            f"Conv layers are: {_layer_summary(layers)}. Name a layer by its full name or a dotted ending of it "
            "(as peft does), e.g. the last part of a name above"
        )
    return list(target_modules)


def has_lora(encoder: ModalityEncoder) -> bool:
    return ADAPTER_NAME in getattr(encoder.trunk, "peft_config", {})


def apply_lora(
    encoder: ModalityEncoder,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
) -> ModalityEncoder:
    """Inject LoRA layers of ``rank`` (scaled by ``alpha / rank``) into ``encoder.trunk``, in place.

    Call it after :meth:`ModalityEncoder.freeze`: the trunk's own weights keep what ``freeze`` decided
    (``"none"`` is taken as ``"trunk"``, since LoRA replaces training the trunk), the adapters train unless
    the encoder is frozen ``"all"``. ``target_modules=None`` picks :data:`DEFAULT_TARGETS` by tower family.
    Training mode keeps following ``requires_grad``, so LoRA dropout is active in training only.
    """
    import peft  # imports transformers: only paid for by runs that use LoRA

    if has_lora(encoder):
        raise ConfigError(f"the {encoder.modality!r} encoder already has LoRA adapters; apply LoRA once")
    # the recipe's own rule for these values (types and ranges, bind.recipe.RANGES), also for Python callers
    targets = None if target_modules is None or isinstance(target_modules, str) else list(target_modules)
    build(LoraSpec, {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": targets}, "lora", RANGES)
    targets = resolve_target_modules(encoder, target_modules)
    if encoder.frozen_part == "none":
        encoder.freeze("trunk")
    # peft freezes every base weight of the module it adapts; remember what freeze() chose (unfrozen blocks)
    before = {id(p): p.requires_grad for p in encoder.trunk.parameters()}
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft.inject_adapter_in_model(config, encoder.trunk, adapter_name=ADAPTER_NAME)
    adapters_train = encoder.frozen_part != "all"
    for p in encoder.trunk.parameters():  # parameters new since then are the adapters
        p.requires_grad_(before.get(id(p), adapters_train))
    return encoder.train(encoder.training)


def lora_config(encoder: ModalityEncoder) -> dict[str, Any] | None:
    """The :func:`apply_lora` arguments that built this encoder's adapters (``None`` without LoRA)."""
    if not has_lora(encoder):
        return None
    config = encoder.trunk.peft_config[ADAPTER_NAME]
    targets = config.target_modules
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        # peft keeps the names as a set; sorted so configs compare and diff stably
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
    }


def apply_lora_from_config(encoder: ModalityEncoder, settings: Any, where: str) -> ModalityEncoder:
    """:func:`apply_lora` with the settings :func:`lora_config` recorded in a saved model's ``config.json``."""
    keys = ("rank", "alpha", "dropout", "target_modules")
    if not isinstance(settings, Mapping) or set(settings) - set(keys) or "rank" not in settings:
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(keys)} (rank required), got {settings!r}")
    try:
        return apply_lora(encoder, **settings)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def save_adapter(encoder: ModalityEncoder, directory: Path) -> Path:
    """Write the encoder's adapter in peft's format: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(trunk, directory)`` loads it onto an un-adapted copy of the trunk.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not has_lora(encoder):
        raise ConfigError(f"the {encoder.modality!r} encoder has no LoRA adapters to save")
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(encoder.trunk, adapter_name=ADAPTER_NAME)
    tensors = {PEFT_KEY_PREFIX + key: t.detach().contiguous().cpu() for key, t in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    encoder.trunk.peft_config[ADAPTER_NAME].save_pretrained(str(directory))  # adapter_config.json
    return directory
