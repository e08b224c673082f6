"""The contract every registered encoder signs up for, as checks anyone can run on their own encoder.

Each check builds the encoder's tiny variant (the ``tiny=`` arguments of ``@register_encoder``, seeded)
and feeds it the encoder's own :meth:`~bind.ModalityEncoder.example_inputs`:

- ``example_inputs``: ``example_inputs(n)`` gives ``n`` raw items that ``preprocess`` and ``collate`` accept;
- ``embed``: ``embed`` gives ``(n, embed_dim)`` unit-norm rows, and batching does not change an item's embedding;
- ``backward``: a contrastive loss reaches every trainable parameter, with finite gradients;
- ``freeze_all``: ``freeze("all")`` leaves nothing trainable and every module in eval mode under ``train()``;
- ``freeze_trunk``: ``freeze("trunk")`` trains only the head and logit scale; ``unfreeze_last_blocks=1``
  trains the last of ``trunk_blocks()`` and not the first;
- ``save_load``: a :class:`~bind.model.BindModel` saved and loaded again gives identical outputs.

The built-in encoders run them in bindkit's own tests; a plugin's author runs them from their own pytest::

    import my_encoders  # noqa: F401  (registers my_encoder)
    import pytest
    from bind.testing import CONTRACT_CHECKS, check_encoder

    @pytest.mark.parametrize("check", CONTRACT_CHECKS)
    def test_contract(check, tmp_path):
        check_encoder("my_encoder", tmp_path, checks=[check], strict=True)

or from a shell: ``bindkit check-encoder my_encoder --plugin my_encoders``. Without ``strict``,
:func:`check_encoder` returns one :class:`CheckResult` per check instead of raising on the first failure.
Only torch and bindkit are imported here (no pytest).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .encoder import ModalityEncoder, move_to
from .errors import ConfigError, did_you_mean
from .losses import info_nce
from .registry import create_encoder, get_encoder_info

# Parameters that may lack a gradient: the pooler layers of some Hugging Face towers are unused by design.
NO_GRAD_OK = ("pooler",)

Build = Callable[[], ModalityEncoder]


class EncoderCheckError(AssertionError):
    """A contract check failed (raised by ``check_encoder(..., strict=True)``); the message says which and why."""


@dataclass
class CheckResult:
    """The outcome of one check on one encoder; ``message`` (one line) says what failed."""

    encoder: str
    check: str
    ok: bool
    message: str = ""
    seconds: float = 0.0
    error: BaseException | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.encoder} {self.check}: " + ("ok" if self.ok else f"FAIL: {self.message}")


def check_encoder(
    name: str,
    scratch_dir: str | Path,
    checks: Iterable[str] | None = None,
    *,
    strict: bool = False,
    seed: int = 0,
) -> list[CheckResult]:
    """Run the contract ``checks`` (default: all of :data:`CONTRACT_CHECKS`, in order) on encoder ``name``.

    ``scratch_dir`` receives the tiny variant's files (towers whose ``tiny`` saves a small pretrained model)
    and the save/load round trip. ``strict``: raise :class:`EncoderCheckError` (an ``AssertionError``) on the
    first failure, chained to its cause, instead of returning the results. An unregistered ``name`` raises
    :class:`~bind.UnknownEncoderError` and an unknown check name :class:`~bind.ConfigError` either way.
    """
    info = get_encoder_info(name)
    selected = _select(checks)
    scratch_dir = Path(scratch_dir)
    tiny: dict[str, Any] | None = None
    results = []
    for check in selected:
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
                if tiny is None:
                    tiny = _tiny_kwargs(info.tiny_kwargs, scratch_dir / "tiny")
                _CHECKS[check](functools.partial(_build, name, tiny, seed), scratch_dir / check, seed)
        except Exception as err:
            result = CheckResult(name, check, False, _describe(err), time.perf_counter() - start, err)
            if strict:
                raise EncoderCheckError(f"encoder {name!r} fails check {check!r}: {result.message}") from err
        else:
            result = CheckResult(name, check, True, "", time.perf_counter() - start)
        results.append(result)
    return results


def _select(checks: Iterable[str] | None) -> list[str]:
    if checks is None:
        return list(CONTRACT_CHECKS)
    selected = [checks] if isinstance(checks, str) else list(checks)
    for check in selected:
        if check not in _CHECKS:
            raise ConfigError(
                f"unknown contract check {check!r}; {did_you_mean(check, CONTRACT_CHECKS)}"
                f"the checks are: {', '.join(CONTRACT_CHECKS)}"
            )
    return selected


def _tiny_kwargs(tiny_kwargs: Callable[[Path], dict[str, Any]], directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return tiny_kwargs(directory)
    except Exception as err:
        raise AssertionError(
            f"making the tiny variant's arguments (tiny= of @register_encoder) failed: {_describe(err)}"
        ) from err


def _build(name: str, kwargs: dict[str, Any], seed: int) -> ModalityEncoder:
    torch.manual_seed(seed)
    try:
        return create_encoder(name, **kwargs).cpu()
    except Exception as err:
        raise AssertionError(f"building the tiny variant {kwargs} failed: {_describe(err)}") from err


def _describe(err: BaseException) -> str:
    """One line: the message of an AssertionError, ``Type: message`` of anything else."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, AssertionError):
        return text or "assertion failed"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _short(values: Sequence[str], limit: int = 6) -> str:
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(values[:limit]) + more


