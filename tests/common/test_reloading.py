"""ReloadingFile: re-read on change, keep the last good value, say so once per change."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from rooftop.common.errors import ConfigError
from rooftop.common.reloading import ReloadingFile, file_signature

log = logging.getLogger("tests.reloading")


def _load_number(path: Path) -> int:
    text = path.read_text().strip()
    if not text:
        raise ConfigError(f"{path} is empty")
    return int(text)  # ValueError for junk


def _write(path: Path, text: str) -> None:
    # A different size or a new inode is a change even within one mtime tick.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _reloading(path: Path) -> ReloadingFile[int]:
    return ReloadingFile(
        (path,),
        lambda: _load_number(path),
        what="number file",
        log=log,
        describe=lambda old, new: f"{old} -> {new}",
    )


def test_a_changed_file_is_loaded_again_and_the_change_logged(tmp_path, caplog):
    path = tmp_path / "n"
    path.write_text("1\n")
    number = _reloading(path)
    assert number.get() == 1 and number.reloads == 0
    _write(path, "22\n")
    with caplog.at_level(logging.INFO, logger="tests.reloading"):
        assert number.get() == 22
        assert number.get() == 22
    assert number.reloads == 1
    assert [r.getMessage() for r in caplog.records] == ["number file changed: 1 -> 22"]


def test_a_bad_rewrite_keeps_the_last_good_value_and_warns_once_per_change(tmp_path, caplog):
    path = tmp_path / "n"
    path.write_text("7\n")
    number = _reloading(path)
    with caplog.at_level(logging.WARNING, logger="tests.reloading"):
        _write(path, "not a number\n")
        assert [number.get() for _ in range(3)] == [7, 7, 7]
        _write(path, "")
        assert number.get() == 7
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # one per bad version, not one per get()
    assert "keeping the last good one" in messages[0] and "not a number" in messages[0]
    _write(path, "8\n")
    assert number.get() == 8


def test_unusable_at_construction_is_a_config_error_naming_the_files(tmp_path):
    with pytest.raises(ConfigError, match="number file unusable"):
        _reloading(tmp_path / "absent")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="empty is empty"):
        _reloading(tmp_path / "empty")


def test_signature_tells_absent_from_present_and_ignores_unset_paths(tmp_path):
    path = tmp_path / "f"
    assert file_signature([path, None]) == (None, None)
    path.write_text("x")
    (present, unset) = file_signature([path, None])
    assert present is not None and unset is None
