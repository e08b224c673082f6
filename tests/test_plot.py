"""Projection of a bound space and the pictures drawn from it, on synthetic embeddings."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bind.data import Items
from bind.errors import ConfigError
from bind.plot import (
    TAB10,
    TAB20,
    Space,
    class_colours,
    output_dim,
    project,
    require_plot_library,
    save_figure,
    stack_splits,
)

TESTS = Path(__file__).parent
DIGITS_RUN = TESTS.parent / "runs" / "digits"
WORDS = ["zero", "one", "two", "three"]
TEN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def anisotropic(n: int = 60, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows with clearly different variance per direction, so principal axes are well defined."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1])[:d]
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return (torch.randn(n, d, generator=g) * scales) @ rotation + 3.0  # off-centre on purpose


def synthetic_space(per_modality: dict[str, int] | None = None, dim: int = 16, class_names: list[str] = WORDS) -> Space:
    """Unit-norm embeddings: each class near its own direction, every modality near the same ones."""
    per_modality = per_modality or {"image": 40, "text": 8, "audio": 40}
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(len(class_names), dim, generator=g)
    splits = {}
    for modality, n in per_modality.items():
        labels = torch.arange(n) % len(class_names)
        embeddings = F.normalize(directions[labels] + 0.3 * torch.randn(n, dim, generator=g), dim=-1)
        names = [f"{modality}_{i}" for i in range(n)]
        splits[modality] = (embeddings, Items(list(range(n)), labels, names, class_names))
    return stack_splits(splits)


def ten_class_space() -> Space:
    return synthetic_space({"image": 40, "text": 10, "audio": 30}, class_names=TEN)


def plotly_data(html: str) -> list[dict]:
    """The traces of the figure in a page written by plotly's write_html (the JSON passed to Plotly.newPlot)."""
    call = list(re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html))[-1]  # the last: the page's, not the library's
    data, _ = json.JSONDecoder().raw_decode(html, call.end())
    return data


# ---- projection ----------------------------------------------------------------------------------
def test_pca_equals_centred_data_on_top_singular_vectors_up_to_sign():
    x = anisotropic()
    projection = project(x, 3, "pca")
    centred = (x - x.mean(0)).double().numpy()
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:3].T
    points = projection.points.double().numpy()
    for axis in range(3):
        sign = np.sign(points[:, axis] @ reference[:, axis])
        np.testing.assert_allclose(points[:, axis], sign * reference[:, axis], atol=1e-4)
    np.testing.assert_allclose(projection.explained_variance_ratio.numpy(), (s**2 / (s**2).sum())[:3], rtol=1e-5)
    assert projection.points.shape == (60, 3) and projection.points.dtype == torch.float32


def test_pca_axes_are_ordered_by_variance_and_centred():
    points = project(anisotropic(), 2, "pca").points
    variances = points.var(0)
    assert variances[0] > variances[1]
    torch.testing.assert_close(points.mean(0), torch.zeros(2), atol=1e-5, rtol=0)


def test_pca_sign_is_deterministic_under_row_order_and_repeats():
    x = anisotropic()
    permutation = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    first = project(x, 2, "pca").points
    torch.testing.assert_close(project(x, 2, "pca").points, first)
    # row order can flip an SVD's signs; the sign convention must not depend on it
    torch.testing.assert_close(project(x[permutation], 2, "pca").points, first[permutation], atol=1e-5, rtol=0)


def test_pca_needs_as_many_items_as_dimensions():
    with pytest.raises(ConfigError, match="to 3 dimensions"):
        project(torch.randn(2, 8), 3, "pca")


def test_umap_without_the_package_says_which_extra_to_install():
    if importlib.util.find_spec("umap") is not None:
        pytest.skip("umap-learn is installed")
    with pytest.raises(ConfigError, match=r"pip install 'bindkit\[umap\]'"):
        project(anisotropic(), 2, "umap")


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="'tsne'"):
        project(anisotropic(), 2, "tsne")


# ---- the table of items and the output file --------------------------------------------------------
def test_stack_splits_keeps_rows_aligned():
    space = synthetic_space({"image": 5, "text": 3})
    assert space.embeddings.shape == (8, 16)
    assert space.modalities == ["image"] * 5 + ["text"] * 3
    assert space.names[5] == "text_0" and space.labels[5].item() == 0
    assert space.class_names == WORDS
    assert space.modality_order() == ["image", "text"]


