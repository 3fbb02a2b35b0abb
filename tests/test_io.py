import pytest

from iga.errors import DataError
from iga.io import read_jsonl, write_jsonl


def test_write_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(TypeError):
        write_jsonl(path, [{"a": 2}, {"b": object()}])  # fails half-way through serialising
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind


def test_read_errors_name_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path}:3: expected a JSON object"):
        read_jsonl(path)


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temporary files are private (0600); a published output is readable as open() would make it."""
    import os

    from iga.io import atomic_dir

    umask = os.umask(0)
    os.umask(umask)
    write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w").write_text("x")
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
