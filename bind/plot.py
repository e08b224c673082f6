"""Pictures of a bound space: every modality's embeddings projected together, coloured by class, shaped by modality.

One projection is fitted on all modalities at once, so distances in the picture compare a spoken seven with a
drawn seven and the word "seven". PCA is exact and deterministic; UMAP (the ``umap`` extra) shows local
neighbourhoods better but distorts global distances. Example::

    space = stack_splits(embed_eval_splits(model, recipe, device))
    projection = project(space.embeddings, dim=2)
    save_figure(space, projection, "space.png", title="digits")

matplotlib and plotly are optional (the ``plot`` extra); they are imported only when a figure is drawn.
"""

from __future__ import annotations

import colorsys
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .data import Items
from .errors import ConfigError
from .safe_io import atomic_output

Method = Literal["pca", "umap"]
# The output file's suffix picks the renderer and the projection's dimension.
SUFFIX_DIM = {".png": 2, ".html": 3}
PNG_MARKERS = ["o", "s", "^", "D", "P", "X", "v", "*"]
HTML_SYMBOLS = ["circle", "diamond", "square", "cross", "x", "circle-open", "diamond-open", "square-open"]
# Qualitative class palettes, 0-255 RGB: matplotlib's tab10 and tab20 (the Tableau colours), written out here so that
# both renderers use the same colours and the HTML one does not need matplotlib. See class_colours().
TAB10 = [
    (31, 119, 180),  # blue
    (255, 127, 14),  # orange
    (44, 160, 44),  # green
    (214, 39, 40),  # red
    (148, 103, 189),  # purple
    (140, 86, 75),  # brown
    (227, 119, 194),  # pink
    (127, 127, 127),  # grey
    (188, 189, 34),  # olive
    (23, 190, 207),  # cyan
]
TAB20 = [
    (31, 119, 180),
    (174, 199, 232),
    (255, 127, 14),
    (255, 187, 120),
    (44, 160, 44),
    (152, 223, 138),
    (214, 39, 40),
    (255, 152, 150),
    (148, 103, 189),
    (197, 176, 213),
    (140, 86, 75),
    (196, 156, 148),
    (227, 119, 194),
    (247, 182, 210),
    (127, 127, 127),
    (199, 199, 199),
    (188, 189, 34),
    (219, 219, 141),
    (23, 190, 207),
    (158, 218, 229),
]
# marks a modality (not a class) in the legends: no palette above contains black
MODALITY_LEGEND_COLOUR = "black"


@dataclass
class Space:
    """Items of every modality stacked in one table; row ``i`` of each field describes the same item."""

    embeddings: Tensor  # (N, D)
    modalities: list[str]  # (N,) the modality of each row
    labels: Tensor  # (N,) long
    names: list[str]  # (N,) how each item is shown (file name, caption text, ...)
    class_names: list[str]  # label -> name

    def modality_order(self) -> list[str]:
        return list(dict.fromkeys(self.modalities))


@dataclass
class Projection:
    points: Tensor  # (N, dim) float32
    method: Method
    explained_variance_ratio: Tensor | None  # (dim,) share of the total variance per axis; PCA only


def stack_splits(splits: dict[str, tuple[Tensor, Items]]) -> Space:
    """One :class:`Space` from :func:`bind.evaluate.embed_eval_splits`' ``{modality: (embeddings, items)}``."""
    if not splits:
        raise ConfigError("nothing to plot: no modality of this run has an eval split (eval_data in the recipe)")
    class_names = next((items.class_names for _, items in splits.values() if items.class_names), None)
    num_classes = 1 + max(int(items.labels.max()) for _, items in splits.values() if len(items))
    if class_names is None or len(class_names) < num_classes:
        class_names = [str(c) for c in range(num_classes)]
    return Space(
        embeddings=torch.cat([e.float() for e, _ in splits.values()]),
        modalities=[m for m, (e, _) in splits.items() for _ in range(len(e))],
        labels=torch.cat([items.labels for _, items in splits.values()]),
        names=[name for _, items in splits.values() for name in items.names],
        class_names=list(class_names),
    )


def project(embeddings: Tensor, dim: int, method: Method = "pca") -> Projection:
    """(N, D) embeddings -> (N, dim) points, one projection fitted on all rows.

    PCA: the centred data times its top ``dim`` right singular vectors, each axis signed so that its
    largest-magnitude loading is positive (so the same embeddings always give the same picture).
    """
    require_method(method)
    return _pca(embeddings, dim) if method == "pca" else _umap(embeddings, dim)


def _pca(embeddings: Tensor, dim: int) -> Projection:
    x = embeddings.double()
    if dim > min(x.shape):
        raise ConfigError(f"cannot project {tuple(x.shape)} embeddings to {dim} dimensions; need at least {dim} items")
    centred = x - x.mean(0)
    # full SVD of a few thousand rows is cheap and, unlike pca_lowrank, not randomised
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:dim]  # (dim, D)
    biggest = components.abs().argmax(1)
    components = components * components[torch.arange(dim), biggest].sign()[:, None]
    variance = singular**2
    return Projection(
        points=(centred @ components.T).float(),
        method="pca",
        explained_variance_ratio=(variance[:dim] / variance.sum()).float(),
    )


