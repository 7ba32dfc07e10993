"""What a pod on one node does with a published volume, run inside that node's
network namespace: `python -m tests.multihost.blockio COMMAND ...`.

Every command prints one line (a sha256, `ok`, or `errno N`) so the test on
the host reads the answer from stdout. Reads that must see another node's
writes use O_DIRECT, so this node's page cache cannot answer for the volume.

    write DEV OFFSET SIZE SEED     pwrite seeded random bytes + fsync; prints sha256
    read DEV OFFSET SIZE           O_DIRECT read; prints sha256
    trywrite DEV OFFSET            one 4 KiB pwrite + fsync; prints ok or errno N
    writer DEV LOG BLOCKS          forever: block i (i mod BLOCKS), fsync, then log i
    verify DEV LOG BLOCKS          every logged block holds its pattern (O_DIRECT); prints ok
    size DEV                       the device's size in bytes
    fwrite DIR NAME SIZE SEED      a file, fsync'd (file and directory); prints sha256
    fread DIR NAME                 prints the file's sha256
    tryfwrite DIR                  create a file; prints ok or errno N
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import sys

BLOCK = 4096


def seeded(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def pattern(index: int) -> bytes:
    """Block `index`'s content: tells blocks apart and is recomputable from the log."""
    stamp = f"tessera-multihost-block-{index:010d}\n".encode()
    return (stamp * (BLOCK // len(stamp) + 1))[:BLOCK]


def pwrite_fsync(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(dev: str, offset: int, size: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        got = os.preadv(fd, [buf], offset)
        return bytes(buf[:got])
    finally:
        os.close(fd)


def writer(dev: str, log: str, blocks: int) -> int:
    """Write and fsync block after block; a line in the log means that fsync returned."""
    fd = os.open(dev, os.O_WRONLY)
    with open(log, "a", buffering=1) as out:
        i = 0
        while True:
            try:
                os.pwrite(fd, pattern(i % blocks), (i % blocks) * BLOCK)
                os.fsync(fd)
            except OSError as exc:
                out.write(f"errno {exc.errno}\n")
                return 1
            out.write(f"{i % blocks}\n")
            i += 1


def logged_blocks(log: str) -> set[int]:
    with open(log) as f:
        return {int(line) for line in f if line.strip().isdigit()}


def verify(dev: str, log: str, blocks: int) -> str:
    for index in sorted(logged_blocks(log)):
        if index < blocks and read_direct(dev, index * BLOCK, BLOCK) != pattern(index):
            return f"block {index} lost its fsync'd content"
    return "ok"


def try_write(dev: str, offset: int) -> str:
    try:
        pwrite_fsync(dev, offset, b"fenced-node-write!" * 227 + b"\0" * 10)
    except OSError as exc:
        return f"errno {exc.errno}"
    return "ok"


def file_write(directory: str, name: str, size: int, seed: int) -> str:
    data = seeded(size, seed)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return hashlib.sha256(data).hexdigest()


def try_file_write(directory: str) -> str:
    try:
        with open(os.path.join(directory, "must-not-exist"), "wb") as f:
            f.write(b"x")
    except OSError as exc:
        return f"errno {exc.errno}"
    return "ok"


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "writer":
        return writer(args[0], args[1], int(args[2]))
    if cmd == "write":
        data = seeded(int(args[2]), int(args[3]))
        pwrite_fsync(args[0], int(args[1]), data)
        answer = hashlib.sha256(data).hexdigest()
    elif cmd == "read":
        answer = hashlib.sha256(read_direct(args[0], int(args[1]), int(args[2]))).hexdigest()
    elif cmd == "trywrite":
        answer = try_write(args[0], int(args[1]))
    elif cmd == "verify":
        answer = verify(args[0], args[1], int(args[2]))
    elif cmd == "size":
        fd = os.open(args[0], os.O_RDONLY)
        try:
            answer = str(os.lseek(fd, 0, os.SEEK_END))
        finally:
            os.close(fd)
    elif cmd == "fwrite":
        answer = file_write(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "fread":
        with open(os.path.join(args[0], args[1]), "rb") as f:
            answer = hashlib.sha256(f.read()).hexdigest()
    elif cmd == "tryfwrite":
        answer = try_file_write(args[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
