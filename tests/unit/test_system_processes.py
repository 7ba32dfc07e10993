"""tessera.system.processes against the real /proc of this machine."""

from __future__ import annotations

import os
import socket
import struct
import time

from tessera.system import processes


def test_a_connection_the_peer_reset_no_longer_counts_though_its_fd_is_open() -> None:
    """What the kernel nbd client's bridge looks like once its owner died."""
    before = processes.established_tcp(os.getpid())
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
        try:
            assert processes.established_tcp(os.getpid()) == before + 2  # both ends are ours
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # linger 0: a reset, as a dead owner's kernel answers
            deadline = time.monotonic() + 5
            while processes.established_tcp(os.getpid()) != before:
                assert time.monotonic() < deadline, "the reset connection still counts"
                time.sleep(0.01)
            assert ours.fileno() >= 0  # its fd is still open: only its state changed
        finally:
            ours.close()


def test_a_process_that_is_gone_has_no_connection() -> None:
    assert processes.established_tcp(2**22 + 12345) == 0