# ---- the checks: each builds its own encoder and raises AssertionError saying what failed -------------------
def _examples(encoder: ModalityEncoder, n: int, seed: int) -> list:
    try:
        items = encoder.example_inputs(n, seed=seed)
    except NotImplementedError as err:
        raise AssertionError(str(err) or f"{type(encoder).__name__}.example_inputs is not implemented") from err
    except Exception as err:
        raise AssertionError(f"example_inputs({n}, seed={seed}) raised {_describe(err)}") from err
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) != n:
        got = f"{len(items)} items" if isinstance(items, Sequence) else type(items).__name__
        raise AssertionError(f"example_inputs({n}, seed={seed}) must return a list of {n} raw items, got {got}")
    return list(items)


def _batch(encoder: ModalityEncoder, items: list) -> Any:
    samples = []
    for i, item in enumerate(items):
        try:
            samples.append(encoder.preprocess(item))
        except Exception as err:
            raise AssertionError(
                f"preprocess rejects item {i} of example_inputs ({_kind(item)}): {_describe(err)}; "
                "example_inputs must return items of the kind preprocess accepts"
            ) from err
    try:
        return encoder.collate(samples)
    except Exception as err:
        raise AssertionError(f"collate fails on the preprocessed example_inputs: {_describe(err)}") from err


def _kind(item: Any) -> str:
    shape = getattr(item, "shape", None)
    if shape is not None:
        return f"{type(item).__name__} of shape {tuple(shape)} and dtype {getattr(item, 'dtype', '?')}"
    return f"{type(item).__name__} {str(item)[:40]!r}"


def check_example_inputs(build: Build, scratch: Path, seed: int) -> None:
    """``example_inputs(n)`` gives ``n`` items that ``preprocess`` and ``collate`` accept; ``preprocess_many`` (what
    a DataLoader worker runs per batch) gives what ``preprocess`` gives item by item."""
    encoder = build()
    for n in (1, 3):
        _batch(encoder, _examples(encoder, n, seed))
    items = _examples(encoder, 3, seed)
    try:
        many = encoder.preprocess_many(items)
    except Exception as err:
        raise AssertionError(f"preprocess_many of the example_inputs raised {_describe(err)}") from err
    assert len(many) == len(items), f"preprocess_many of {len(items)} items returned {len(many)}"
    for i, (got, item) in enumerate(zip(many, items, strict=True)):
        want = encoder.preprocess(item)
        pairs = [(k, got[k], want[k]) for k in want] if isinstance(want, dict) else [("", got, want)]
        for key, g, w in pairs:
            if not isinstance(w, torch.Tensor):
                continue
            if g.shape != w.shape or not torch.allclose(g.float(), w.float(), atol=1e-4, rtol=1e-4):
                raise AssertionError(
                    f"preprocess_many differs from preprocess on item {i}{f' [{key!r}]' if key else ''}: it must "
                    "give the same values, only faster (or leave the default, a loop over preprocess)"
                )


def check_embed(build: Build, scratch: Path, seed: int) -> None:
    """``embed`` gives unit-norm ``(n, embed_dim)`` rows; an item's embedding does not depend on its batch."""
    encoder = build().eval()
    items = _examples(encoder, 3, seed)
    z = encoder.embed(items, batch_size=2)
    expected = (3, encoder.embed_dim)
    assert tuple(z.shape) == expected, f"embed of 3 items gave shape {tuple(z.shape)}, expected {expected}"
    assert torch.isfinite(z).all(), "embed gave non-finite values (NaN or inf)"
    norms = z.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5, rtol=0), (
        f"embeddings are not unit norm: row norms {[round(v, 4) for v in norms.tolist()]}; forward must end with "
        "L2 normalisation (override forward_features or forward_head, not forward)"
    )
    alone = encoder.embed(items[:1])
    if not torch.allclose(alone, z[:1], atol=1e-5, rtol=1e-4):
        diff = (alone - z[:1]).abs().max().item()
        raise AssertionError(
            f"batching changes an item's embedding: item 0 alone differs from item 0 in a batch of 2 by {diff:.2e} "
            "(max abs); in eval mode padding, masks or batch statistics must not leak between items"
        )


def check_backward(build: Build, scratch: Path, seed: int) -> None:
    """A contrastive loss on a training-mode batch reaches every trainable parameter with a finite gradient."""
    encoder = build().train()
    z = encoder(_batch(encoder, _examples(encoder, 4, seed)))
    assert z.requires_grad, "the output of forward in training mode does not require grad: nothing would train"
    target = F.normalize(torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)), dim=-1)
    info_nce(z, target.to(z.dtype), encoder.logit_scale).backward()
    params = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None and not any(ok in n for ok in NO_GRAD_OK)]
    assert not missing, (
        f"{len(missing)} trainable parameter(s) get no gradient: {_short(missing)}; use them in forward, or set "
        "requires_grad=False on parameters that never train"
    )
    bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients (NaN or inf) in {_short(bad)}"


