"""Nightly rebuild policy: what changed, whether to retrain, the validation gate, the run.

:func:`rebuild` brings an artifact root's published bundle up to date with a catalog:
features come from the root's feature store (only new photos go through the backbone),
:func:`diff_catalog` counts what changed, :func:`decide_retrain` chooses between a new
classifier and the current one, and the new bundle is published only once it is written,
loaded and passed :func:`validation_gate`, so ``current`` always points to a bundle that
loads and answers. Until its gate passes the new bundle lives in ``staging/``, which
rollback and status never offer; only then is it renamed into ``bundles/`` and published.
The artifact root itself (layout, atomic publish, the job lock, run
logs, rollback, status) is :mod:`indexer.artifacts`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.artifacts import ArtifactRoot, RunLog, job_lock
from recommender.bundle import new_bundle_id, read_catalog_rows, read_classifier, read_label_space, verify_bundle
from recommender.checkpoints import checkpoint
from recommender.config import BuildConfig
from recommender.errors import BundleError, GateError, RecommenderError
from recommender.manifest import CatalogRecord, Manifest

if TYPE_CHECKING:  # indexer.build loads the training stack: imported when a rebuild runs
    from indexer.build import ClassifierReuse

log = logging.getLogger(__name__)

RETRAIN_POLICIES = ("auto", "always", "never")


@dataclass(frozen=True)
class RebuildConfig:
    """Settings of the rebuild job (defaults documented in the README).

    Attributes:
        retrain: ``auto`` (retrain when the label set changed or more than
            ``retrain_threshold`` of the catalog changed), ``always`` or ``never`` (reuse the
            current classifier; rows with a label it never saw are failed items).
        retrain_threshold: share of (added + changed + removed) items, relative to the
            current catalog, above which ``auto`` retrains.
        keep: bundles kept in ``bundles/`` after publishing (``current`` is never pruned).
        max_accuracy_drop: the gate refuses a retrained bundle whose primary validation
            accuracy is more than this below the current bundle's.
        self_check_sample: catalog photos the gate queries end to end; each must find itself first.
    """

    retrain: str = "auto"
    retrain_threshold: float = 0.2
    keep: int = 5
    max_accuracy_drop: float = 0.05
    self_check_sample: int = 20


@dataclass
class Changes:
    """How the new catalog differs from the current bundle's, by product id."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)
    #: Same photo and labels, other shop details (title, price, URL: the ``extra`` columns).
    #: They need a new bundle, never a new classifier, so they do not count toward retraining.
    redescribed: list[str] = field(default_factory=list)
    unchanged: int = 0

    def counts(self) -> dict[str, int]:
        """The counts, JSON-ready."""
        return {
            "added": len(self.added),
            "changed": len(self.changed),
            "removed": len(self.removed),
            "relabelled": len(self.relabelled),
            "redescribed": len(self.redescribed),
            "unchanged": self.unchanged,
        }

    @property
    def any(self) -> bool:
        """Whether anything differs."""
        return bool(self.added or self.changed or self.removed or self.relabelled or self.redescribed)


def diff_catalog(current_rows: list[CatalogRecord], rows, hashes: list[str]) -> Changes:
    """Compares the current bundle's records with the new catalog's rows, by id, photo hash, labels and details."""
    before = {row.id: row for row in current_rows}
    changes = Changes()
    seen = set()
    for row, digest in zip(rows, hashes):
        seen.add(row.id)
        old = before.get(row.id)
        if old is None:
            changes.added.append(row.id)
        elif old.sha256 != digest:
            changes.changed.append(row.id)
        elif old.labels != row.labels or tuple(old.tags or ()) != tuple(row.tags):
            changes.relabelled.append(row.id)
        elif dict(old.extra) != dict(row.extra):
            changes.redescribed.append(row.id)
        else:
            changes.unchanged += 1
    changes.removed = [i for i in before if i not in seen]
    return changes


def decide_retrain(
    policy: str, changes: Changes, reuse: ClassifierReuse | None, threshold: float, current_size: int
) -> tuple[bool, str]:
    """Whether to train a new classifier, and why (see :class:`RebuildConfig`).

    Args:
        policy: ``auto``, ``always`` or ``never``.
        changes: how the catalog differs from the current bundle's.
        reuse: whether the current bundle's classifier fits the new catalog
            (:func:`indexer.build.check_reuse`); None without a current bundle.
        threshold: share of changed items above which ``auto`` retrains.
        current_size: items in the current bundle.
    """
    if reuse is None:
        return True, "no current bundle"
    if policy == "always":
        return True, "--retrain always"
    if policy == "never":
        return False, "--retrain never"
    if not reuse.reusable:
        return True, reuse.reason
    if not reuse.same_labels:
        return True, "the label set changed"
    share = (len(changes.added) + len(changes.changed) + len(changes.removed) + len(changes.relabelled)) / max(
        current_size, 1
    )
    if share > threshold:
        return True, f"{share:.1%} of the catalog changed (threshold {threshold:.0%})"
    return False, f"{share:.1%} of the catalog changed (threshold {threshold:.0%}): classifier reused"


