"""Build hook: generate the CSI gRPC stubs from proto/csi.proto.

The stubs are never checked in; every install (editable or not) runs this,
so the generated code can never drift from the proto.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
GEN_PACKAGE = "csi_driver/_gen"


def generate_csi_stubs() -> None:
    from grpc_tools import protoc  # build-time dependency only

    out = ROOT / GEN_PACKAGE
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from proto/csi.proto by the build."""\n')
    with tempfile.TemporaryDirectory() as tmp:
        # Placing the proto under its package path makes protoc emit
        # package-qualified imports (from csi_driver._gen import csi_pb2).
        staged = Path(tmp) / GEN_PACKAGE / "csi.proto"
        staged.parent.mkdir(parents=True)
        shutil.copy(ROOT / "proto" / "csi.proto", staged)
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={ROOT}",
                f"--grpc_python_out={ROOT}",
                str(staged),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generate_csi_stubs()
        # Package discovery ran before the stubs existed: from a fresh clone
        # the package would be missing from the wheel.
        gen = GEN_PACKAGE.replace("/", ".")
        if self.packages is not None and gen not in self.packages:
            self.packages.append(gen)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
