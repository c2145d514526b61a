"""The adapter catalog under Serve's thread pool, and across its own restarts, without a cluster.

Serve runs a deployment's plain methods on several threads at once; a catalog restarted (its node
lost, say) numbers every adapter from version 1 again while the model replicas live on. What
replicas serve for these refs is checked in test_reliability_units.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from router.catalog import newest_snapshot
from tests.serving_fixtures import make_catalog, write_test_adapters


@pytest.fixture
def adapter_root(tmp_path):
    write_test_adapters(tmp_path, names=["lora-r2", "lora-r4"])
    return tmp_path


def slow_reads(monkeypatch, catalog, seconds: float = 0.2) -> None:
    """Every adapter read takes `seconds` more, as a large adapter's safetensors do: the window a race needs."""
    read = catalog._load

    def slow(name):
        time.sleep(seconds)
        return read(name)

    monkeypatch.setattr(catalog, "_load", slow)


def run_together(*calls) -> list:
    """Each call on its own thread, started 50 ms apart; their results in call order."""
    results = [None] * len(calls)

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    return results


def test_two_merges_of_one_name_at_once_serve_one_recipe_under_one_version(adapter_root, monkeypatch):
    catalog = make_catalog(adapter_root)
    slow_reads(monkeypatch, catalog)
    first, second = run_together(lambda: catalog.merge("m", (("lora-r2", 1.0),)),
                                 lambda: catalog.merge("m", (("lora-r4", 1.0), ("lora-r2", 0.5))))
    assert not isinstance(first, str) and isinstance(second, str) and "already served" in second
    assert catalog.snapshot().entries["m"] == first


def test_unloading_a_component_while_it_is_merged_leaves_no_merge_of_it(adapter_root, monkeypatch):
    catalog = make_catalog(adapter_root)
    slow_reads(monkeypatch, catalog)
    merged, removed = run_together(lambda: catalog.merge("n", (("lora-r2", 0.5), ("lora-r4", 0.5))),
                                   lambda: catalog.unload("lora-r2"))
    assert not isinstance(merged, str) and removed == ["lora-r2", "n"]
    assert {"lora-r2", "n"}.isdisjoint(catalog.snapshot().entries)


def test_a_restarted_catalogs_versions_never_share_a_key_with_the_last_ones(adapter_root):
    before = make_catalog(adapter_root)
    reloaded = before.load("lora-r2")
    after = make_catalog(adapter_root)  # a new start: every folder at version 1 again
    restarted = after.snapshot().entries["lora-r2"]
    old_first = before.snapshot().entries["lora-r4"]
    assert restarted.version == old_first.version == 1 and reloaded.version == 2
    assert len({restarted.ref.key, old_first.ref.key, reloaded.ref.key}) == 3
    assert restarted.ref.key != make_catalog(adapter_root).snapshot().entries["lora-r2"].ref.key
    assert reloaded.ref.order < restarted.ref.order  # the new start's refs are the newest
    assert restarted.ref.key.startswith("lora-r2@")  # replicas report residency by the name before '@'


def test_an_older_snapshot_answering_late_never_replaces_a_newer_one(adapter_root):
    """An ingress's snapshot calls in flight together can answer out of order; a restarted catalog's first
    snapshot is newer than any of the last start's, whatever their generations."""
    catalog = make_catalog(adapter_root)
    before = catalog.snapshot()
    catalog.unload("lora-r2")
    after = catalog.snapshot()
    assert newest_snapshot(None, before) is before
    assert newest_snapshot(after, before) is after and "lora-r2" not in newest_snapshot(after, before).entries
    assert newest_snapshot(before, after) is after
    for _ in range(3):
        catalog.unload("lora-r4") or catalog.load("lora-r4")
    restarted = make_catalog(adapter_root).snapshot()
    assert restarted.generation < catalog.snapshot().generation
    assert newest_snapshot(catalog.snapshot(), restarted) is restarted