def validation_gate(
    new_bundle: Path, current_manifest: Manifest | None, config: RebuildConfig, retrained: bool
) -> dict:
    """Loads and checks a new bundle before it may be published.

    Checks: it verifies and loads; a sample of its catalog photos, queried end to end, each
    find themselves first; a retrained model's validation accuracy on the primary class
    (:attr:`LabelSpace.primary_column`: the hierarchy's leaf, else the first label column) is
    not more than ``max_accuracy_drop`` below the current bundle's on the same column.

    Returns:
        The gate's findings (JSON-ready).

    Raises:
        GateError: naming the check that failed.
    """
    from recommender.engine import load_bundle

    try:
        recommender = load_bundle(new_bundle)
    except RecommenderError as error:
        raise GateError(f"the new bundle does not load: {error}") from None
    rng = np.random.default_rng(0)
    count = min(config.self_check_sample, len(recommender.rows))
    sample = rng.choice(len(recommender.rows), size=count, replace=False)
    missed = []
    for position in sample:
        row = recommender.rows[int(position)]
        first = recommender.query(row.path, k=1, exclude_self=False)["neighbors"][0]
        if recommender.item(first["id"]).sha256 != row.sha256:
            missed.append(row.id)
    if missed:
        raise GateError(
            f"{len(missed)} of {count} sampled catalog photos do not find themselves first: {', '.join(missed[:10])}"
        )
    # The class training watches (the taxonomy's leaf with a hierarchy), from its one definition.
    primary = recommender.primary_column
    new_accuracy = recommender.manifest.metrics.accuracy(primary)
    findings = {"self_check": f"{count}/{count}", "primary_column": primary, "validation_accuracy": new_accuracy}
    if retrained and current_manifest is not None:
        old_accuracy = current_manifest.metrics.accuracy(primary)
        if old_accuracy is not None and new_accuracy is not None:
            findings["current_validation_accuracy"] = old_accuracy
            if new_accuracy < old_accuracy - config.max_accuracy_drop:
                raise GateError(
                    f"validation accuracy of the primary column {primary!r} fell from {old_accuracy:.3f} to "
                    f"{new_accuracy:.3f} "
                    f"(more than the allowed {config.max_accuracy_drop:.3f})"
                )
    return findings


def display_columns(catalog) -> tuple[str | None, str | None, str | None]:
    """The catalog's title, price and URL columns (what the web app shows of each product)."""
    return (catalog.display.title, catalog.display.price, catalog.display.url)


def display_columns_of(manifest: Manifest) -> tuple[str | None, str | None, str | None]:
    """The title, price and URL columns a bundle was built with."""
    return (manifest.catalog.title_column, manifest.catalog.price_column, manifest.catalog.url_column)


def undecodable_photos(bundle: Path) -> dict[tuple[str, str], str]:
    """Why each photo that would not decode when ``bundle`` was built failed, by (row id, sha256).

    From the bundle's ``build_report.json``; a bundle without one, or built before bad rows
    carried their photo's sha256, gives none.

    Raises:
        BundleError: the build report is not JSON.
    """
    path = bundle / "build_report.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise BundleError(f"{path}: not JSON ({error})") from None
    return {
        (entry["id"], entry["sha256"]): entry["reason"]
        for entry in report.get("bad_rows", [])
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
    }


