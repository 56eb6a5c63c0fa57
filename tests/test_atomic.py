import pytest

from segmerge.atomic import atomic_destination, write_text_atomic


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    dest = tmp_path / "sub" / "result.json"
    write_text_atomic(dest, "old")
    with pytest.raises(RuntimeError), atomic_destination(dest) as tmp:
        with open(tmp, "w") as f:
            f.write("half-writ")
        raise RuntimeError("killed mid-write")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["result.json"]


def test_suffix_is_kept_for_writers_that_read_the_extension(tmp_path):
    with atomic_destination(tmp_path / "x.nii.gz", suffix=".tmp.nii.gz") as tmp:
        assert tmp.endswith(".tmp.nii.gz")
        open(tmp, "wb").close()
    assert (tmp_path / "x.nii.gz").exists()
