"""infctx.fileio: the one atomic writer that checkpoints, benchmark results and the `last` pointer go through."""

import pytest

from infctx.fileio import write_atomic, write_text_atomic


def test_write_text_atomic_creates_folders_and_replaces_whole_files(tmp_path):
    path = tmp_path / "results" / "kernels.md"
    assert write_text_atomic(path, "first ünïcode\n") == path
    write_text_atomic(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["kernels.md"]  # no temporary file left behind


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "train.json"
    write_text_atomic(path, '{"ok": 1}\n')

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"ha')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == '{"ok": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]


def test_files_get_the_mode_a_plain_write_gives(tmp_path):
    """Not a temporary file's private 0600: results and checkpoints stay readable as the umask allows."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert write_text_atomic(tmp_path / "atomic.txt", "x").stat().st_mode == plain.stat().st_mode
