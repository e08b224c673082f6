"""The memory budget (:mod:`bind.budget`): every tower is built first on the meta device and counted, and a model
whose weights exceed the budget is refused in one line naming the key, by ``bindkit validate``, before ``bindkit
run`` builds it, and before a saved model's config.json is built; nothing is allocated on the way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import bind.registry
from bind import ConfigError, ModalityEncoder, create_encoder, register_encoder
from bind.budget import ENV_VAR, MemoryBudgetError, format_size, measure_tower, memory_budget, parse_size
from bind.model import BindModel
from bind.recipe import load_recipe, parse_recipe
from bind.registry import get_encoder_info
from bind.train.trainer import build_model

REPO = Path(__file__).resolve().parents[1]
WIDTH, DEPTH = 16384, 256  # the ImageBind-format file: 3.0 TiB of weights declared in a few hundred KB


def huge_imagebind_checkpoint(path: Path, out_dim: int = 16) -> Path:
    """An ImageBind-format vision tower whose tensors declare width 16384 and 256 blocks, in about 1 MB.

    ``infer_config`` reads the width off block 0's ``norm_1.weight``, the depth off the block numbers, the output
    size off the projection, the patch grid off the position embedding's length and the stem's kernel: every
    other tensor may be one number."""
    pre, trunk, head = "modality_preprocessors.vision.", "modality_trunks.vision.", "modality_heads.vision."
    state = {f"{trunk}blocks.0.norm_1.weight": torch.zeros(WIDTH)}
    state |= {f"{trunk}blocks.{i}.norm_1.weight": torch.zeros(1) for i in range(1, DEPTH)}
    state[f"{head}2.weight"] = torch.zeros(out_dim, WIDTH)
    state[f"{pre}pos_embedding_helper.pos_embed"] = torch.zeros(1, 2, 1)  # one patch and the CLS token
    state[f"{pre}rgbt_stem.proj.1.weight"] = torch.zeros(1, 1, 2, 1, 1)  # a 2-frame, 1-pixel kernel
    torch.save(state, path)
    assert path.stat().st_size < 2 << 20
    return path


def imagebind_recipe(tmp_path: Path, checkpoint: Path) -> Path:
    data = {
        "anchor_modality": "image",
        "embed_dim": 16,
        "modalities": {"image": {"encoder": "imagebind_image", "args": {"checkpoint": str(checkpoint)}}},
        "stages": [],  # assembles the model: nothing trains
    }
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def digits_config() -> dict:
    """A saved model's config: digits_cnn image and audio_vit audio, 16-d."""
    image = create_encoder("digits_cnn", width=4, embed_dim=16)
    audio = create_encoder("audio_vit", **get_encoder_info("audio_vit").tiny_kwargs(Path()))
    return BindModel({"image": image, "audio": audio}, "image").config()


@pytest.fixture
def budget(monkeypatch):
    """Set $BINDKIT_MEMORY_BUDGET for the test."""
    return lambda size: monkeypatch.setenv(ENV_VAR, size)


# ---- sizes ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [("8GiB", 8 << 30), ("8G", 8 << 30), ("8 gib", 8 << 30), ("8GB", 8 * 10**9), ("512MiB", 512 << 20),
     ("1.5TiB", 3 << 39), ("1000000", 10**6), ("100B", 100)],
)  # fmt: skip
def test_sizes_are_read_binary_unless_written_in_si(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "8XB", "lots", "8 GiB of RAM"])
def test_a_bad_budget_is_one_line_naming_the_variable(text):
    with pytest.raises(ConfigError, match=rf"^{ENV_VAR}: expected a size such as 8GiB, 500MB or a number of bytes"):
        parse_size(text)


def test_sizes_are_written_with_two_figures_at_least():
    assert [format_size(n) for n in (640, 2048, 18 << 30, 1.2 * 2**40, 3298753773572)] == [
        "640 B", "2.0 KiB", "18 GiB", "1.2 TiB", "3.0 TiB"
    ]  # fmt: skip


