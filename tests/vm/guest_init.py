#!/usr/bin/python3
"""PID 1 of the tessera test VM (installed as /sbin/tessera-vm-init).

No systemd, no login: set up the kernel interfaces the stack needs (proc,
sys, configfs for nvmet, devpts, tmpfs /tmp and /run, udevd for /dev/md/*
and nvme device nodes), mount the host's 9p shares at the host's own paths,
run the one command the host asked for (results/command.json), write its
exit status to results/exit-code, and reboot (qemu runs with -no-reboot, so
that ends the VM).  Runs on the guest's Debian python3 (stdlib only).
"""

import ctypes
import json
import os
import socket
import subprocess
import termios
import time

RB_AUTOBOOT = 0x01234567
BASE_MOUNTS = [
    ("proc", "/proc", "proc", "nosuid,nodev,noexec"),
    ("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec"),
    ("configfs", "/sys/kernel/config", "configfs", ""),
    ("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
    ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
    ("tmpfs", "/run", "tmpfs", "mode=755"),
    ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
]
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONDONTWRITEBYTECODE": "1",  # the project share is read-only
    "PYTHONUNBUFFERED": "1",
    "TESSERA_VM": "1",
    # pytest's plugin entry points (schemathesis, hypothesis, anyio) cost ~2 min
    # of imports under TCG and no guest test uses them; `-p NAME` brings one back
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
}


def sh(*args: str) -> int:
    return subprocess.run(list(args)).returncode


def mount(source: str, target: str, fstype: str, options: str) -> None:
    if not os.path.isdir(target):
        os.makedirs(target)
    sh("mount", "-t", fstype, *(["-o", options] if options else []), source, target)


def params() -> dict[str, str]:
    """tessera_vm.NAME=VALUE words of the kernel command line."""
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return {
        k.removeprefix("tessera_vm."): v
        for k, _, v in (w.partition("=") for w in words)
        if k.startswith("tessera_vm.")
    }


def command_output() -> int:
    """ttyS0, the host's stdout, raw: the command's bytes and nothing else.

    The kernel's console (and this init's own log) is ttyS1, which the host
    keeps in results/console.log; no \\n -> \\r\\n translation on ttyS0.
    """
    fd = os.open("/dev/ttyS0", os.O_RDWR | os.O_NOCTTY)
    try:
        attrs = termios.tcgetattr(fd)
        attrs[1] &= ~termios.OPOST
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error:
        pass
    return fd


def step(what: str) -> None:
    print(f"tessera-vm-init [{time.monotonic():7.2f}]: {what}", flush=True)


def setup() -> dict[str, str]:
    mount("proc", "/proc", "proc", "nosuid,nodev,noexec")
    sh("mount", "-o", "remount,rw", "/")  # writes land in qemu's snapshot overlay
    mount(*BASE_MOUNTS[1])
    # configfs (nvmet's interface) and loop (the stack's pools) are modules
    # that nothing here would autoload: /sys/kernel/config and /dev/loop-control
    # exist only once they are in
    sh("modprobe", "-a", "configfs", "loop")
    for source, target, fstype, options in BASE_MOUNTS[2:]:
        mount(source, target, fstype, options)
    sh("hostname", "tessera-vm")
    sh("ip", "link", "set", "lo", "up")
    warm_up_tcp()
    p = params()
    sh("modprobe", "-a", "9pnet_virtio", "9p")
    # shares: tag:path,... ; read-only ones get the page cache (the host's
    # files do not change under a run), the results share none
    for share in filter(None, p.get("shares", "").split(",")):
        tag, _, path = share.partition(":")
        ro = tag != "results"
        cache = "ro,cache=loose" if ro else "cache=none"
        opts = f"trans=virtio,version=9p2000.L,msize=262144,{cache}"
        mount(tag, path, "9p", opts)
    step("shares mounted")
    os.makedirs("/run/udev", exist_ok=True)
    sh("/lib/systemd/systemd-udevd", "--daemon")
    # only block devices replayed (their /dev/disk links): replaying every
    # device costs ~8 s of module loading under TCG for nothing the tests use;
    # what the tests create (loop, md, dm, nvme) sends its own events
    sh("udevadm", "trigger", "--action=add", "--subsystem-match=block")
    sh("udevadm", "settle", "--timeout=30")
    step("udev settled")
    return p


def warm_up_tcp() -> None:
    """Make the kernel's first TCP connection now, while nothing else runs.

    The first connection flips once-only static keys (live code patching
    through int3). Under multi-threaded TCG that raced once with the other
    vCPU in the middle of the suite ("Oops: int3 in
    secure_tcp_seq_and_ts_off", a kernel panic); patched at boot, it cannot.
    """
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()):
            server.accept()[0].close()


def main() -> None:
    """Whatever happens, end the VM: a PID 1 that exits panics the kernel."""
    try:
        run_command()
    except BaseException as e:  # noqa: BLE001 - reported on the console, then the VM ends
        print(f"tessera-vm-init: {type(e).__name__}: {e}", flush=True)
    os.sync()
    ctypes.CDLL(None, use_errno=True).reboot(RB_AUTOBOOT)


def run_command() -> None:
    started = time.monotonic()
    step("started")
    p = setup()
    out = command_output()
    results = p["results"]
    with open(os.path.join(results, "command.json")) as f:
        command = json.load(f)
    env = {**ENV, **command.get("env", {}), "TESSERA_VM_RESULTS": results}
    ready = round(time.monotonic() - started, 2)
    with open(os.path.join(results, "guest-setup-seconds"), "w") as f:
        f.write(f"{ready}\n")
    try:
        io = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": out}
        code = subprocess.run(command["argv"], cwd=command["cwd"], env=env, **io).returncode
    except OSError as e:
        os.write(out, f"tessera-vm-init: cannot run {command['argv']!r}: {e}\n".encode())
        code = 127
    step(f"command exited {code}")
    with open(os.path.join(results, "exit-code"), "w") as f:
        f.write(f"{code}\n")
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
