"""Adapter names -> directories under one root folder, without ever leaving that folder.

An adapter's name is the name of its folder directly under the root. Names are checked against
a conservative pattern before touching the disk, and the real path (symlinks followed) must be a
directory strictly inside the root's real path, so "../x", absolute paths and symlinks that
point elsewhere are all refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from flora_core.adapter_config import CONFIG_NAME

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class AdapterRoot:
    """A folder whose subfolders are adapter directories (adapter_config.json + weights).

    root: the folder; it must exist. Its real path is taken once, here.
    """

    root: Path
    _real_root: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        root = Path(self.root)
        if not root.is_dir():
            raise ValueError(f"adapter root {str(root)!r} is not a directory; create it or pass an existing folder")
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "_real_root", Path(os.path.realpath(root)))

    def resolve(self, name: str) -> Path:
        """The real directory of adapter `name`; ValueError for bad names or paths leaving the root."""
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None or ".." in name:
            raise ValueError(
                f"adapter name {name!r} is not valid: names are folder names under the adapter root, "
                f"1-128 characters of letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'"
            )
        real = Path(os.path.realpath(self.root / name))
        if real == self._real_root or self._real_root not in real.parents:
            raise ValueError(
                f"adapter {name!r} resolves outside the adapter root {str(self.root)!r}; adapter names are "
                "folder names under the root, and symlinks out of it are refused"
            )
        if not real.is_dir():
            raise ValueError(f"no adapter folder named {name!r} under the adapter root {str(self.root)!r}")
        for entry in real.iterdir():  # files inside may not point out of the root either
            if self._real_root not in Path(os.path.realpath(entry)).parents:
                raise ValueError(
                    f"adapter {name!r} holds {entry.name!r}, a link to a file outside the adapter root; "
                    "copy the file into the adapter folder instead"
                )
        return real

    def name_of(self, path: str, field: str = "lora_path") -> str:
        """The name of the adapter folder at `path` (absolute, or relative to the root), after `resolve`'s checks;
        ValueError, its message opening with `field` (the request's field that gave the path), unless that
        folder sits directly under the root."""
        given = Path(os.path.normpath(Path(self.root, path)))  # an absolute path replaces the root
        if Path(os.path.realpath(given.parent)) != self._real_root:
            raise ValueError(f"{field} {path!r} is not a folder directly under the adapter root; copy the adapter "
                             "into adapter_dir and pass its folder (absolute, or relative to adapter_dir)")
        try:
            self.resolve(given.name)
        except ValueError as error:
            raise ValueError(f"{field} {path!r}: {error}") from error
        return given.name

    def relative(self, message: str) -> str:
        """`message` with paths under this root shown relative to it: errors sent to clients name no server paths."""
        for prefix in sorted({str(self._real_root), str(self.root.absolute()), str(self.root)}, key=len, reverse=True):
            message = message.replace(prefix + os.sep, "").replace(prefix, "<adapter root>")
        return message

    def list_names(self) -> list[str]:
        """Sorted names of the valid adapter folders (those holding adapter_config.json) under the root."""
        names = []
        for entry in self.root.iterdir():
            try:
                directory = self.resolve(entry.name)
            except ValueError:
                continue
            if (directory / CONFIG_NAME).is_file():
                names.append(entry.name)
        return sorted(names)
