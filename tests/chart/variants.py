"""The value sets the chart is rendered with in CI: each is a way admins install it."""

from __future__ import annotations

from typing import Any

MICROK8S_KUBELET = "/var/snap/microk8s/common/var/lib/kubelet"

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "microk8s-kubelet-dir": {"kubeletDir": MICROK8S_KUBELET},
    # with a NetworkPolicy that lets only the nodes and the controller in
    "postgresql": {
        "management": {
            "database": {
                "type": "postgresql",
                "postgresql": {"existingSecret": "tessera-db", "key": "url"},
            }
        },
        "networkPolicy": {"enabled": True, "nodeCIDRs": ["192.168.0.0/24", "fd00::/64"]},
    },
    "sqlite-hostpath": {
        "management": {
            "database": {
                "type": "sqlite",
                "sqlite": {
                    "storage": "hostPath",
                    "hostPath": {
                        "path": "/var/lib/tessera-management",
                        "nodeSelector": {"kubernetes.io/hostname": "node-1"},
                    },
                },
            }
        }
    },
    "snapshots-on": {"snapshots": {"enabled": True, "groupSnapshots": True}},
    "snapshots-off": {"snapshots": {"enabled": False}},
    "nvme-pools": {
        "node": {
            "pools": [
                {"name": "nvme0", "path": "/mnt/nvme0/tessera"},
                {"name": "nvme1", "path": "/mnt/nvme1/tessera"},
            ],
            "filePool": {"enabled": False, "name": "file", "size": "20G"},
        }
    },
    "file-pool-only": {
        "node": {"pools": [], "filePool": {"enabled": True, "name": "lab", "size": "8GiB"}}
    },
    "several-vpgs": {
        "storageClasses": [
            {
                "name": "tessera-ext4",
                "vpg": "default",
                "layout": "concat",
                "fstype": "ext4",
                "locality": "preferred",
                "isDefault": True,
            },
            {
                "name": "tessera-xfs-local",
                "vpg": "fast",
                "layout": "concat",
                "fstype": "xfs",
                "locality": "required",
                "mkfsOptions": "-m reflink=1",
                "reclaimPolicy": "Retain",
                "mountOptions": ["noatime"],
            },
            {
                "name": "tessera-bulk",
                "vpg": "bulk",
                "layout": "concat",
                "fstype": "ext4",
                "locality": "any",
                "volumeBindingMode": "Immediate",
                "allowVolumeExpansion": False,
            },
        ]
    },
    "layouts": {
        "storageClasses": [
            {"name": "tessera", "vpg": "default", "layout": "concat", "fstype": "ext4"},
            {
                "name": "tessera-striped",
                "vpg": "fast",
                "layout": "raid0",
                "legs": 3,
                "chunk": "128KiB",
                "fstype": "xfs",
                "transport": "nvme-tcp",
            },
            {"name": "tessera-mirrored", "vpg": "safe", "layout": "raid1", "fstype": "ext4"},
            {"name": "tessera-mirrored-xfs", "vpg": "safe", "layout": "raid1", "fstype": "xfs"},
        ]
    },
    "observability": {
        "networkPolicy": {
            "enabled": True,
            "nodeCIDRs": ["10.0.0.0/16"],
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        },
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "grafanaDashboard": {"enabled": True},
        },
    },
    "single-controller-no-capacity": {
        "controller": {"replicas": 1},
        "capacityTracking": {"enabled": False},
        "node": {
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
        },
        "auth": {"existingSecret": "my-tessera-token"},
    },
}
