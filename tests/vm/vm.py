"""Boot the test VM (tests/vm/image.py) and run one command in it.

The guest sees the project directory, and the Python prefix behind
.venv/bin/python3, read-only over virtio-9p at the host's own absolute
paths, so `.venv/bin/python -m pytest ...` runs unchanged inside; a
writable 9p share (`results`) carries the command (command.json) in and
its exit status, timings and any files the command writes (junit xml)
out.  The root disk is the cached ext4 image opened with snapshot=on: every
run starts from the same pristine disk and leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.vm import image as vm_image

REPO = vm_image.REPO
QEMU = "qemu-system-x86_64"
MEMORY = "3G"
CPUS = "2"
#: exit codes of a run that produced no status of its own (timeout's convention)
TIMED_OUT = 124
NO_STATUS = 125
CONSOLE_TAIL = 40


@dataclass(frozen=True)
class VmRun:
    """How a command run in the VM ended."""

    exit_code: int
    seconds: float  # qemu start to qemu exit
    guest_setup_seconds: float | None  # guest init start to the command's start
    timed_out: bool
    accel: str
    kernel: str
    console_tail: str  # the last lines of the kernel console (why a VM ended early)


def skip_reason() -> str | None:
    """Why the VM cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root: builds the VM image with debootstrap and chroot"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt package qemu-system-x86)"
    if shutil.which("debootstrap") is None and vm_image.cached() is None:
        return "debootstrap is not installed and no VM image is cached"
    return None


def accel() -> str:
    """tcg unless TESSERA_VM_ACCEL says otherwise.

    Not kvm by default even where /dev/kvm opens: in this sandbox (nested)
    it opens but the guest dies on its first MSR write or hangs; set
    TESSERA_VM_ACCEL=kvm on a machine where KVM really works (much faster).
    """
    return os.environ.get("TESSERA_VM_ACCEL", "tcg")


def interpreter_prefix() -> Path | None:
    """The prefix the project's venv interpreter lives in, when the guest needs it shared.

    A Debian python3 (prefix /usr) is not shared: the guest has the same
    bookworm package at the same path, and sharing /usr would hide the guest's own.
    """
    real = (REPO / ".venv" / "bin" / "python3").resolve()
    prefix = real.parent.parent
    if prefix == Path("/usr") or prefix.is_relative_to("/usr/lib"):
        return None
    return prefix


def qemu_args(img: vm_image.Image, results: Path, how: str) -> list[str]:
    shares = [("project", REPO), ("results", results)]
    if (prefix := interpreter_prefix()) is not None and not prefix.is_relative_to(REPO):
        shares.append(("prefix", prefix))
    append = [
        "console=ttyS1", "loglevel=4", "panic=-1", "random.trust_cpu=on",
        f"tessera_vm.shares={','.join(f'{tag}:{path}' for tag, path in shares)}",
        f"tessera_vm.results={results}",
    ]  # fmt: skip
    args = [
        # one host thread per vCPU (multi-threaded TCG), else both vCPUs share one
        QEMU, "-accel", "tcg,thread=multi" if how == "tcg" else how,
        "-cpu", "host" if how == "kvm" else "max",
        "-m", MEMORY, "-smp", CPUS, "-nic", "none", "-display", "none", "-vga", "none",
        "-monitor", "none", "-no-reboot",
        # ttyS0: the command's output; ttyS1: the kernel console and the init's log
        "-serial", "stdio", "-serial", f"file:{results / 'console.log'}",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", " ".join(append),
        "-drive", f"file={img.root},format=raw,if=virtio,snapshot=on",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    for tag, path in shares:
        ro = ",readonly=on" if tag != "results" else ""
        args += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none{ro}"]
    return args


def _die_with_parent() -> None:
    """In qemu before exec: killed with us, however we die (a SIGTERM'd runner, a
    killed pytest), so no VM outlives the run that started it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run(
    argv: list[str],
    *,
    timeout: float,
    results: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    output: IO[bytes] | None = None,
) -> VmRun:
    """Boot the VM, run `argv` as root in `cwd`, stream the console to `output`."""
    img = vm_image.ensure()
    own_results = results is None
    results = Path(tempfile.mkdtemp(prefix="tessera-vm-")) if results is None else results
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("exit-code", "guest-setup-seconds"):
        (results / stale).unlink(missing_ok=True)
    command = {"argv": argv, "cwd": str(cwd), "env": env or {}}
    (results / "command.json").write_text(json.dumps(command))
    how = accel()
    started = time.monotonic()
    out = output if output is not None else sys.stdout.buffer
    args = qemu_args(img, results, how)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, preexec_fn=_die_with_parent)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    took = round(time.monotonic() - started, 2)
    try:
        status = results / "exit-code"
        missing = TIMED_OUT if timed_out else NO_STATUS
        code = int(status.read_text()) if status.exists() else missing
        setup = results / "guest-setup-seconds"
        setup_s = float(setup.read_text()) if setup.exists() else None
        console = results / "console.log"
        lines = console.read_text(errors="replace").splitlines() if console.exists() else []
        tail = "\n".join(lines[-CONSOLE_TAIL:])
    finally:
        if own_results:
            shutil.rmtree(results, ignore_errors=True)
    return VmRun(code, took, setup_s, timed_out, how, img.kernel.name, tail)
