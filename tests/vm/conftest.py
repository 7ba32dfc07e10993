"""tests/vm/guest/ runs only inside the VM (the guest init sets TESSERA_VM=1):
the host's kernel has no nvmet, nvme-tcp, md or dm to test it against."""

import os

collect_ignore = [] if os.environ.get("TESSERA_VM") == "1" else ["guest"]
