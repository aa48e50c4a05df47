"""The table of attachments (/etc/nbdloop/attachments; nbdloop.kernel.table)
and the commands that read it, on the host: parsing, adding and removing
lines, and what attach --all, --from-table and detach --forget say about
bad lines.  Attaching for real (attach --all, --persist, the systemd unit's
commands) runs in the one-kernel VM (tests/e2e/guest/attach.sh)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import create_image, require_root, run_cli
from nbdloop.kernel import table


def table_env(tmp_path: Path) -> dict[str, str]:
    """For ``run_cli``: an attachments table and a runtime directory of the
    test's own."""
    return {"NBDLOOP_ATTACHMENTS": str(tmp_path / "attachments"),
            "NBDLOOP_RUNTIME_DIR": str(tmp_path / "rt")}


def test_lines_are_read_as_a_shell_would(tmp_path):
    path = tmp_path / "attachments"
    path.write_text("# a comment\n"
                    "\n"
                    "/srv/a.img mode=buffered,connections=2,partscan   # trailing comment\n"
                    "'/srv/my disk.img' offset=1M,sizelimit=512M\n"
                    "/srv/plain.img\n"
                    "/srv/dash.img -\n")
    entries = table.read(path)
    assert [(e.image, e.options, e.line) for e in entries] == [
        ("/srv/a.img", ("mode=buffered", "connections=2", "partscan"), 3),
        ("/srv/my disk.img", ("offset=1M", "sizelimit=512M"), 4),
        ("/srv/plain.img", (), 5),
        ("/srv/dash.img", (), 6)]
    assert entries[0].args() == ["/srv/a.img", "--mode", "buffered", "--connections", "2",
                                 "--partscan"]
    assert table.read(tmp_path / "none") == []


@pytest.mark.parametrize("line,phrase", [
    ("/a.img mode=direct extra", "expected IMAGE [OPTIONS], found 3 fields"),
    ("'/a.img mode=direct", "No closing quotation"),
    ("/a.img --mode=direct", "'--mode=direct' is not an option"),
    ("/a.img mode=direct,,partscan", "'' is not an option"),
])
def test_bad_lines_are_named(tmp_path, line, phrase):
    path = tmp_path / "attachments"
    path.write_text("# ok\n/ok.img\n" + line + "\n")
    with pytest.raises(table.TableError) as e:
        table.read(path)
    assert str(e.value).startswith(f"{path}:3: ") and phrase in str(e.value)


def test_put_and_remove_keep_the_other_lines(tmp_path):
    path = tmp_path / "etc" / "attachments"
    image = tmp_path / "a.img"
    table.put(path, str(image), ["mode=buffered"])
    text = path.read_text()
    assert text.startswith("# ") and text.endswith(f"{image} mode=buffered\n")
    with open(path, "a") as f:
        f.write("# mine\n/other.img partscan\n")
    table.put(path, str(tmp_path / "." / "a.img"), ["partscan", "offset=1048576"])
    lines = path.read_text().splitlines()
    assert lines[2:] == [f"{image} partscan,offset=1048576", "# mine", "/other.img partscan"]
    assert table.remove(path, str(image)) is True
    assert table.remove(path, str(image)) is False
    assert path.read_text().splitlines()[2:] == ["# mine", "/other.img partscan"]
    spaced = tmp_path / "my disk.img"
    table.put(path, str(spaced), [])
    assert table.find(table.read(path), str(spaced)).image == str(spaced)


def test_a_table_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(table.TableError, match=f"^{blocker}/attachments: Not a directory$"):
        table.put(blocker / "attachments", "/a.img", [])
    require_root()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "none", str(readonly)], check=True)
    try:
        with pytest.raises(table.TableError, match="attachments: cannot write it: Read-only"):
            table.put(readonly / "attachments", "/a.img", [])
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


def test_attach_all_says_which_line_is_wrong(tmp_path):
    (tmp_path / "attachments").write_text(f"{tmp_path}/a.img mode=sideways\n"
                                          f"{tmp_path}/b.img colour=blue\n"
                                          f"{tmp_path}/c.img from-table\n")
    p = run_cli("attach", "--all", env=table_env(tmp_path))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 3, p.stderr
    assert f"{tmp_path}/a.img: " in lines[0] and ":1: " in lines[0] and "sideways" in lines[0]
    assert f"{tmp_path}/b.img: " in lines[1] and ":2: " in lines[1] and "--colour" in lines[1]
    assert ":3: from-table is attach's own option" in lines[2]
    assert "Traceback" not in p.stderr


def test_attach_all_goes_on_after_a_failure(tmp_path):
    """Each line is attached on its own: here the first image is missing (2)
    and the host has no NBD driver for the second (1): both say so, in one
    line each, and the exit status is the worst."""
    image = tmp_path / "b.img"
    create_image(image, "16M")
    (tmp_path / "attachments").write_text(f"{tmp_path}/missing.img\n{image} mode=buffered\n")
    p = run_cli("attach", "--all", env=table_env(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 2 and "missing.img: " in lines[0] and "no such file" in lines[0], lines
    if not list(Path("/sys/block").glob("nbd*")):
        assert "attach needs the kernel NBD client" in lines[1], lines
        assert p.returncode == 2
    assert p.stdout == ""


@pytest.mark.parametrize("args,phrase", [
    (["attach", "--all", "x.img"], "--all takes no IMAGE"),
    (["attach", "--all", "--mode", "buffered"], "--all takes no IMAGE and no other option"),
    (["attach"], "Missing argument 'IMAGE' (or give --all)"),
    (["attach", "--from-table", "/nowhere.img"], "/nowhere.img: not in "),
    (["attach", "--from-table", "/x.img", "--mode", "buffered"], "takes its options from"),
    (["detach"], "Missing argument 'DEVICE|IMAGE' (or give --all)"),
    (["detach", "--all", "--forget"], "--all takes no DEVICE|IMAGE and no --forget"),
    (["detach", "--forget", "/nowhere.img"], "/nowhere.img: not attached"),
])
def test_table_commands_refuse_bad_usage_in_one_line(tmp_path, args, phrase):
    p = run_cli(*args, env=table_env(tmp_path))
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], p.stderr


def test_detach_forget_of_an_image_that_is_not_attached(tmp_path):
    path = tmp_path / "attachments"
    table.put(path, "/srv/gone.img", ["partscan"])
    p = run_cli("detach", "--forget", "/srv/gone.img", env=table_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "was not attached; removed from" in p.stderr
    assert table.read(path) == []


def test_detach_all_with_nothing_attached(tmp_path):
    table.put(tmp_path / "attachments", "/srv/a.img", [])
    p = run_cli("detach", "--all", env=table_env(tmp_path))
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
