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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_mode_plain_open_gives_them(tmp_path, umask):
    """Issue 16 #15: mkstemp's 0600 must not leak into what is published."""
    import os
    import stat

    from segmerge.atomic import write_bytes_atomic

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        write_bytes_atomic(tmp_path / "atomic.txt", b"x")
        with atomic_destination(tmp_path / "x.nii.gz", suffix=".tmp.nii.gz") as tmp:
            open(tmp, "wb").close()
    finally:
        os.umask(old)

    def mode(name):
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("atomic.txt") == mode("plain.txt") == 0o666 & ~umask
    assert mode("x.nii.gz") == 0o666 & ~umask
    # replacing an existing file keeps its mode, as open(path, "w") does
    os.chmod(tmp_path / "atomic.txt", 0o640)
    write_bytes_atomic(tmp_path / "atomic.txt", b"y")
    assert mode("atomic.txt") == 0o640


@pytest.mark.parametrize(
    "name", ["../victim.json", "a/b.json", "..", "", "x\x00.json", "x\n.json", "/etc/passwd"]
)
def test_inside_refuses_names_that_leave_the_folder(tmp_path, name):
    from segmerge.atomic import inside

    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path / "out", name)


def test_inside_refuses_a_symlink_out_of_the_folder(tmp_path):
    from segmerge.atomic import inside

    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    assert inside(out, "case.nii.gz") == out / "case.nii.gz"
    with pytest.raises(ValueError, match="outside"):
        inside(out, "link", "case.nii.gz")
