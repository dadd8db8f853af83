"""Atomic writes: complete files or none, ordinary permissions, nothing left behind on failure."""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from loupe.atomic import atomic_write, write_bytes, write_text


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that sets it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_mode_follows_the_umask(tmp_path: Path, umask: None, mask: int, mode: int) -> None:
    os.umask(mask)
    out = write_text(tmp_path / "m.csv", "a,b\n")
    assert stat.S_IMODE(out.stat().st_mode) == mode  # not always 0600 as with tempfile.mkstemp


def test_writes_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    assert write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    write_text(target, "é\r\n", encoding="latin-1")
    assert target.read_bytes() == b"\xe9\r\n"  # the given encoding, newlines untranslated
    assert os.listdir(target.parent) == ["out.bin"]


def test_nothing_is_left_behind_when_the_callback_raises(tmp_path: Path) -> None:
    def crash(handle: IO[bytes]) -> None:
        handle.write(b"half of it")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(tmp_path / "new.txt", crash)
    assert os.listdir(tmp_path) == []


def test_the_old_file_stays_intact_when_a_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_text(tmp_path / "report.txt", "old")

    def crash(handle: IO[bytes]) -> None:
        handle.write(b"half of the new cont")
        raise KeyboardInterrupt  # not only Exceptions: a Ctrl-C mid-write too

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"

    def no_rename(src: str, dst: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", no_rename)  # fails after the content is complete
    with pytest.raises(OSError, match="cross-device"):
        write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.txt"]


def test_the_content_is_complete_when_the_target_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.txt"
    seen: list[bytes] = []
    real_replace = os.replace

    def checking_replace(src: str, dst: str) -> None:
        assert not target.exists()  # the target does not exist while the content is being written
        seen.append(Path(src).read_bytes())
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    write_bytes(target, b"x" * 100_000)
    assert seen == [b"x" * 100_000] and target.read_bytes() == b"x" * 100_000


def test_no_loupe_imports() -> None:
    """The bottom layer: everything may import it, it imports nothing of loupe."""
    import loupe.atomic

    tree = ast.parse(Path(loupe.atomic.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] == "loupe"], imported
