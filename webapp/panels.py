"""Answering ``GET /api/v1/items/<id>/similar`` from precomputed panels when the served bundle has them.

Each loaded engine gets its panels, if any, when it is loaded (at start-up and on every bundle
swap, in the same background load), so an engine and its panels are swapped in together and a
request never mixes two bundles. Where panels are looked for: ``WebConfig.panels``
(``$RECOMMENDER_PANELS``: a folder of panels folders named by bundle id, or one panels folder),
else ``ROOT/panels/<bundle id>/`` beside ``ROOT/bundles/<bundle id>/`` (where
``recommender rebuild --panels`` writes them). Panels of another bundle (id or manifest sha256)
are ignored with a warning; broken ones with an error; either way the item endpoint searches
live, as it does without panels.

The map is compact: (items, k) int32 positions and float32 distances (8 bytes per neighbour).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from recommender.errors import PanelsError, PanelsMismatchError
from recommender.panels import PanelMap, bundle_manifest_sha256, default_panels_root, load_panel_map, panels_folder_for

log = logging.getLogger(__name__)

#: Values of the ``X-Similar-Source`` header of an item's answer.
SOURCES = ("panels", "live")


class ServedPanels:
    """The panels of each loaded engine (weakly keyed: a swapped-out engine takes its panels with it).

    Args:
        configured: ``WebConfig.panels`` (None: the artifact root's ``panels/``).
    """

    def __init__(self, configured: Path | None):
        self.configured = configured
        self._by_engine: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def wrap(self, loader: Callable) -> Callable:
        """``loader`` (path -> engine) that also loads the engine's panels."""

        def load_with_panels(path):
            engine = loader(path)
            self.attach(engine)
            return engine

        return load_with_panels

    def attach(self, engine) -> PanelMap | None:
        """Loads and verifies the panels of ``engine``'s bundle, if there are any; never raises for them."""
        root = self.configured if self.configured is not None else default_panels_root(engine.path)
        if root is None:
            return None
        folder = panels_folder_for(root, engine.bundle_id)
        if not folder.exists():
            log.info("no panels for bundle %s at %s: item answers use live search", engine.bundle_id, folder)
            return None
        started = time.perf_counter()
        try:
            panels = load_panel_map(
                folder, engine.bundle_id, bundle_manifest_sha256(engine.path), [row.id for row in engine.rows]
            )
        except PanelsMismatchError as error:
            log.warning("ignoring panels of another bundle: %s; item answers use live search", error)
            return None
        except (PanelsError, OSError) as error:
            log.error("refused the panels at %s: %s; item answers use live search", folder, error)
            return None
        if panels.manifest.per_column is not None:
            # An answer from per-column panels needs the filter report of a live filtered search.
            log.warning(
                "panels at %s are per %s; the item endpoint answers from plain panels only (live search)",
                folder,
                panels.manifest.per_column,
            )
            return None
        self._by_engine[engine] = panels
        log.info(
            "loaded panels of bundle %s from %s (%d items, k=%d) in %.2f s",
            engine.bundle_id,
            folder,
            panels.manifest.items,
            panels.k,
            time.perf_counter() - started,
        )
        return panels

    def of(self, engine) -> PanelMap | None:
        """The panels loaded for ``engine``, or None."""
        return self._by_engine.get(engine)

    def answer(self, engine, item_id: str, k: int) -> dict | None:
        """``engine.similar_to_item(item_id, k)`` read from the panels, or None when they cannot answer.

        Raises:
            UnknownItemError: no catalog item has this id.
        """
        panels = self._by_engine.get(engine)
        if panels is None:
            return None
        found = panels.neighbors_of(engine.position_of(item_id), k)
        if found is None:
            return None
        return engine.item_answer(item_id, *found)