def unchanged_without_backbone(
    catalog,
    current: Path,
    current_manifest: Manifest,
    current_rows: list[CatalogRecord],
    build_config: BuildConfig,
) -> tuple[Changes, list] | None:
    """Whether a catalog is exactly what the current bundle holds, told without loading the backbone.

    It is when the backbone is the bundle's (:func:`recommender.backbones.recorded_backbone_matches`),
    the label, hierarchy, tags and display columns are the bundle's, and every readable row is
    one of the bundle's records with the same photo (sha256), labels, tags and details, and
    every record is still there. Then the full path (features, :func:`check_reuse`, the diff)
    would come to "nothing changed" too: the same rows give the same features, taxonomy and
    class counts. A row whose photo would not decode at the bundle's build, with the same id,
    the same bytes and the same ``max_pixels``, fails again without being decoded
    (:func:`undecodable_photos`): a catalog with a broken photo is still unchanged. Anything
    else returns None and the full path decides.

    Returns:
        ``(changes, rows that could not be read)`` when unchanged, else None.

    Raises:
        CatalogError: reading alone found more bad rows than ``max_bad_fraction`` (as a build would).
    """
    from recommender.backbones import recorded_backbone_matches
    from recommender.catalog import BadRow, check_bad_fraction
    from recommender.features import hash_rows

    check_bad_fraction(catalog.total, catalog.bad_rows, build_config.max_bad_fraction)
    recorded = current_manifest.catalog
    if (
        list(catalog.label_columns) != list(recorded.label_columns)
        or (tuple(build_config.hierarchy) if build_config.hierarchy else None)
        != (tuple(recorded.hierarchy) if recorded.hierarchy else None)
        or catalog.tags_column != recorded.tags_column
        or display_columns(catalog) != display_columns_of(current_manifest)
    ):
        return None
    if not recorded_backbone_matches(build_config.backbone, current_manifest.backbone, current_manifest.libraries):
        return None
    rows, hashes, unreadable = hash_rows(catalog.rows)
    known = undecodable_photos(current) if build_config.max_pixels == current_manifest.max_pixels else {}
    failing = [
        BadRow(line=row.line, id=row.id, image=row.image, reason=known[key], sha256=digest)
        if (key := (row.id, digest)) in known
        else None
        for row, digest in zip(rows, hashes)
    ]
    if any(failing):
        rows = [row for row, bad in zip(rows, failing) if bad is None]
        hashes = [digest for digest, bad in zip(hashes, failing) if bad is None]
    changes = diff_catalog(current_rows, rows, hashes)
    if changes.any:
        return None
    return changes, catalog.bad_rows + unreadable + [bad for bad in failing if bad is not None]


