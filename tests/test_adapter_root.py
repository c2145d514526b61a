"""AdapterRoot: names resolve to folders under the root and never anywhere else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flora_core.adapter_root import AdapterRoot


def make_adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    return path


@pytest.fixture
def root(tmp_path: Path) -> AdapterRoot:
    make_adapter_dir(tmp_path / "root" / "good-1.v2")
    make_adapter_dir(tmp_path / "root" / "A_b")
    (tmp_path / "root" / "no-config").mkdir()
    (tmp_path / "root" / "file.txt").write_text("x")
    make_adapter_dir(tmp_path / "outside")
    return AdapterRoot(tmp_path / "root")


def test_resolve_gives_the_real_folder(root):
    assert root.resolve("good-1.v2") == Path(os.path.realpath(root.root / "good-1.v2"))
    assert root.list_names() == ["A_b", "good-1.v2"]


@pytest.mark.parametrize("name", ["", "..", "../outside", "a/b", "/etc", ".hidden", "-x", "a..b", "x" * 129,
                                  "a b", "a\x00", "é", 7, None])
def test_bad_names_are_refused_before_touching_disk(root, name):
    with pytest.raises(ValueError, match="is not valid: names are folder names under the adapter root"):
        root.resolve(name)


def test_symlink_out_of_the_root_is_refused_and_not_listed(root, tmp_path):
    (root.root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root.root / "self").symlink_to(root.root, target_is_directory=True)
    for name in ("escape", "self"):
        with pytest.raises(ValueError, match=f"adapter '{name}' resolves outside the adapter root"):
            root.resolve(name)
    assert "escape" not in root.list_names() and "self" not in root.list_names()


def test_symlink_within_the_root_is_followed(root):
    (root.root / "alias").symlink_to(root.root / "A_b", target_is_directory=True)
    assert root.resolve("alias") == root.resolve("A_b")
    assert "alias" in root.list_names()


def test_root_reached_through_a_symlink(tmp_path, root):
    (tmp_path / "link").symlink_to(root.root, target_is_directory=True)
    linked = AdapterRoot(tmp_path / "link")
    assert linked.resolve("A_b") == root.resolve("A_b")
    assert linked.list_names() == root.list_names()


def test_missing_folder_and_files_are_not_adapters(root):
    for name in ("missing", "file.txt"):
        with pytest.raises(ValueError, match=f"no adapter folder named '{name}'"):
            root.resolve(name)


def test_root_must_be_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        AdapterRoot(tmp_path / "nope")
    assert AdapterRoot(str(tmp_path)).root == tmp_path


def test_a_weights_file_linking_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sneaky").mkdir(parents=True)
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"not for you")
    (root / "sneaky" / "adapter_config.json").write_text("{}")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the adapter root"):
        AdapterRoot(root).resolve("sneaky")
    assert "sneaky" not in AdapterRoot(root).list_names()


def test_name_of_a_path_directly_under_the_root(root, tmp_path):
    """vLLM's load_lora_adapter names folders by path: absolute or relative, only folders directly under the root."""
    assert root.name_of(str(root.root / "A_b")) == "A_b"
    assert root.name_of("good-1.v2") == root.name_of(str(root.root / "x" / ".." / "good-1.v2")) == "good-1.v2"
    (root.root / "linked-out").symlink_to(tmp_path / "outside")
    for path in [str(tmp_path / "outside"), "../outside", "A_b/nested", "/etc", str(root.root), ".", "linked-out",
                 "missing"]:
        with pytest.raises(ValueError, match="^lora_path"):
            root.name_of(path)
        with pytest.raises(ValueError, match="^adapter_id"):  # LoRAX's adapter_source "local" names its field
            root.name_of(path, field="adapter_id")
