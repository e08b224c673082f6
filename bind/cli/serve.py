"""bindkit serve MODEL --gallery MODALITY=PATH ...: a local search page and JSON API.

MODEL is a training run, a folder written by BindModel.save_pretrained, or a hub id (org/name).

Each --gallery is embedded now (PATH: a folder, a glob, @list.txt, or a text for the text modality) or was embedded
before by bindkit embed (PATH: FILE.npy, its names read from FILE.names.txt beside it; or a folder saved by
SearchIndex.save). Open the printed address in a browser: type a text or drop a file, and see the top results of
every gallery. The API: POST /search with the multipart fields modality, text or file, k (and gallery to search
one) answers a JSON list of {item, modality, score}, best first. It listens on 127.0.0.1 (this machine only) unless
--host says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ._inputs import (
    INPUTS_HELP,
    add_plugin_args,
    check_batch_size,
    check_device_name,
    check_file,
    check_input_files,
    check_modality,
    embed_inputs,
    read_inputs,
    resolve_device,
)

MAX_UPLOAD_MB = 1024


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local search page and JSON API over galleries", description=__doc__)
    p.add_argument("run_dir", metavar="MODEL", help="a model folder (a run, e.g. runs/digits) or a hub id (org/name)")
    p.add_argument(
        "--gallery",
        action="append",
        required=True,
        metavar="MODALITY=PATH",
        help="a gallery to search (repeat for more); PATH: an embed output FILE.npy or " + INPUTS_HELP,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free one)")
    p.add_argument("--max-upload-mb", type=float, default=16, help="largest upload accepted, in MB (default: 16)")
    p.add_argument("--batch-size", type=int, default=64, help="gallery items embedded at once (default: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_plugin_args(p)
    p.set_defaults(func=run)


def parse_gallery(spec: str) -> tuple[str, str]:
    """``MODALITY=PATH`` -> ``(modality, path)``; anything else is one line saying what was expected."""
    modality, sep, path = spec.partition("=")
    if not sep or not modality.strip() or not path:
        raise ConfigError(f"--gallery {spec!r}: expected MODALITY=PATH, e.g. audio='recordings/*.wav'")
    return modality.strip(), path


def run(args: argparse.Namespace) -> int:
    # what needs no model first: options, @LIST files, .npy files
    check_batch_size(args.batch_size)
    check_device_name(args.device)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: expected 0 to 65535, got {args.port}")
    if not 0 < args.max_upload_mb <= MAX_UPLOAD_MB:
        raise ConfigError(
            f"--max-upload-mb: expected more than 0 and at most {MAX_UPLOAD_MB}, got {args.max_upload_mb}"
        )
    specs = [parse_gallery(spec) for spec in args.gallery]
    for _, path in specs:
        if path.endswith(".npy"):
            check_file(path, "gallery embeddings, a .npy file (made by `bindkit embed`)")
        else:
            check_input_files([path])

    from ..registry import load_plugins
    from ..runs import load_run
    from ..serve import Gallery, ServeLimits, create_app
    from ..serve.server import bind_socket, make_server, url_of

    device = resolve_device(args.device)
    load_plugins(args.plugin)
    model, _ = load_run(args.run_dir, args.plugin, trust_plugins=args.trust_plugins)
    model.to(device)
    for modality, _ in specs:
        check_modality(model, modality)
    galleries = []
    for modality, path in specs:
        same = sum(g.modality == modality for g in galleries)
        name = f"{modality}-{same + 1}" if same else modality  # audio, audio-2, ...
        index = _open(model, modality, path, args.batch_size)
        files = not getattr(model[modality], "takes_text", False)
        galleries.append(Gallery(name, modality, index, files=files))
        print(f"gallery {name}: {len(index)} {modality} items from {path}", flush=True)
    limits = ServeLimits(max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    app = create_app(model, galleries, limits)
    try:  # bound before serving: --port 0 prints the port it got
        sock = bind_socket(args.host, args.port)
    except OSError as err:
        raise ConfigError(
            f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror or err}); "
            "pick another --port (0: any free one)"
        ) from None
    print(f"serving on {url_of(sock)}/  (Ctrl+C stops)", flush=True)
    make_server(app, max_connections=4 * limits.max_waiting).run(sockets=[sock])
    return 0


def _open(model, modality: str, path: str, batch_size: int):
    """A gallery's :class:`~bind.retrieval.SearchIndex`: an embed output opened as it is, or its inputs embedded."""
    from ..retrieval import SearchIndex, open_gallery

    folder = Path(path)
    if path.endswith(".npy"):
        return open_gallery(path, None, width=model.embed_dim)
    if folder.is_dir() and (folder / "names.json").is_file() and (folder / "embeddings.npy").is_file():
        index = SearchIndex.load(folder)  # saved by SearchIndex.save
        if index.embeddings.shape[1] != model.embed_dim:
            raise ConfigError(
                f"{folder}: embeddings of width {index.embeddings.shape[1]}; this model's is {model.embed_dim}"
            )
        return index
    items = read_inputs(model, modality, [path])
    return SearchIndex(embed_inputs(model, modality, items, batch_size), names=items)
