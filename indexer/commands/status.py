"""``recommender status``: the artifact root's current bundle, bundles (published, staged, rejected), lock and last runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``status`` flags.

    Args:
        parser: the ``status`` subcommand's parser.
    """
    parser.add_argument("--root", required=True, type=Path, help="artifact root")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    """Prints :func:`indexer.artifacts.status` as text or JSON.

    Args:
        args: flags from :func:`add_arguments`.

    Returns:
        0.
    """
    from indexer.artifacts import status

    report = status(args.root)
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    print(f"root: {report['root']}")
    print(f"current: {report['current'] or 'none (nothing published yet)'}")
    print(f"lock: {report['lock'] or 'free'}")
    print("bundles (* current):")
    for bundle in report["bundles"]:
        mark = "*" if bundle["current"] else " "
        detail = bundle.get("error") or f"{bundle['items']} items, created {bundle['created_at']}"
        if not bundle["published"]:
            detail += "; never published, not a rollback target"
        print(f"  {mark} {bundle['id']}  {detail}")
    for staged in report["staged"]:
        print(f"  staged {staged['id']}  {staged['state']}; not a rollback target")
    for rejected in report["rejected"]:
        print(f"  rejected {rejected}  refused by the gate (in rejected/)")
    print("last runs:")
    for entry in report["runs"]:
        counts = entry.get("counts") or {}
        changed = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(
            f"  {entry['run_id']}  {entry['state']:<11s} "
            f"{entry.get('bundle_id') or entry.get('reason') or entry.get('message') or staged_note(entry)}  {changed}"
        )
    return 0


def staged_note(entry: dict) -> str:
    """``staged <id>`` for a run that staged a bundle and ended without a verdict (e.g. killed)."""
    return f"staged {entry['staged']}" if entry.get("staged") else ""
