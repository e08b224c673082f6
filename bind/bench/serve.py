"""``bindkit bench serve``: N concurrent clients on loopback against ``bindkit serve``, latency and errors.

The server is a separate process (``bindkit serve MODEL``, as a user starts it), so that the clients' threads and the
server do not share one interpreter lock. Its galleries: the unseen speaker's recordings (500 WAVs) and the ten
digit prompts. Each client sends ``requests`` searches one after another, alternating a WAV upload (audio -> both
galleries) and a text query; every answer is compared with the first answer to the same query, so a server that
answers quickly but wrongly under load shows as ``wrong_answers``.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError

PROMPTS = [
    f"a handwritten {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
]


def bench_serve(
    model: str = "runs/digits",
    clients: int = 16,
    requests: int = 25,
    k: int = 10,
    data_root: str | None = None,
    startup_timeout_s: float = 300,
) -> dict[str, Any]:
    """``clients`` threads x ``requests`` searches each against a fresh ``bindkit serve`` on 127.0.0.1."""
    from ..data.datasets import resolve_data_root

    if clients < 1 or requests < 1:
        raise ConfigError(f"bench serve: clients and requests must be positive, got {clients} and {requests}")
    if not Path(model).exists() and model.count("/") != 1:
        raise ConfigError(f"bench serve: model {model!r} not found; train one (bindkit run recipes/digits.yaml)")
    recordings = resolve_data_root(data_root) / "fsdd" / "recordings"
    wav = recordings / "7_nicolas_1.wav"
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bindkit-bench-serve-{uuid.uuid4().hex}"
    scratch.mkdir()
    (scratch / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    command = [sys.executable, "-m", "bind", "serve", model, "--port", "0", "--device", "cpu"]
    command += ["--gallery", f"audio={recordings}/*_nicolas_*.wav", "--gallery", f"text=@{scratch / 'prompts.txt'}"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.perf_counter()
        url, galleries = _wait_for_url(server, startup_timeout_s)
        startup_s = time.perf_counter() - started
        queries = [
            ({"modality": "audio", "k": str(k)}, (wav.name, wav.read_bytes())),
            ({"modality": "text", "text": "the digit seven", "k": str(k)}, None),
        ]
        reference = [_search(url, *query) for query in queries]  # also warms the server up
        if any(status != 200 for status, _ in reference):
            raise ConfigError(f"bench serve: the server refused the reference queries: {reference}")
        latencies: list[float] = []
        errors: list[str] = []
        wrong = [0]

        def client(number: int) -> None:
            for i in range(requests):
                which = (number + i) % len(queries)
                start = time.perf_counter()
                try:
                    status, body = _search(url, *queries[which])
                except OSError as err:
                    errors.append(repr(err))
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(f"{status} {body[:100]}")
                elif body != reference[which][1]:
                    wrong[0] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        wall = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
    finally:
        server.terminate()
        server.wait(30)
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else float("nan")

    return {
        "clients": clients,
        "requests": clients * requests,
        "errors": len(errors),
        "first_errors": errors[:3],
        "wrong_answers": wrong[0],
        "p50_ms": quantile(0.50),
        "p99_ms": quantile(0.99),
        "max_ms": round(1000 * ordered[-1], 1) if ordered else float("nan"),
        "requests_per_s": round(len(latencies) / wall, 1),
        "galleries": galleries,
        "server_startup_s": round(startup_s, 1),
        "cpus": os.cpu_count(),
    }


def _wait_for_url(server: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """The address ``bindkit serve`` prints once it listens, and its gallery lines."""
    deadline, lines = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            raise ConfigError(f"bench serve: the server stopped: {server.stderr.read()[-500:]}")
        if line.startswith("serving on "):
            return line.split()[2].rstrip("/"), "; ".join(lines)
        lines.append(line.strip())
    raise ConfigError(f"bench serve: the server did not start within {timeout_s} s")


def _search(url: str, fields: dict[str, str], file: tuple[str, bytes] | None) -> tuple[int, object]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    )
    if file is not None:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n\r\n'
        body += head.encode() + file[1] + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", "/search", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, json.loads(text) if response.status == 200 else text
    finally:
        conn.close()