def test_the_default_budget_is_a_share_of_the_memory_available_and_the_variable_overrides_it(budget):
    default = memory_budget("cpu")
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # at most 90% of MemAvailable (which moves a little between two reads), or a cgroup's limit
        available = int(next(line.split()[1] for line in meminfo.read_text().splitlines() if "MemAvailable" in line))
        assert 0 < default.limit <= available * 1024 * 0.95
    assert default.source.startswith("90% of the ") and ENV_VAR in default.source
    budget("3GiB")
    assert (memory_budget("auto").limit, memory_budget("auto").source) == (3 << 30, ENV_VAR)


# ---- counting on the meta device --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits_cnn", "audio_vit", "imagebind_text", "video_frames", "hf_clip_vision"])
def test_the_count_on_the_meta_device_is_what_the_real_tower_allocates(name, tmp_path):
    kwargs = get_encoder_info(name).tiny_kwargs(tmp_path)
    size = measure_tower(name, kwargs)
    real = create_encoder(name, **kwargs)
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*real.parameters(), *real.buffers())
    }
    assert size.total == sum(storages.values()) > 0  # what the real tower holds, tied tensors once
    assert size.head == sum(t.untyped_storage().nbytes() for t in real.head.parameters())
    assert (size.width, size.embed_dim, size.blocks) == (real.trunk_dim, real.embed_dim, len(real.trunk_blocks()))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Encoders registered inside a test are gone after it."""
    monkeypatch.setattr(bind.registry, "_REGISTRY", dict(bind.registry._REGISTRY))


def test_counting_a_tower_leaves_the_random_state_as_it_was(scratch_registry):
    @register_encoder("smell")
    def noisy_probe(embed_dim: int = 8) -> ModalityEncoder:
        torch.rand(1, device="cpu")  # a factory that draws from the CPU generator while building
        return ModalityEncoder("smell", torch.nn.Linear(4, 4), 4, embed_dim)

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert measure_tower("noisy_probe", {}).total == (16 + 4 + 4 * 8 + 8 + 1) * 4
    assert torch.equal(torch.rand(3), expected)  # the run's weights do not depend on whether it was counted


def test_a_module_first_imported_while_counting_keeps_real_tensors(scratch_registry, tmp_path, monkeypatch):
    # encoders import torchvision, torchaudio, ... on first use; torchaudio's Kaldi EPSILON was made on meta once
    for module in ("lazy_constants", "lazy_by_name"):  # an import statement; importlib (transformers' lazy modules)
        (tmp_path / f"{module}.py").write_text("import torch\nEPSILON = torch.tensor(1e-7)\n")
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))

    @register_encoder("smell")
    def lazy_probe(embed_dim: int = 8) -> ModalityEncoder:
        import importlib

        import lazy_constants  # noqa: F401  (first imported here, inside the meta build)

        importlib.import_module("lazy_by_name")
        return ModalityEncoder("smell", torch.nn.Linear(4, 4), 4, embed_dim)

    assert measure_tower("lazy_probe", {}).total > 0
    assert sys.modules["lazy_constants"].EPSILON.device.type == "cpu"
    assert sys.modules["lazy_by_name"].EPSILON.device.type == "cpu"


# ---- the ImageBind-format file that declares terabytes ---------------------------------------------------------------
def test_validate_refuses_a_checkpoint_declaring_terabytes_naming_the_key(tmp_path):
    recipe = imagebind_recipe(tmp_path, huge_imagebind_checkpoint(tmp_path / "huge.pth"))
    with pytest.raises(MemoryBudgetError) as err:
        load_recipe(recipe)  # the default budget: no machine has 3 TiB available
    message = str(err.value)
    assert message.startswith(
        f"{recipe}: modalities.image.args.checkpoint: imagebind_image with width 16384, 256 blocks and embed_dim 16 "
        "needs 3.0 TiB of weights; the memory budget is "
    )
    assert "\n" not in message and f"{ENV_VAR}=SIZE sets another" in message


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the address space from /proc (Linux)")
def test_run_refuses_it_before_building_and_nothing_is_allocated(tmp_path):
    """In a fresh process, with 2 GiB of address space to spare so that a regression fails at its first large
    tensor instead of filling the machine: the recipe as ``bindkit run`` builds it (validate skipped), and the peak
    resident memory that added."""
    recipe = imagebind_recipe(tmp_path, huge_imagebind_checkpoint(tmp_path / "huge.pth"))
    script = f"""
