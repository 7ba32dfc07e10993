"""The access-mode matrix of ARCHITECTURE.md, written once for every process.

| CSI mode                                        | block                  | filesystem         |
|-------------------------------------------------|------------------------|--------------------|
| SINGLE_NODE_WRITER / SINGLE_NODE_MULTI_WRITER   | yes                    | yes                |
| SINGLE_NODE_SINGLE_WRITER (RWOP)                | one publish only       | one publish only   |
| SINGLE_NODE_READER_ONLY, MULTI_NODE_READER_ONLY | read-only everywhere   | mounted read-only  |
| MULTI_NODE_SINGLE_WRITER                        | one writer node, others read-only | refused |
| MULTI_NODE_MULTI_WRITER                         | yes (apps coordinate)  | refused            |

The CSI plugin checks capabilities against it, management enforces it
across nodes; both import these sets so the two can never disagree.
"""

from __future__ import annotations

from tessera.models import AccessMode

READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})

SINGLE_NODE_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)

#: Modes where writers on one node and readers (or writers) on others share one
#: device. ext4 and xfs cache metadata per mount: a read-only mount beside a
#: writer on another node reads torn metadata, and two writers corrupt it.
_NOT_FOR_FILESYSTEMS = {
    AccessMode.MULTI_NODE_SINGLE_WRITER: (
        "a read-only ext4/xfs mount beside a writer on another node reads torn metadata"
    ),
    AccessMode.MULTI_NODE_MULTI_WRITER: (
        "ext4/xfs is not a cluster filesystem and would be corrupted by writers on several nodes"
    ),
}


def filesystem_refusal(mode: AccessMode) -> str | None:
    """Why a filesystem volume cannot be offered in this mode, or None when it can."""
    return _NOT_FOR_FILESYSTEMS.get(mode)
