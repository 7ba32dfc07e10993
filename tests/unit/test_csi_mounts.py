"""Reading the kernel's mount table, and the node's path rules (no root needed)."""

from __future__ import annotations

import pytest

from csi_driver.validation import path_form
from tessera.errors import Internal, InvalidArgument
from tessera.system import syscalls as linux
from tessera.system.mounts import parse_mountinfo
from tessera.system.syscalls import (
    MS_DIRSYNC,
    MS_LAZYTIME,
    MS_MANDLOCK,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_SILENT,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    parse_mount_options,
    split_options,
)

MOUNTINFO = (
    "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 7:3 / /var/lib/kubelet/staging\\040dir rw,noatime shared:9 - ext4 /dev/loop3 rw\n"
    "41 22 7:3 / /pods/p1/volumes/data ro,relatime shared:9 - ext4 /dev/loop3 rw\n"
    "42 22 0:5 /loop4 /pods/p2/dev/block rw,nosuid shared:2 - devtmpfs udev rw,size=10k\n"
)


def test_paths_with_spaces_are_read_back_exactly() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[1].mountpoint == "/var/lib/kubelet/staging dir"
    assert mounts[1].source == "/dev/loop3"


def test_read_only_bind_mounts_are_recognised() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[2].readonly and not mounts[1].readonly


def test_a_block_device_bind_mount_shows_the_device_node_as_root() -> None:
    block = parse_mountinfo(MOUNTINFO)[3]
    assert (block.fs_type, block.root, block.device) == ("devtmpfs", "/loop4", "0:5")


@pytest.mark.parametrize("value", ["", "relative/path", "/var/lib/../../etc", "/a/../b"])
def test_kubelet_paths_must_be_absolute_and_free_of_dotdot(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        path_form(value, "target_path")
    assert "target_path" in err.value.message


def test_a_normal_kubelet_path_is_accepted() -> None:
    assert path_form("/var/lib/kubelet/pods/x/volumes/y/", "target_path") == (
        "/var/lib/kubelet/pods/x/volumes/y"
    )


# ---- mount(8)-style options -> mount(2) flags and data ------------------------------


def test_no_options_mount_with_the_kernel_defaults() -> None:
    assert parse_mount_options([]) == (0, "")
    assert parse_mount_options(["defaults"]) == (0, "")


@pytest.mark.parametrize(
    ("option", "bit"),
    [
        ("ro", MS_RDONLY),
        ("nosuid", MS_NOSUID),
        ("nodev", MS_NODEV),
        ("noexec", MS_NOEXEC),
        ("sync", MS_SYNCHRONOUS),
        ("dirsync", MS_DIRSYNC),
        ("noatime", MS_NOATIME),
        ("nodiratime", MS_NODIRATIME),
        ("relatime", MS_RELATIME),
        ("strictatime", MS_STRICTATIME),
        ("lazytime", MS_LAZYTIME),
        ("mand", MS_MANDLOCK),
        ("silent", MS_SILENT),
    ],
)
def test_flag_options_become_mount_flags_not_filesystem_data(option: str, bit: int) -> None:
    assert parse_mount_options([option]) == (bit, "")


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        (["ro", "rw"], 0),
        (["rw", "ro"], MS_RDONLY),
        (["nosuid", "suid"], 0),
        (["nodev", "dev"], 0),
        (["noexec", "exec"], 0),
        (["sync", "async"], 0),
        (["noatime", "atime"], 0),
        (["nodiratime", "diratime"], 0),
        (["relatime", "norelatime"], 0),
        (["strictatime", "nostrictatime"], 0),
        (["lazytime", "nolazytime"], 0),
        (["mand", "nomand"], 0),
        (["silent", "loud"], 0),
    ],
)
def test_the_last_of_two_opposite_options_wins_as_with_mount8(
    options: list[str], flags: int
) -> None:
    assert parse_mount_options(options) == (flags, "")


def test_filesystem_options_are_passed_to_the_filesystem_in_order() -> None:
    flags, data = parse_mount_options(["noatime", "discard", "ro", "data=ordered", "nouuid"])
    assert flags == MS_NOATIME | MS_RDONLY
    assert data == "discard,data=ordered,nouuid"


def test_comma_separated_flags_from_a_storage_class_are_split() -> None:
    assert parse_mount_options(["noatime,discard", "nodev"]) == (MS_NOATIME | MS_NODEV, "discard")


def test_a_quoted_selinux_context_keeps_its_commas() -> None:
    context = 'context="system_u:object_r:container_file_t:s0:c1,c2"'
    assert split_options([f"noatime,{context}"]) == ["noatime", context]
    assert parse_mount_options([context, "ro"]) == (MS_RDONLY, context)


def test_options_mount8_keeps_to_itself_are_not_sent_to_the_kernel() -> None:
    options = ["defaults", "nofail", "_netdev", "noauto", "x-kubelet.tag=1", "comment=x", "ro"]
    assert parse_mount_options(options) == (MS_RDONLY, "")


def test_empty_options_are_ignored() -> None:
    assert parse_mount_options(["", "noatime,", " "]) == (MS_NOATIME, "")


@pytest.mark.parametrize("option", ["bind", "rbind", "remount", "shared", "rprivate", "loop"])
def test_options_that_need_another_mount_operation_are_refused_by_name(option: str) -> None:
    with pytest.raises(ValueError, match=option):
        parse_mount_options(["noatime", option])


def test_a_missing_system_library_is_an_internal_error_naming_it() -> None:
    with pytest.raises(Internal, match="libtessera-missing.so.1"):
        linux._load("libtessera-missing.so.1", lambda lib: None)