def test_stack_splits_of_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="no modality"):
        stack_splits({})


@pytest.mark.parametrize("name", ["space.svg", "space", "space.png.bak"])
def test_output_suffix_must_be_png_or_html(name):
    with pytest.raises(ConfigError) as err:
        output_dim(name)
    assert name in str(err.value) and ".png" in str(err.value) and ".html" in str(err.value)
    assert output_dim("a/space.PNG") == 2 and output_dim("space.html") == 3


def test_missing_plot_library_says_to_install_the_plot_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"space.html needs plotly.*pip install 'bindkit\[plot\]'"):
        require_plot_library("space.html")


def test_png_is_written_at_9_by_7_inches_150_dpi(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    space = synthetic_space()
    path = save_figure(space, project(space.embeddings, 2), tmp_path / "sub" / "space.png", title="synthetic")
    image = imread(path)
    assert image.shape[:2] == (7 * 150, 9 * 150)
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_png_needs_a_2d_projection(tmp_path):
    space = synthetic_space()
    with pytest.raises(ConfigError, match="2-D projection, got 3-D"):
        save_figure(space, project(space.embeddings, 3), tmp_path / "space.png", title="synthetic")


def test_html_figure_colours_by_class_and_shapes_by_modality(tmp_path):
    pytest.importorskip("plotly")
    from bind.plot import figure_html

    space = synthetic_space()
    fig = figure_html(space, project(space.embeddings, 3), title="synthetic")
    class_traces = [t for t in fig.data if t.legendgroup == "class"]
    assert [t.name for t in class_traces] == WORDS
    zero = class_traces[0]
    symbols = dict(zip([row[0] for row in zero.customdata], zero.marker.symbol, strict=True))
    assert len(set(symbols.values())) == 3  # one symbol per modality
    assert {row[1] for row in zero.customdata} == {"zero"}
    assert len(zero.x) == sum(int(lbl) == 0 for lbl in space.labels)
    path = save_figure(space, project(space.embeddings, 3), tmp_path / "space.html", title="synthetic run")
    html = path.read_text()
    assert "plotly" in html and "synthetic run" in html
    assert all(m in html for m in ["image", "text", "audio"]) and "audio_5" in html


# ---- colours, legends and the offline page -----------------------------------------------------------
def test_palette_is_qualitative_with_ten_and_twenty_distinct_colours():
    assert len(TAB10) == 10 and len(set(TAB10)) == 10
    assert len(TAB20) == 20 and len(set(TAB20)) == 20
    assert all(0 <= v <= 255 and isinstance(v, int) for rgb in TAB10 + TAB20 for v in rgb)
    for n in (1, 4, 10, 11, 20, 21, 40):
        colours = class_colours(n)
        assert len(colours) == n and len(set(colours)) == n, n
        assert all(0.0 <= v <= 1.0 for rgb in colours for v in rgb)
    assert class_colours(10) == [tuple(v / 255 for v in rgb) for rgb in TAB10]
    assert class_colours(4) == class_colours(10)[:4]  # a class keeps its colour in a smaller picture


def test_palette_matches_matplotlib_tab10_and_tab20():
    pytest.importorskip("matplotlib")
    from matplotlib import colormaps

    for name, palette in [("tab10", TAB10), ("tab20", TAB20)]:
        reference = [tuple(round(255 * v) for v in colormaps[name](i)[:3]) for i in range(len(palette))]
        assert palette == reference, name


def test_png_legend_names_the_classes_and_ten_classes_get_ten_colours():
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgb

    from bind.plot import figure_png

    space = ten_class_space()
    fig = figure_png(space, project(space.embeddings, 2), title="ten")
    class_legend, modality_legend = fig.legends
    assert class_legend.get_title().get_text() == "class"
    assert [t.get_text() for t in class_legend.get_texts()] == TEN  # names, not the ids 0..9
    legend_colours = [to_rgb(h.get_color()) for h in class_legend.legend_handles]
    assert len(set(legend_colours)) == 10
    assert [t.get_text().split()[0] for t in modality_legend.get_texts()] == ["image", "text", "audio"]
    assert len({h.get_marker() for h in modality_legend.legend_handles}) == 3

    # the points themselves: each class one colour, the one its legend entry shows
    (ax,) = fig.axes
    labels = space.labels.numpy()
    modality_of = np.array(space.modalities)
    colour_of_class: dict[int, set] = {}
    for collection in ax.collections:
        offsets = collection.get_offsets()
        faces = collection.get_facecolors()[:, :3]
        rows = [m for m in ["image", "text", "audio"] if (modality_of == m).sum() == len(offsets)]
        assert rows, "a scatter that is not one modality's points"
        for label, face in zip(labels[modality_of == rows[0]], faces, strict=True):
            colour_of_class.setdefault(int(label), set()).add(tuple(np.round(face, 4)))
    assert all(len(c) == 1 for c in colour_of_class.values())
    point_colours = [next(iter(colour_of_class[c])) for c in range(10)]
    assert len(set(point_colours)) == 10
    np.testing.assert_allclose(point_colours, legend_colours, atol=1e-4)


def test_html_legend_names_the_classes_and_ten_classes_get_ten_colours(tmp_path):
    pytest.importorskip("plotly")
    space = ten_class_space()
    path = save_figure(space, project(space.embeddings, 3), tmp_path / "space.html", title="ten")
    traces = plotly_data(path.read_text())
    class_traces = [t for t in traces if t.get("legendgroup") == "class"]
    assert [t["name"] for t in class_traces] == TEN  # names, not the ids 0..9
    colours = [t["marker"]["color"] for t in class_traces]
    assert colours == ["rgb({},{},{})".format(*rgb) for rgb in TAB10]  # the PNG's colours too
    modality_traces = [t for t in traces if t.get("legendgroup") == "modality"]
    assert [t["name"] for t in modality_traces] == ["image", "text", "audio"]
    assert len({t["marker"]["symbol"] for t in modality_traces}) == 3
    assert not {t["marker"]["color"] for t in modality_traces} & set(colours)  # a modality is not read as a class


def test_html_page_embeds_plotly_js_and_loads_nothing_from_the_network(tmp_path):
    pytest.importorskip("plotly")
    from plotly.offline import get_plotlyjs

    space = synthetic_space()
    html = save_figure(space, project(space.embeddings, 3), tmp_path / "space.html", title="offline").read_text()
    library = get_plotlyjs()
    assert "plotly.js v" in html and library in html  # the whole library, inlined
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and not [s for s in scripts if "src=" in s]  # every script is inline
    assert not re.search(r"""src=["']?(https?:)?//""", html)
    # plotly.js itself names its CDN once, as the default topojsonURL of geo maps, which a scatter never fetches;
    # the page around it must not link there
    page = html.replace(library, "")
    assert len(page) < len(html) - 1_000_000
    assert "cdn.plot.ly" not in page and "https://" not in page


# ---- help texts --------------------------------------------------------------------------------------
def plot_parser() -> argparse.ArgumentParser:
    from bind.cli import plot as plot_cli

    sub = argparse.ArgumentParser(prog="bindkit").add_subparsers()
    plot_cli.add_parser(sub)
    return sub.choices["plot"]


def test_cli_help_is_plain_text_and_every_argument_has_a_help_line():
    parser = plot_parser()
    assert parser.description and "``" not in parser.description
    assert not re.search(r":(func|class|data|mod|meth):`", parser.description)
    arguments = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.dest for a in arguments} == {
        "run_dir",
        "out",
        "max_per_modality",
        "method",
        "data",
        "plugin",
        "trust_plugins",
    }
    for action in arguments:
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, action.dest
        assert "`" not in action.help, action.dest


# ---- the command, on a real run when one is here ----------------------------------------------------
def bindkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bind", *args], capture_output=True, text=True, env=env, timeout=300, cwd=TESTS.parent
    )


def test_cli_rejects_a_bad_suffix_before_loading_anything(tmp_path):
    out = bindkit("plot", str(tmp_path / "no_run"), "--out", str(tmp_path / "space.jpg"))
    assert out.returncode == 2
    assert f"{tmp_path / 'space.jpg'}: cannot tell what to draw" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(not (DIGITS_RUN / "recipe.yaml").is_file(), reason=f"no trained run at {DIGITS_RUN}")
def test_cli_plots_the_digits_run(tmp_path, data_root):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = bindkit("plot", str(DIGITS_RUN), "--out", str(tmp_path / "space.png"), "--max-per-modality", "20")
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "20 image" in out.stdout
    assert imread(tmp_path / "space.png").shape[:2] == (1050, 1350)
