"""Generate the Python gRPC stubs from protos/irece/v1/*.proto (run by `make setup`; the output is git-ignored).

    python -m protos.build
"""
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]


def build() -> None:
    import grpc_tools
    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        rel = proto.relative_to(ROOT)
        rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
                          f"--grpc_python_out={ROOT}", str(rel)])
        if rc != 0:
            raise SystemExit(f"protoc failed on {rel}")


if __name__ == "__main__":
    build()
