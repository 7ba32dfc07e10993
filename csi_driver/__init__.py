"""The Tessera CSI plugin (driver name `csi.tessera.io`).

One module per CSI service (identity, controller, node), a small layer for
what they share (capabilities, locks, the error interceptor), and the gRPC
server that wires them to a unix socket.
"""

DRIVER_NAME = "csi.tessera.io"