import json, re, resource
import bind.train.trainer, encoders.imagebind, yaml
from bind.recipe import parse_recipe
mapped = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) << 10
resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), mapped + (2 << 30)))
recipe = parse_recipe(yaml.safe_load(open({str(recipe)!r})), {str(recipe)!r}, check_data=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    bind.train.trainer.build_model(recipe)
    error = None
except Exception as err:
    error = f"{{type(err).__name__}}: {{err}}"
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"error": error, "grew_kib": grew}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"].startswith(
        f"MemoryBudgetError: {recipe}: modalities.image.args.checkpoint: imagebind_image with width 16384"
    )
    assert result["grew_kib"] < 64 << 10  # reading the 1 MB file and building on meta: far below one block's 12 GiB


# ---- a saved model's config.json that declares huge sizes ---------------------------------------------------------------
# Sizes just over a 1 MiB budget: a regression then allocates megabytes, not what a stranger's file may ask for.
def test_a_config_declaring_a_large_embed_dim_is_refused_naming_it(tmp_path, budget):
    budget("1MiB")
    config = digits_config()
    config["embed_dim"] = 2**16
    for spec in config["encoders"].values():  # one space: every tower embeds into it
        spec["kwargs"]["embed_dim"] = 2**16
    with pytest.raises(MemoryBudgetError) as err:
        BindModel.from_config(config, root=tmp_path)
    assert str(err.value) == (  # the projection: (16 + 1) x 65536 float32
        f"{tmp_path / 'config.json'}: encoders.image.kwargs.embed_dim: digits_cnn with width 16, 3 blocks and "
        f"embed_dim {2**16} needs 4.3 MiB of weights; the memory budget is 1.0 MiB ({ENV_VAR})"
    )


def test_a_config_declaring_a_large_imagebind_tower_is_refused_naming_the_tower(tmp_path, budget):
    budget("1MiB")
    config = digits_config()
    config["encoders"]["image"] = {
        "name": "imagebind_image",
        "kwargs": {"checkpoint": None, "config": {
            "modality": "vision", "width": 256, "depth": 2, "heads": 4, "out_dim": 16, "add_bias_kv": False,
            "pre_norm": True, "kernel": [2, 14, 14], "stride": [2, 14, 14], "input_size": [224, 224]}},
    }  # fmt: skip
    with pytest.raises(MemoryBudgetError, match=r": encoders\.image: imagebind_image with width 256, 2 blocks and "):
        BindModel.from_config(config, root=tmp_path)


def test_the_towers_are_counted_together_and_the_refusal_names_those_before(tmp_path, budget):
    config = digits_config()
    image, audio = (measure_tower(s["name"], s["kwargs"]).total for s in config["encoders"].values())
    budget(str(image + audio - 1))  # each one fits, not both
    with pytest.raises(MemoryBudgetError) as err:
        BindModel.from_config(config)
    assert f", {format_size(image + audio)} with encoders.image; the memory budget is" in str(err.value)
    assert str(err.value).startswith("model config: encoders.audio: audio_vit with width 32")
    budget(str(image + audio))
    assert BindModel.from_config(config).modalities == ["image", "audio"]


def test_a_recipe_over_the_budget_names_embed_dim_in_validate_and_run(tmp_path, budget):
    budget("1MiB")
    data = {
        "anchor_modality": "image",
        "embed_dim": 2**16,
        "modalities": {"image": {"encoder": "digits_cnn", "args": {"width": 4}}},
        "stages": [],
    }
    for refusal in (lambda: parse_recipe(data, "r.yaml"), lambda: build_model(parse_recipe(data, "r.yaml", False))):
        with pytest.raises(MemoryBudgetError, match=r"^r\.yaml: embed_dim: digits_cnn with width 16, 3 blocks and "):
            refusal()


