"""A local search page and JSON API over a model and its galleries (``bindkit serve``).

Example::

    model, _ = load_run("runs/digits")
    images = walk_files("pngs/", model["image"].file_suffixes)
    gallery = Gallery("image", "image", SearchIndex(model.encode("image", images), names=images), files=True)
    app = create_app(model, [gallery])          # a Starlette app
    with background(app) as url:                # served by uvicorn in a thread: http://127.0.0.1:PORT
        ...
"""

from __future__ import annotations

from .app import Gallery, ServeLimits, create_app, page_html
from .server import background

__all__ = ["Gallery", "ServeLimits", "background", "create_app", "page_html"]
