"""``python -m search.dashboard``: optuna-dashboard on the study storage, with the artifact store,
bound to 127.0.0.1 unless told otherwise. ``optuna-dashboard sqlite:///runs/search.db
--artifact-dir runs/artifacts`` works too (without ``--artifact-dir`` it lists artifacts but
cannot download them).

A trial's user attributes are the fields of its record (:mod:`objectives.record`), one attribute
each, the plan first (so a failed trial shows it); its artifacts are the compressed model and the
plan file (the record's JSON, which ``search.apply`` reads). Its note (:mod:`search.notes`) shows
the same record as tables; the study's note and charts show the baseline and the front."""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path

from models.errors import UserError, check_folder, cli_main
from storage.locks import redact
from storage.studies import DEFAULT_STORAGE, default_store, open_artifact_store, open_storage


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.dashboard``."""
    p = argparse.ArgumentParser(prog="python -m search.dashboard", description=__doc__)
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"study storage URL (default: {DEFAULT_STORAGE})")
    p.add_argument("--store", default=None, help="root of artifacts/ (default: beside the SQLite file, else runs)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    return p


def _port_error(exc: OSError, host: str, port: int) -> UserError:
    if exc.errno == errno.EADDRINUSE:
        other = port + 1 if port < 65535 else port - 1
        return UserError(f"port {port} on {host} is in use (another dashboard?); pick a free one with --port, e.g. --port {other}")
    if exc.errno == errno.EACCES:
        return UserError(f"port {port} on {host}: permission denied (ports below 1024 need root); use --port 8080")
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return UserError(f"--host {host!r} is no address of this machine ({exc.strerror or exc}); use 127.0.0.1 or 0.0.0.0")
    return UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); try another --port or --host")


def check_listen(host: str, port: int) -> None:
    """Refuse a port or host the server could not listen on, before anything starts: a bind of
    the same kind the server makes (address reuse on, as wsgiref sets it), released at once."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as bottle's wsgiref server picks it
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise _port_error(exc, host, port) from None


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from optuna_dashboard import run_server

    args = build_parser().parse_args(argv)
    check_listen(args.host, args.port)
    store_root = args.store or default_store(args.storage)
    check_folder(store_root, "--store", write=False)
    storage = open_storage(args.storage, heartbeat=False, create=False)
    store = open_artifact_store(str(Path(store_root) / "artifacts"))
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ for {redact(args.storage)}", flush=True)
    try:
        run_server(storage, host=args.host, port=args.port, artifact_store=store)
    except OSError as exc:  # taken between the check and the server's own bind
        if exc.errno != errno.EADDRINUSE:
            raise
        raise _port_error(exc, args.host, args.port) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
