"""The adapter catalog's merged adapters, without a cluster: versions, cascades and refusals.

What the replicas serve for a merge is checked over HTTP in test_serving_http.py.
"""

from __future__ import annotations

import re
import shutil

import pytest

from deploy.app import build_app
from flora_core.default_model import DEFAULT_MODEL_NAME
from tests.serving_fixtures import app_args, make_catalog, write_test_adapters


@pytest.fixture
def adapter_root(tmp_path):
    write_test_adapters(tmp_path, names=["lora-r2", "lora-r4", "lora-r8", "flora-r1", "flora-r2"])
    return tmp_path


def test_config_merges_are_served_from_the_start(adapter_root):
    catalog = make_catalog(adapter_root, merges=(("mix", (("lora-r2", 0.5), ("lora-r4", 0.5))),))
    entry = catalog.snapshot().entries["mix"]
    assert (entry.kind, entry.rank, entry.version) == ("lora", 6, 1)
    assert entry.ref.merged_from == (("lora-r2", 0.5), ("lora-r4", 0.5))


def test_a_config_merge_that_cannot_be_served_stops_the_start_with_the_fix(adapter_root):
    with pytest.raises(ValueError, match="merged_adapters: .*rank 12.* raise lora_max_rank"):
        make_catalog(adapter_root, merges=(("big", (("lora-r8", 1.0), ("lora-r4", 1.0))),))


def test_building_the_app_fails_on_a_config_merge_that_cannot_be_served(adapter_root):
    merge = {"name": "m", "adapters": ["lora-r2", "nope"], "weights": [1, 1]}
    with pytest.raises(ValueError, match=r"merged_adapters: adapters\[1\]='nope' is not served; load it first, or add"):
        build_app(app_args(adapter_root, merged_adapters=[merge]))


def test_reloading_a_component_remerges_under_a_new_version(adapter_root):
    catalog = make_catalog(adapter_root)
    first = catalog.merge("mix", (("flora-r1", 1.0), ("flora-r2", 0.5)))
    catalog.load("flora-r2")
    again = catalog.snapshot().entries["mix"]
    assert again.version == first.version + 1 and again.merged_from == first.merged_from


def test_a_merge_that_no_longer_fits_after_a_reload_is_unloaded(adapter_root):
    catalog = make_catalog(adapter_root)
    assert not isinstance(catalog.merge("mix", (("lora-r2", 1.0), ("lora-r4", 1.0))), str)
    shutil.rmtree(adapter_root / "lora-r4")
    shutil.copytree(adapter_root / "lora-r8", adapter_root / "lora-r4")  # now rank 8: 2 + 8 > 8
    assert not isinstance(catalog.load("lora-r4"), str)
    assert "mix" not in catalog.snapshot().entries


def test_unloading_a_component_unloads_its_merges_only(adapter_root):
    catalog = make_catalog(adapter_root)
    catalog.merge("a", (("lora-r2", 1.0),))
    catalog.merge("b", (("lora-r2", 1.0), ("lora-r4", -1.0)))
    catalog.merge("c", (("lora-r4", 1.0),))
    assert catalog.unload("lora-r2") == ["lora-r2", "a", "b"]
    assert set(catalog.snapshot().entries) >= {"c", "lora-r4"}
    assert catalog.unload("lora-r2") == []


@pytest.mark.parametrize("name, recipe, message", [
    ("m", (("lora-r2", 1.0), ("lora-r2", 1.0)), "lists 'lora-r2' twice"),
    ("m", (("lora-r2", 1.0), ("flora-r1", 1.0)), "mix kinds"),
    ("m", (("lora-r2", float("inf")),), r"weights\[0\]=inf"),
    ("lora-r4", (("lora-r2", 1.0),), "already served"),
    ("a/b", (("lora-r2", 1.0),), "is not valid"),
    (DEFAULT_MODEL_NAME, (("lora-r2", 1.0),), "is the base model's name"),
])
def test_refused_merges_say_why_and_change_nothing(adapter_root, name, recipe, message):
    catalog = make_catalog(adapter_root)
    before = catalog.snapshot()
    refusal = catalog.merge(name, recipe)
    assert isinstance(refusal, str) and re.search(message, refusal), refusal
    assert catalog.snapshot() == before


def test_a_local_folder_names_its_own_adapter_never_a_merge_of_that_name(adapter_root):
    """LoRAX's adapter_source 'local': the folder's served adapter; a folder that is not served is refused
    even where a merge carries its name, so a path never silently reaches another adapter."""
    catalog = make_catalog(adapter_root)
    assert catalog.served_at(str(adapter_root / "lora-r2")).name == "lora-r2"
    assert catalog.served_at("flora-r1").name == "flora-r1"
    assert not isinstance(catalog.merge("mix", (("lora-r2", 1.0), ("lora-r4", 1.0))), str)
    shutil.copytree(adapter_root / "lora-r8", adapter_root / "mix")  # a folder named like the merge, not served
    refused = catalog.served_at(str(adapter_root / "mix"))
    assert isinstance(refused, str) and refused.startswith("adapter_id") and "not served" in refused
    refused = catalog.served_at("../elsewhere")
    assert isinstance(refused, str) and refused.startswith("adapter_id") and "directly under" in refused


def test_no_adapter_takes_the_base_models_name(adapter_root, caplog):
    """Requests naming the base model get no adapter, so a folder of that name would never be applied:
    skipped at start (with the fix in the log) and refused by a load, never listed beside the base model."""
    shutil.copytree(adapter_root / "lora-r2", adapter_root / DEFAULT_MODEL_NAME)
    with caplog.at_level("WARNING", logger="ray.serve"):
        catalog = make_catalog(adapter_root)
    assert DEFAULT_MODEL_NAME not in catalog.snapshot().entries and "lora-r2" in catalog.snapshot().entries
    assert "rename the folder" in caplog.text
    before = catalog.snapshot()
    refusal = catalog.load(DEFAULT_MODEL_NAME)
    assert isinstance(refusal, str) and "base model's name" in refusal and str(adapter_root) not in refusal
    assert catalog.snapshot() == before
