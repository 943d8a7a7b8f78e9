"""`dpo-dist serve MODEL [--adapter DIR]`: a trained model behind an OpenAI-compatible HTTP API (chat completions,
streamed or not, formatted with the chat template its tokenizer carries). The server is dpo_dist/inference/server.py;
how to use it, and how to serve a merged export with vLLM instead: docs/serving.md."""
from __future__ import annotations

import importlib
import os
import socket
import sys
from pathlib import Path

from dpo_dist.config.schema import ConfigError
from dpo_dist.inference.loader import add_model_args, load

EXPORT_NAMES = ("adapter", "model", "merged")  # what a stage's run directory calls its exports
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_name(model: str, adapter: str | None) -> str:
    """The served model's id: the adapter's (else MODEL's) directory name, or its run directory's name when it is a
    run's export (runs/x/dpo/adapter is "dpo"); a hub name as given."""
    path = Path(adapter or model)
    if not path.is_dir():
        return adapter or model
    path = path.resolve()
    return path.parent.name if path.name in EXPORT_NAMES else path.name


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: one the OS picks); one ConfigError when it cannot be had."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be 0 (any free port) to 65535")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: {err.strerror}") from None
    try:
        return socket.create_server(address[:2], family=family, backlog=2048)
    except OSError as err:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {err.strerror}") from None


def _require_serve_extra() -> None:
    for name in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"dpo-dist serve needs {name}, which is not installed: pip install 'dpo-dist[serve]'") \
                from None


def run(args) -> int:
    _require_serve_extra()
    api_key = args.api_key or os.environ.get("DPO_DIST_API_KEY") or None
    sock = listen(args.host, args.port)  # before the model loads, so a taken port is reported at once
    loaded = load(args)
    name = args.model_name or default_name(args.model, args.adapter)
    from dpo_dist.inference import server

    app = server.build_app(loaded, name, api_key)
    host = f"[{args.host}]" if ":" in args.host else args.host
    if api_key is None and args.host not in LOOPBACK:
        print(f"note: --host {args.host} without an API key: anyone who reaches this port can use the model",
              file=sys.stderr)
    print(f"dpo-dist serve: model {name!r} ({loaded.description}) at http://{host}:{sock.getsockname()[1]}/v1"
          + (", API key required" if api_key else ""), flush=True)
    server.run(app, sock)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model (or base + LoRA adapter) over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients send (default: the adapter's, else "
                   "MODEL's directory name; a run's adapter/, model/ or merged/ export goes by its run directory's "
                   "name, e.g. dpo)")
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on every route except "
                   "/health, which stays open for load balancers (default: $DPO_DIST_API_KEY, which keeps the key "
                   "out of the process list)")
    p.set_defaults(func=run)
