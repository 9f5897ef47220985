"""Micro-batched uploads (recommender.batching): the same answers as one at a time, fewer forward passes.

Two apps over the session's hierarchy + tags bundle, one batching (a long wait, so the
concurrent requests of a test surely meet) and one with batching off; concurrent requests
come from threads, each with its own test client, released together by a barrier.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import prometheus_sample

from recommender.batching import BatchSettings, QueryBatcher
from webapp import create_app
from webapp.config import ConfigError, resolve_config

#: Long enough that requests released together meet in one batch even on a loaded machine.
TEST_WAIT_MS = 200


@pytest.fixture(scope="module")
def batching_app(attribute_bundle):
    return create_app({"bundle": attribute_bundle, "reload_interval_s": 3600, "batch_wait_ms": TEST_WAIT_MS})


@pytest.fixture(scope="module")
def unbatched_app(attribute_bundle):
    return create_app({"bundle": attribute_bundle, "reload_interval_s": 3600, "batch_wait_ms": 0})


@pytest.fixture(scope="module")
def photos(attribute_engine) -> list[bytes]:
    """Twelve catalog photos of different products."""
    rows = attribute_engine.rows[::8][:12]
    return [Path(row.path).read_bytes() for row in rows]


#: Per request: query string. Different k, filters (label, tags, several values) and match_predicted.
REQUESTS = (
    "k=6",
    "k=3",
    "k=6&filter=colour:red",
    "k=1",
    "k=5&filter=tags:striped",
    "k=6&match_predicted=colour",
    "k=8&filter=colour:red&filter=colour:blue",
    "k=6",
    "k=2&filter=department:prints",
    "k=6&filter=tags:cool&match_predicted=department",
    "k=10",
    "k=4",
)


def concurrently(app, calls) -> list:
    """Runs ``calls`` (each ``client -> result``) in threads released together; returns their results in order."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(number: int) -> None:
        client = app.test_client()
        barrier.wait()
        results[number] = calls[number](client)

    threads = [threading.Thread(target=run, args=(number,)) for number in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def post(query: str, data: bytes):
    return lambda client: client.post(f"/api/v1/similar?{query}", data=data, content_type="image/jpeg")


def uploads_and_passes(app) -> tuple[float, float, float]:
    """``(forward passes, batch-size count, batch-size sum)`` from the app's /metrics."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return (
        prometheus_sample(text, "recommender_upload_forward_passes_total"),
        prometheus_sample(text, "recommender_upload_batch_size_count"),
        prometheus_sample(text, "recommender_upload_batch_size_sum"),
    )


def assert_same_answer(batched: dict, alone: dict) -> None:
    """Same keys, predictions and neighbours; probabilities and distances within 1e-5."""
    assert list(batched) == list(alone)
    for column, predicted in alone["predicted"].items():
        assert batched["predicted"][column]["label"] == predicted["label"]
        assert batched["predicted"][column]["probability"] == pytest.approx(predicted["probability"], abs=1e-5)
    if "hierarchy" in alone:
        assert batched["hierarchy"]["path"] == alone["hierarchy"]["path"]
        assert batched["hierarchy"]["probability"] == pytest.approx(alone["hierarchy"]["probability"], abs=1e-5)
    if "tags" in alone:
        assert [t["tag"] for t in batched["tags"]] == [t["tag"] for t in alone["tags"]]
        assert [t["probability"] for t in batched["tags"]] == pytest.approx(
            [t["probability"] for t in alone["tags"]], abs=1e-5
        )
    assert [n["id"] for n in batched["neighbors"]] == [n["id"] for n in alone["neighbors"]]
    assert [n["distance"] for n in batched["neighbors"]] == pytest.approx(
        [n["distance"] for n in alone["neighbors"]], abs=1e-5
    )
    assert batched.get("filter") == alone.get("filter")
    assert batched["bundle"] == alone["bundle"]


def test_concurrent_uploads_share_forward_passes_and_answer_as_one_at_a_time(batching_app, unbatched_app, photos):
    passes_before, count_before, sum_before = uploads_and_passes(batching_app)
    responses = concurrently(batching_app, [post(query, photo) for query, photo in zip(REQUESTS, photos)])
    assert [response.status_code for response in responses] == [200] * len(REQUESTS)
    client = unbatched_app.test_client()
    for query, photo, response in zip(REQUESTS, photos, responses):
        alone = client.post(f"/api/v1/similar?{query}", data=photo, content_type="image/jpeg")
        assert alone.status_code == 200
        assert_same_answer(response.get_json(), alone.get_json())
    ks = [int(query.split("&")[0].removeprefix("k=")) for query in REQUESTS]
    assert [len(response.get_json()["neighbors"]) for response in responses] == ks  # each its own k
    passes, count, total = uploads_and_passes(batching_app)
    assert total - sum_before == len(REQUESTS)  # every upload went through the batcher...
    assert count - count_before == passes - passes_before
    assert passes - passes_before < len(REQUESTS)  # ...in fewer forward passes than uploads


def test_a_bad_image_among_concurrent_good_ones_fails_alone(batching_app, unbatched_app, photos, image_files):
    bad = {3: image_files["truncated_jpeg"].read_bytes(), 7: b"not an image at all"}
    calls = [post("k=4", bad.get(number, photo)) for number, photo in enumerate(photos[:10])]
    calls.append(post("k=4&filter=colour:purple", photos[0]))  # an unknown value: refused before decoding
    responses = concurrently(batching_app, calls)
    client = unbatched_app.test_client()
    for number, response in enumerate(responses[:10]):
        if number in bad:
            assert response.status_code == 400
            assert response.get_json()["error"]["code"] == "invalid_image"
        else:
            assert response.status_code == 200, response.data[:200]
            alone = client.post("/api/v1/similar?k=4", data=photos[number], content_type="image/jpeg")
            assert_same_answer(response.get_json(), alone.get_json())
    assert responses[10].status_code == 400 and responses[10].get_json()["error"]["code"] == "invalid_filter"


def test_batching_off_means_one_pass_per_upload_in_its_own_thread(unbatched_app, photos):
    assert unbatched_app.extensions["query_batcher"] is None
    threads_before = threading.active_count()
    passes_before, _, _ = uploads_and_passes(unbatched_app)
    responses = concurrently(unbatched_app, [post("k=3", photo) for photo in photos[:4]])
    assert [response.status_code for response in responses] == [200] * 4
    passes, _, _ = uploads_and_passes(unbatched_app)
    assert passes - passes_before == 4  # each upload its own forward pass
    assert threading.active_count() == threads_before  # no thread left behind (batching has none either)


def test_one_batch_never_mixes_bundles(engine, attribute_engine, photos):
    """Requests holding different engines (a bundle swap in progress) get one forward pass per engine."""
    batcher = QueryBatcher(BatchSettings(max_wait_ms=TEST_WAIT_MS, max_batch=16))
    sizes: list[int] = []
    batcher.listeners.append(sizes.append)
    engines = [engine, attribute_engine] * 3
    results: list = [None] * len(engines)
    barrier = threading.Barrier(len(engines))

    def ask(number: int) -> None:
        served = engines[number]
        barrier.wait()
        results[number] = batcher.query(served, photos[number], served.query_options(3))

    threads = [threading.Thread(target=ask, args=(number,)) for number in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for number, served in enumerate(engines):
        alone = served.query(photos[number], 3)
        assert [n["id"] for n in results[number]["neighbors"]] == [n["id"] for n in alone["neighbors"]]
        assert results[number]["predicted"].keys() == alone["predicted"].keys()  # the two bundles differ here
    assert sum(sizes) == len(engines) and len(sizes) < len(engines)


def test_batch_settings_from_the_environment():
    assert resolve_config(environ={}).batch_wait_ms == 0  # off unless asked for (see WebConfig)
    config = resolve_config(environ={"RECOMMENDER_BATCH_WAIT_MS": "2.5", "RECOMMENDER_MAX_BATCH": "8"})
    assert (config.batch_wait_ms, config.max_batch) == (2.5, 8)
    assert BatchSettings(config.batch_wait_ms, config.max_batch).enabled
    assert not BatchSettings(0, 16).enabled and not BatchSettings(5, 1).enabled
    with pytest.raises(ConfigError, match="RECOMMENDER_MAX_BATCH"):
        resolve_config(environ={"RECOMMENDER_MAX_BATCH": "-1"})
    with pytest.raises(ValueError, match="batching is off"):
        QueryBatcher(BatchSettings(0, 16))
