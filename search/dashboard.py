"""``python -m search.dashboard``: optuna-dashboard on the study storage, with the artifact store,
bound to 127.0.0.1 unless told otherwise. ``optuna-dashboard sqlite:///runs/search.db`` works too.

A trial's user attributes are the fields of its record (:mod:`objectives.record`), one attribute
each, the plan first (so a failed trial shows it); its artifacts are the compressed model and the
plan file (the record's JSON, which ``search.apply`` reads)."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import cli_main
from storage.studies import DEFAULT_STORAGE, default_store, open_artifact_store, open_storage


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m search.dashboard``."""
    p = argparse.ArgumentParser(prog="python -m search.dashboard", description=__doc__)
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"study storage URL (default: {DEFAULT_STORAGE})")
    p.add_argument("--store", default=None, help="root of artifacts/ (default: beside the SQLite file, else runs)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from optuna_dashboard import run_server

    args = build_parser().parse_args(argv)
    storage = open_storage(args.storage, heartbeat=False)
    store = open_artifact_store(str(Path(args.store or default_store(args.storage)) / "artifacts"))
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ for {args.storage}", flush=True)
    run_server(storage, host=args.host, port=args.port, artifact_store=store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