def rebuild(
    catalog_source: str | Path,
    root: str | os.PathLike,
    build_config: BuildConfig = BuildConfig(),
    config: RebuildConfig = RebuildConfig(),
    *,
    progress: bool = False,
) -> dict:
    """Brings the published bundle up to date with a catalog (see the module docstring).

    Args:
        catalog_source: the catalog (CSV or folder).
        root: the artifact root.
        build_config: build settings (its feature store is replaced by ``ROOT/features.h5``).
        config: job settings.
        progress: show progress bars.

    Returns:
        The run summary (also in ``ROOT/runs/<run id>.json``): state ``published`` or
        ``unchanged``, counts, the decision on retraining, gate findings, timings.

    Raises:
        JobLockedError: another rebuild runs on this root.
        GateError: the new bundle was refused (moved from ``staging/`` to ``rejected/``;
            ``current`` untouched).
        CatalogError, TrainingError, ...: as for a build; ``current`` untouched.
    """
    from indexer.build import (
        build_bundle,
        check_reuse,
        drop_unknown_labels,
        engine_session,
        load_catalog,
        prepare_catalog,
    )

    if config.retrain not in RETRAIN_POLICIES:
        raise ValueError(f"retrain must be one of {RETRAIN_POLICIES}")
    artifacts = ArtifactRoot(root)
    build_config = replace(build_config, feature_store=artifacts.feature_store)
    with job_lock(artifacts), contextlib.ExitStack() as engine:
        run = RunLog(artifacts)
        try:
            leftovers = artifacts.remove_leftovers()
            if leftovers:
                log.warning("removed leftovers of an interrupted run: %s", ", ".join(leftovers))
                run.data["removed_leftovers"] = leftovers
            if artifacts.record_current():
                log.warning("recorded current as published (its run was killed after swapping it)")
            current = artifacts.current_bundle()
            current_manifest = verify_bundle(current) if current else None
            current_rows = read_catalog_rows(current, current_manifest.counts.items) if current else []

            run.phase("features")
            catalog = load_catalog(catalog_source, build_config)
            if current is not None and config.retrain != "always":
                # Most nights nothing changed: tell so from the photos' hashes and the bundle's
                # records alone, without loading the backbone (and importing TensorFlow).
                same = unchanged_without_backbone(catalog, current, current_manifest, current_rows, build_config)
                if same is not None:
                    changes, failed = same
                    counts = {**changes.counts(), "failed": len(failed), "extracted": 0}
                    return run.finish(
                        "unchanged",
                        counts=counts,
                        failed=[bad.to_json() for bad in failed],
                        current=current.name,
                        backbone_loaded=False,
                        message="nothing changed; current bundle kept",
                    )
            engine.enter_context(engine_session(build_config))  # one Ray session from here to the bundle
            prepared = prepare_catalog(catalog, build_config, progress=progress)

            def tally(prepared):
                """What changed against ``current`` and what failed, for ``prepared``."""
                changes = diff_catalog(current_rows, prepared.extraction.rows, prepared.extraction.hashes)
                counts = {
                    **changes.counts(),
                    "failed": len(prepared.bad_rows),
                    "extracted": prepared.extraction.extracted,
                }
                return changes, counts, [bad.to_json() for bad in prepared.bad_rows]

            def keep_current(message: str) -> dict:
                return run.finish("unchanged", counts=counts, failed=failed, current=current.name, message=message)

            changes, counts, failed = tally(prepared)
            reuse = None
            if current is not None:
                space = read_label_space(current)
                reuse = check_reuse(space, prepared, trained_on=current_manifest.backbone.identity_key)
                same_display = display_columns(prepared.catalog) == display_columns_of(current_manifest)
                if reuse.reusable and not changes.any and same_display and config.retrain != "always":
                    return keep_current("nothing changed; current bundle kept")
                if not same_display:
                    run.data["display_columns"] = "changed"

            retrain, reason = decide_retrain(
                config.retrain, changes, reuse, config.retrain_threshold, len(current_rows)
            )
            classifier = None
            if not retrain:
                # A product with a label the reused model never saw is a failed item, not a
                # failed job (strict in aggregate: --max-bad-fraction); the rest publishes.
                labelled = drop_unknown_labels(prepared, reuse, build_config.max_bad_fraction)
                if labelled is not prepared:
                    prepared = labelled
                    changes, counts, failed = tally(prepared)
                    if not changes.any:
                        return keep_current(
                            "nothing to publish besides rows the current model cannot label; current bundle kept"
                        )
                classifier, _ = read_classifier(current, current_manifest, label_space=space)
                classifier.metrics = {**classifier.metrics, "reused_from": current.name}
            run.data.update(counts=counts, failed=failed, retrain=retrain, retrain_reason=reason)
            run.phase("build")
            bundle_id = new_bundle_id()
            # Staged until the gate passes: nothing (rollback, status' bundles) offers staging/.
            run.data["staged"] = bundle_id
            staged = artifacts.staging_path(bundle_id)
            report = build_bundle(prepared, staged, build_config, classifier=classifier, bundle_id=bundle_id)

            run.phase("gate")
            checkpoint("gate")  # a complete bundle not yet validated: a kill here must leave it unoffered
            try:
                findings = validation_gate(staged, current_manifest, config, retrained=retrain)
            except GateError as error:
                artifacts.reject(bundle_id)
                run.finish("refused", reason=str(error), rejected=bundle_id)
                raise

            run.phase("publish")
            artifacts.promote(bundle_id)
            artifacts.publish(bundle_id, run_id=run.run_id)
            pruned = artifacts.prune(config.keep)
            return run.finish(
                "published",
                bundle_id=bundle_id,
                previous=current.name if current else None,
                items=report.items,
                gate=findings,
                pruned=pruned,
                build_seconds=report.seconds,
            )
        except GateError:
            raise
        except BaseException as error:
            run.finish("failed", reason=f"{type(error).__name__}: {error}")
            raise


def summary_lines(summary: dict) -> list[str]:
    """A one-screen human summary of a run."""
    counts = summary.get("counts", {})
    lines = [f"run {summary['run_id']}: {summary['state']} in {summary.get('total_seconds', 0):.1f} s"]
    if counts:
        lines.append(
            "  photos: {added} added, {changed} changed, {removed} removed, {relabelled} relabelled, "
            "{redescribed} redescribed, {unchanged} unchanged, {failed} failed; "
            "{extracted} through the backbone".format(**counts)
        )
    if "retrain_reason" in summary:
        lines.append(f"  classifier: {'retrained' if summary['retrain'] else 'reused'} ({summary['retrain_reason']})")
    if summary.get("bundle_id"):
        lines.append(
            f"  published {summary['bundle_id']} ({summary['items']} items; previous {summary.get('previous')})"
        )
    if summary.get("pruned"):
        lines.append(f"  pruned: {', '.join(summary['pruned'])}")
    if summary.get("message"):
        lines.append(f"  {summary['message']}")
    for bad in summary.get("failed", [])[:10]:
        lines.append(f"  failed: line {bad['line']} ({bad['id']}): {bad['reason']}")
    return lines


def to_json(summary: dict) -> str:
    """The machine-readable summary line."""
    return json.dumps(summary, default=str, sort_keys=True)
