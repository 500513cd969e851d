"""Generate the protobuf messages of agent/cni/rpc.proto (rpc_pb2.py, rpc_pb2.pyi).

    python -m agent.cni.generate          # rewrite the committed modules
    python -m agent.cni.generate --check  # exit 1 if they are stale

Only the messages are generated: the gRPC service glue (method paths, serializers) is
written by hand in agent/cni/service.py from the proto's descriptor, so it is typed.
Needs grpcio-tools (a dev dependency); the agent's runtime needs only protobuf.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "rpc.proto"
OUTPUTS = ("rpc_pb2.py", "rpc_pb2.pyi")


def generate() -> dict[str, bytes]:
    """The generated modules' contents, by file name."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as out:
        code = protoc.main(
            [
                "protoc",
                f"-I{HERE}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                PROTO.name,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit {code})")
        return {name: (Path(out) / name).read_bytes() for name in OUTPUTS}


def stale() -> list[str]:
    """The committed modules that differ from what the proto generates."""
    return [
        name
        for name, text in generate().items()
        if not (HERE / name).exists() or (HERE / name).read_bytes() != text
    ]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        names = stale()
        if names:
            print(f"stale: {', '.join(names)} (run python -m agent.cni.generate)")
            return 1
        return 0
    for name, text in generate().items():
        (HERE / name).write_bytes(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