def test_validate_takes_a_size_measured_before_and_the_run_measures_again(tmp_path, monkeypatch):
    from bind import budget

    measured = []
    real = budget.measure_tower
    monkeypatch.setattr(budget, "measure_tower", lambda name, kwargs: measured.append(name) or real(name, kwargs))
    kwargs = {"embed_dim": 8, "width": 4}
    check = lambda remembered: budget.MemoryCheck(budget.Budget(None, "test")).admit(  # noqa: E731
        "digits_cnn", kwargs, "r.yaml", "modalities.image", str, remembered=remembered
    )
    first = check(remembered=True)
    assert measured == ["digits_cnn"] and budget.size_cache_path().is_file()
    assert check(remembered=True) == first and measured == ["digits_cnn"], "validate read the size measured before"
    assert check(remembered=False) == first and measured == ["digits_cnn"] * 2, "the run measures for real"
    other = budget.MemoryCheck(budget.Budget(None, "test")).admit(
        "digits_cnn", {**kwargs, "width": 8}, "r.yaml", "modalities.image", str, remembered=True
    )
    assert other.total > first.total and len(measured) == 3, "other arguments are another key"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"x": 1}', None],
    ids=["broken", "a list", "a stranger's entry", "a lying entry"],
)
def test_a_bad_size_cache_is_measured_past_and_rewritten(tmp_path, content):
    from bind import budget

    kwargs = {"embed_dim": 8, "width": 4}
    path = budget.size_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = budget.size_key("digits_cnn", kwargs)
    lie = {key: {"name": "digits_cnn", "total": -5, "head": 0, "width": 4, "blocks": 3, "embed_dim": 8}}
    path.write_bytes(content if content is not None else json.dumps(lie).encode())
    size = budget.MemoryCheck(budget.Budget(None, "test")).admit(
        "digits_cnn", kwargs, "r.yaml", "modalities.image", str, remembered=True
    )
    assert size == budget.measure_tower("digits_cnn", kwargs)
    assert json.loads(path.read_text())[key]["total"] == size.total


def test_a_tower_that_cannot_be_counted_is_tried_once_by_validate(monkeypatch):
    from bind import budget

    tried = []
    monkeypatch.setattr(budget, "measure_tower", lambda name, kwargs: tried.append(name))  # None: not countable
    check = lambda: budget.MemoryCheck(budget.Budget(None, "test")).admit(  # noqa: E731
        "digits_cnn", {"embed_dim": 8}, "r.yaml", "modalities.image", str, remembered=True
    )
    assert check() is None and check() is None
    assert tried == ["digits_cnn"], "the second validate remembered that the tower cannot be counted"


def test_nested_and_overlapping_meta_builds_put_the_import_function_back():
    import builtins
    import importlib

    from bind import budget

    real, real_import_module = builtins.__import__, importlib.import_module
    first, second = budget._imports_off_meta(), budget._imports_off_meta()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to start ends first (two threads)
    assert builtins.__import__ is not real, "the other build still runs"
    second.__exit__(None, None, None)
    assert builtins.__import__ is real and importlib.import_module is real_import_module


def test_a_size_cache_entry_too_large_to_be_a_size_is_measured_past():
    from bind import budget

    kwargs = {"embed_dim": 8, "width": 4}
    path = budget.size_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = budget.size_key("digits_cnn", kwargs)
    entry = {"name": "digits_cnn", "total": 10**400, "head": 0, "width": 4, "blocks": 3, "embed_dim": 8}
    path.write_text(json.dumps({key: entry}))
    size = budget.MemoryCheck(budget.Budget(2**40, "test")).admit(
        "digits_cnn", kwargs, "r.yaml", "modalities.image", str, remembered=True
    )
    assert size == budget.measure_tower("digits_cnn", kwargs)
