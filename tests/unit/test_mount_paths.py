"""Paths by identity: how a kubelet path is matched with the mount table (no root needed).

The kernel lists mountpoints resolved; kubelet's directory may sit behind
a symlink. `canonical` resolves the parent directories and never the last
component, so a symlink named as a target is the link, not where it points.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera.errors import InvalidArgument
from tessera.system import mounts


@pytest.fixture
def kubelet(tmp_path: Path) -> tuple[Path, Path]:
    """(real directory, symlink to it), as a distribution with a symlinked kubelet dir has."""
    real = tmp_path.resolve() / "real"
    real.mkdir()
    link = tmp_path / "kubelet"
    link.symlink_to(real, target_is_directory=True)
    return real, link


def test_a_path_under_a_symlinked_directory_is_spelled_as_the_mount_table_does(
    kubelet: tuple[Path, Path],
) -> None:
    real, link = kubelet
    (real / "staging").mkdir()
    assert mounts.canonical(str(link / "staging")) == str(real / "staging")


def test_doubled_and_trailing_slashes_do_not_make_another_path(kubelet: tuple[Path, Path]) -> None:
    real, link = kubelet
    assert mounts.canonical(f"{link}//pods///target/") == str(real / "pods" / "target")


def test_a_path_whose_directories_do_not_exist_yet_is_resolved_as_far_as_they_exist(
    kubelet: tuple[Path, Path],
) -> None:
    real, link = kubelet
    assert mounts.canonical(str(link / "a" / "b" / "c")) == str(real / "a" / "b" / "c")


def test_a_symlink_named_as_the_path_itself_is_never_followed(kubelet: tuple[Path, Path]) -> None:
    real, link = kubelet
    (real / "sneaky").symlink_to("/etc", target_is_directory=True)
    assert mounts.canonical(str(link / "sneaky")) == str(real / "sneaky")


def test_mounting_through_a_symlink_is_refused_naming_the_field(
    kubelet: tuple[Path, Path],
) -> None:
    real, link = kubelet
    (real / "sneaky").symlink_to("/etc", target_is_directory=True)
    with pytest.raises(InvalidArgument) as err:
        mounts.mount_point(str(link / "sneaky"), "target_path")
    assert err.value.field == "target_path"
    assert "symlink" in err.value.message and "/etc" in err.value.message


def test_a_mount_is_found_through_a_symlinked_parent(tmp_path: Path) -> None:
    # /proc is mounted on every Linux machine; reach it through a symlink to /
    (tmp_path / "root").symlink_to("/", target_is_directory=True)
    assert mounts.is_mount(str(tmp_path / "root" / "proc"))
    assert mounts.mounts_at(f"{tmp_path}/root//proc/")[-1].fs_type == "proc"


def test_a_symlink_to_a_mount_is_not_that_mount(tmp_path: Path) -> None:
    (tmp_path / "looks-like-proc").symlink_to("/proc", target_is_directory=True)
    assert not mounts.is_mount(str(tmp_path / "looks-like-proc"))
    assert os.path.ismount("/proc")