def check_freeze_all(build: Build, scratch: Path, seed: int) -> None:
    """``freeze("all")``: no parameter trains, every module stays in eval mode under ``train()``, no grad out."""
    encoder = build().freeze("all")
    encoder.train()  # a training loop calls model.train(): frozen parts must stay in eval mode
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert not trainable, f"after freeze('all') these parameters still require grad: {_short(trainable)}"
    training = [n or "(the encoder itself)" for n, m in encoder.named_modules() if m.training]
    assert not training, (
        f"after freeze('all') and train(), modules in training mode: {_short(training)}; frozen modules must stay "
        "in eval mode (do not override train(), or call super().train())"
    )
    z = encoder(_batch(encoder, _examples(encoder, 3, seed)))
    assert not z.requires_grad, (
        "after freeze('all') the output still requires grad: a tensor outside the encoder's parameters takes part"
    )


def check_freeze_trunk(build: Build, scratch: Path, seed: int) -> None:
    """``freeze("trunk")`` trains only the head and logit scale; ``unfreeze_last_blocks=1`` the last trunk block."""
    encoder = build().freeze("trunk")
    encoder.train()
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable, (
        "freeze('trunk') leaves nothing trainable: the head (or a learnable logit scale) must train; "
        "head='identity' with a fixed logit scale has nothing to train on a frozen trunk"
    )
    outside = [n for n in trainable if not (n.startswith("head.") or n == "log_logit_scale")]
    assert not outside, (
        f"freeze('trunk') leaves parameters outside the head training: {_short(outside)}; "
        "put every feature-extracting module under self.trunk"
    )
    training = [n or "(the trunk itself)" for n, m in encoder.trunk.named_modules() if m.training]
    assert not training, f"after freeze('trunk') and train(), trunk modules in training mode: {_short(training)}"
    blocks = encoder.trunk_blocks()
    if not blocks:
        return
    encoder.freeze("trunk", unfreeze_last_blocks=1).train()
    assert all(p.requires_grad for p in blocks[-1].parameters()), (
        "freeze('trunk', unfreeze_last_blocks=1) left the last of trunk_blocks() frozen; "
        "trunk_blocks() must return modules of this encoder"
    )
    assert blocks[-1].training, "freeze('trunk', unfreeze_last_blocks=1): the last trunk block is not in training mode"
    if len(blocks) > 1:
        assert not any(p.requires_grad for p in blocks[0].parameters()), (
            "freeze('trunk', unfreeze_last_blocks=1) also unfroze the first of trunk_blocks(); "
            "its blocks must be distinct modules, first to last"
        )


def check_save_load(build: Build, scratch: Path, seed: int) -> None:
    """A :class:`~bind.model.BindModel` saved and loaded again gives identical outputs and logit scale."""
    from .model import BindModel

    encoder = build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move weights off their init, so a load that silently re-initialises would show
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(p.dtype))
    model = BindModel({encoder.modality: encoder}, anchor_modality=encoder.modality).eval()
    items = _examples(encoder, 3, seed)
    batch = _batch(encoder, items)
    with torch.no_grad():
        before = model(encoder.modality, batch)
    directory = scratch / "model"
    model.save_pretrained(directory)
    try:
        loaded = BindModel.from_pretrained(directory).eval()
    except Exception as err:
        raise AssertionError(f"BindModel.from_pretrained fails on the saved model: {_describe(err)}") from err
    reloaded = loaded[encoder.modality]
    with torch.no_grad():
        after = loaded(encoder.modality, move_to(batch, "cpu"))
    _assert_same(after, before, "the reloaded model's embeddings of the same batch")
    _assert_same(
        reloaded.logit_scale.detach(), encoder.logit_scale.detach(), "the reloaded logit scale", atol=1e-6, rtol=1e-6
    )
    # preprocessing travels too (tokenizers, processors, settings kept outside the weights)
    _assert_same(reloaded.embed(items), encoder.embed(items), "the reloaded encoder's embed of the same raw items")


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what} has shape {tuple(got.shape)}, before saving {tuple(want.shape)}")
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        diff = (got - want).abs().max().item()
        raise AssertionError(
            f"{what} differs from before saving by {diff:.2e} (max abs): something the encoder uses is not saved; "
            "keep state in parameters or buffers, or make it a factory argument (export_assets for files)"
        )


_CHECKS: dict[str, Callable[[Build, Path, int], None]] = {
    "example_inputs": check_example_inputs,
    "embed": check_embed,
    "backward": check_backward,
    "freeze_all": check_freeze_all,
    "freeze_trunk": check_freeze_trunk,
    "save_load": check_save_load,
}
CONTRACT_CHECKS: tuple[str, ...] = tuple(_CHECKS)  # in the order they run
