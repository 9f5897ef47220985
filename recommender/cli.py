"""The ``recommender`` command: a table of subcommands, and the one place errors become exit codes.

Each row of :data:`COMMANDS` names the module that owns the command: its
``add_arguments(parser)`` and ``run(args) -> int``. A module is imported by path only when its
command is parsed or run, so the library imports neither ``indexer`` nor ``webapp``,
``recommender --help`` imports no command, and building the parser never imports TensorFlow.

Exit codes: 0 success, 1 user or data error (one clear line on stderr, no traceback),
2 usage error (argparse). Library errors are typed (``recommender.errors``); this is the only
layer, with the web app, that turns them into messages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Command:
    """One subcommand of ``recommender``.

    Attributes:
        name: as typed after ``recommender``.
        help: one line in ``recommender --help``.
        description: the top of ``recommender NAME --help`` (None: ``help``).
        module: dotted path of the module with ``add_arguments(parser)`` and ``run(args) -> int``.
    """

    name: str
    help: str
    description: str | None
    module: str

    def load(self) -> ModuleType:
        """Imports the command's module."""
        return importlib.import_module(self.module)


COMMANDS: tuple[Command, ...] = (
    Command(
        "build",
        "build a bundle from a catalog",
        "Read a catalog, extract features, train the classifier, index every item and write a bundle.",
        "indexer.commands.build",
    ),
    Command(
        "query",
        "ask a bundle about images",
        "Print one JSON object per image: predicted labels and the k nearest catalog items.",
        "recommender.query_command",
    ),
    Command(
        "rebuild",
        "nightly job: bring the published bundle up to date with a catalog",
        "Incremental rebuild into ARTIFACT_ROOT: reuse stored features, retrain when needed, gate, publish "
        "atomically, prune.",
        "indexer.commands.rebuild",
    ),
    Command(
        "panels",
        "precompute every catalog item's similar-items panel",
        "For every catalog item of a bundle, its k nearest other items (optionally within its own value of a "
        "label column), written to a verified folder the web app answers /api/v1/items/<id>/similar from.",
        "indexer.commands.panels",
    ),
    Command("rollback", "point current back at an earlier bundle", None, "indexer.commands.rollback"),
    Command(
        "status", "show the artifact root: current bundle, bundles, lock, last runs", None, "indexer.commands.status"
    ),
    Command(
        "serve",
        "serve the demo page and the JSON API (Flask's server; see the README for gunicorn)",
        "Serve a bundle over HTTP: the demo page, /api/v1/similar, /api/v1/items/<id>/similar.",
        "webapp.cli",
    ),
    Command(
        "evaluate",
        "measure a bundle on a labelled test catalog and write an HTML report",
        "Accuracy, precision/recall/F1, ROC AUC, retrieval P@k/recall@k/hit rate/mAP@k and plots, in REPORT_DIR.",
        "indexer.evaluate",
    ),
    Command(
        "demo",
        "build a demo bundle from generated images and query it",
        "Generate a small catalog in data/demo, build a bundle, run example queries.",
        "indexer.demo",
    ),
)


def _version() -> str:
    """The installed package's version (``unknown`` when run from a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recommender")
    except PackageNotFoundError:
        return "unknown"


def make_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m recommender``: one subparser per row of :data:`COMMANDS`.

    Args:
        argv: the command line about to be parsed. Only the command it names gets its flags (and
            its module imported), so ``recommender --help`` and each command load only what they
            use; None gives every command its flags.
    """
    # The top-level options (-h, -v) take no value: the first other word names the command.
    named = next((word for word in argv if not word.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="recommender",
        description="Visual similarity recommender: build a bundle from a catalog, then ask it about photos.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (library logs at INFO)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.description)
        if argv is None or command.name == named:
            command.load().add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser(argv).parse_args(argv)
    from recommender import quiet

    if args.verbose:
        # -v shows TensorFlow's native log lines too (TF_CPP_MIN_LOG_LEVEL=0 keeps them unfiltered).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    else:
        # Before any command imports TensorFlow: its C++ start-up lines stay off stderr, errors not.
        quiet.install()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from recommender.errors import RecommenderError

    command = next(command for command in COMMANDS if command.name == args.command)
    try:
        return command.load().run(args)
    except RecommenderError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as error:
        # A full disk inside a library we do not wrap (e.g. Keras saving the model): one line too.
        from recommender.files import storage_error

        typed = storage_error(error)
        if typed is None:
            raise
        print(f"error: {typed}", file=sys.stderr)
        return EXIT_ERROR


def main_entry() -> None:
    """Console-script entry point (``recommender``)."""
    sys.exit(main())