def require_method(method: str) -> Any:
    """Check that ``method`` can run before any slow work; returns the umap module for ``"umap"``."""
    if method not in ("pca", "umap"):
        raise ConfigError(f"unknown projection method {method!r}; use 'pca' or 'umap'")
    if method == "pca":
        return None
    try:
        return importlib.import_module("umap")
    except ImportError as err:
        raise ConfigError(
            f"--method umap needs the umap-learn package ({err}); install the umap extra: pip install 'bindkit[umap]'"
        ) from err


def _umap(embeddings: Tensor, dim: int) -> Projection:
    umap = require_method("umap")
    reducer = umap.UMAP(n_components=dim, metric="cosine", random_state=0)  # seeded: same input, same picture
    return Projection(torch.from_numpy(reducer.fit_transform(embeddings.numpy())).float(), "umap", None)


def output_dim(path: str | Path) -> int:
    """2 for a ``.png``, 3 for an ``.html``; any other suffix is a :class:`ConfigError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_DIM:
        accepted = " or ".join(SUFFIX_DIM)
        raise ConfigError(f"{path}: cannot tell what to draw from the suffix {suffix or '(none)'!r}; use {accepted}")
    return SUFFIX_DIM[suffix]


def require_plot_library(path: str | Path) -> Any:
    """The module that draws ``path`` (matplotlib.figure or plotly.graph_objects), or a ConfigError saying to install it."""
    name = "matplotlib" if output_dim(path) == 2 else "plotly"
    try:
        # matplotlib.figure, not pyplot: no global backend or window state, so a notebook's settings stay as they are
        return importlib.import_module("matplotlib.figure" if name == "matplotlib" else "plotly.graph_objects")
    except ImportError as err:
        raise ConfigError(
            f"writing {path} needs {name}, which is not installed ({err}); pip install 'bindkit[plot]'"
        ) from err


def axis_label(projection: Projection, axis: int) -> str:
    name = f"{'PC' if projection.method == 'pca' else 'UMAP '}{axis + 1}"
    if projection.explained_variance_ratio is None:
        return name
    return f"{name} ({projection.explained_variance_ratio[axis].item():.0%} of variance)"


def class_colours(num_classes: int) -> list[tuple[float, float, float]]:
    """One RGB colour in [0, 1] per class, distinct as long as there are colours to go round.

    Up to 10 classes get :data:`TAB10`, up to 20 get :data:`TAB20` (tab20's light shades only appear past 10
    classes), and more than 20 get evenly spaced hues at two lightnesses. The PNG and the HTML renderer both take
    their colours from here, so a class has the same colour in both pictures.
    """
    if num_classes <= len(TAB10):
        rgb = TAB10[:num_classes]
    elif num_classes <= len(TAB20):
        rgb = TAB20[:num_classes]
    else:  # alternate a darker and a lighter shade so that neighbouring hues still differ
        hls = [(i / num_classes, 0.4 if i % 2 else 0.55, 0.75) for i in range(num_classes)]
        return [colorsys.hls_to_rgb(*c) for c in hls]
    return [(r / 255, g / 255, b / 255) for r, g, b in rgb]


def css_rgb(colour: tuple[float, float, float]) -> str:
    """``(r, g, b)`` in [0, 1] as ``"rgb(R,G,B)"`` with 0-255 integers, the form plotly takes."""
    return "rgb({},{},{})".format(*(round(255 * v) for v in colour))


def _emphasis(count: int, most: int) -> float:
    """Marker area factor, 1 to 3: a modality with few items (ten captions) would vanish among thousands of images."""
    return min(3.0, math.sqrt(most / max(count, 1)))


def figure_png(space: Space, projection: Projection, title: str) -> Any:
    """A 2-D matplotlib figure (9 x 7 in): colour = class, marker = modality, two legends outside the axes."""
    mpl_figure = require_plot_library("x.png")
    from matplotlib.lines import Line2D

    points = projection.points.numpy()
    labels = space.labels.numpy()
    modality_of = np.array(space.modalities)
    order = space.modality_order()
    present = sorted(set(labels.tolist()))
    colours = class_colours(len(space.class_names))
    counts = {m: int((modality_of == m).sum()) for m in order}
    most = max(counts.values())

    fig = mpl_figure.Figure(figsize=(9, 7), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    # the most numerous modality first, so the sparse ones (a handful of captions) stay visible on top
    for i, modality in sorted(enumerate(order), key=lambda im: -counts[im[1]]):
        rows = modality_of == modality
        size = 12 * _emphasis(counts[modality], most)
        ax.scatter(
            points[rows, 0],
            points[rows, 1],
            c=[colours[c] for c in labels[rows]],
            marker=PNG_MARKERS[i % len(PNG_MARKERS)],
            s=size,
            alpha=0.75,
            edgecolors="black" if size > 12 else "none",
            linewidths=0.4,
        )
    ax.axhline(0, color="0.85", linewidth=0.8, zorder=0)
    ax.axvline(0, color="0.85", linewidth=0.8, zorder=0)
    ax.set_aspect("equal", adjustable="datalim")  # keep angles true: the spokes are the point of the picture
    ax.set_xlabel(axis_label(projection, 0))
    ax.set_ylabel(axis_label(projection, 1))
    ax.set_title(title, fontsize=11)

    class_handles = [
        Line2D([], [], linestyle="", marker="o", markersize=7, color=colours[c], label=space.class_names[c])
        for c in present
    ]
    modality_handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker=PNG_MARKERS[i % len(PNG_MARKERS)],
            markersize=7,
            color=MODALITY_LEGEND_COLOUR,
            label=f"{m} ({counts[m]})",
        )
        for i, m in enumerate(order)
    ]
    fig.legend(handles=class_handles, title="class", loc="outside right upper", frameon=False)
    fig.legend(handles=modality_handles, title="modality (items)", loc="outside right lower", frameon=False)
    return fig


def figure_html(space: Space, projection: Projection, title: str) -> Any:
    """A 3-D plotly figure: one trace per class (colour), symbol = modality, hover = modality, class and item."""
    go = require_plot_library("x.html")
    points = projection.points.numpy().round(4)  # 4 decimals: plenty on screen, a smaller file
    labels = space.labels.numpy()
    modality_of = np.array(space.modalities)
    order = space.modality_order()
    symbol_of = {m: HTML_SYMBOLS[i % len(HTML_SYMBOLS)] for i, m in enumerate(order)}
    colours = class_colours(len(space.class_names))
    counts = {m: int((modality_of == m).sum()) for m in order}
    size_of = {m: round(3.5 * math.sqrt(_emphasis(counts[m], max(counts.values()))), 1) for m in order}  # diameter
    fig = go.Figure()
    for c in sorted(set(labels.tolist())):
        rows = labels == c
        rgb = css_rgb(colours[c])
        fig.add_trace(
            go.Scatter3d(
                x=points[rows, 0],
                y=points[rows, 1],
                z=points[rows, 2],
                mode="markers",
                name=space.class_names[c],
                legendgroup="class",
                legendgrouptitle_text="class",
                marker={
                    "size": [size_of[m] for m in modality_of[rows]],
                    "color": rgb,
                    "symbol": [symbol_of[m] for m in modality_of[rows]],
                    "opacity": 0.8,
                },
                customdata=[[modality_of[i], space.class_names[c], space.names[i]] for i in np.flatnonzero(rows)],
                hovertemplate="%{customdata[0]} · %{customdata[1]}<br>%{customdata[2]}<extra></extra>",
            )
        )
    for m in order:  # legend entries only: which symbol is which modality
        fig.add_trace(
            go.Scatter3d(
                x=[None],
                y=[None],
                z=[None],
                mode="markers",
                name=m,
                legendgroup="modality",
                legendgrouptitle_text="modality",
                marker={"size": 5, "color": MODALITY_LEGEND_COLOUR, "symbol": symbol_of[m]},  # grey is a class
            )
        )
    axes = {f"{a}axis": {"title": {"text": axis_label(projection, i)}} for i, a in enumerate("xyz")}
    fig.update_layout(
        title={"text": title},
        scene={"aspectmode": "data", **axes},  # "data": equal units on all axes, so angles stay true
        legend={"itemsizing": "constant"},
        margin={"l": 0, "r": 0, "t": 50, "b": 0},
    )
    return fig


def save_figure(space: Space, projection: Projection, path: str | Path, title: str) -> Path:
    """Draw ``space`` to ``path``: a static PNG (2-D) or an interactive HTML page (3-D).

    The HTML page is self-contained: plotly.js is written into it, so it opens on a machine with no network.
    """
    path = Path(path)
    dim = output_dim(path)
    if projection.points.shape[1] != dim:
        raise ConfigError(f"{path} needs a {dim}-D projection, got {projection.points.shape[1]}-D")
    path.parent.mkdir(parents=True, exist_ok=True)
    if dim == 2:
        figure = figure_png(space, projection, title)
        with atomic_output(path) as f:  # a failed write (disk full) leaves the previous picture
            figure.savefig(f, dpi=150, format="png")
    else:
        # plotly.js (~5 MB) is inlined, not linked from its CDN: the page must open on a machine with no network
        page = figure_html(space, projection, title).to_html(include_plotlyjs=True, include_mathjax=False)
        with atomic_output(path) as f:
            f.write(page.encode("utf-8"))
    return path
