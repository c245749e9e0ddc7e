"""Regenerate the checked-in Python modules of Hubble's protos with grpcio-tools.

Run ``python -m flowtel.lib.hubble.api.generate`` after editing a ``.proto`` file here;
``--check`` exits 1 when a checked-in module differs from what the protos generate (the
test suite runs that check). The protos are compiled with the repository root as the
import root, so the generated modules import each other as ``flowtel.lib.hubble.api.*``
while the proto packages stay Cilium's (``flow``, ``observer``, ``peer``, ``relay``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
ROOT = API_DIR.parents[3]  # .../flowtel/lib/hubble/api -> repository root
PROTOS = (
    "flowtel/lib/hubble/api/flow/flow.proto",
    "flowtel/lib/hubble/api/relay/relay.proto",
    "flowtel/lib/hubble/api/observer/observer.proto",
    "flowtel/lib/hubble/api/peer/peer.proto",
)
# Modules that carry a gRPC service get a *_pb2_grpc.py beside their *_pb2.py.
SERVICES = ("observer", "peer")


def generated_names() -> list[str]:
    """Paths (relative to the repository root) of every module the protos generate."""
    out = []
    for proto in PROTOS:
        stem = proto[: -len(".proto")]
        out.append(stem + "_pb2.py")
        out.append(stem + "_pb2.pyi")
        if Path(stem).name in SERVICES:
            out.append(stem + "_pb2_grpc.py")
    return out


def generate(out_dir: Path) -> None:
    """Compile the protos into ``out_dir`` (laid out like the repository root)."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(ROOT / p) for p in PROTOS),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}) on {', '.join(PROTOS)}")


def _stale(out_dir: Path) -> list[str]:
    stale = []
    for name in generated_names():
        fresh = (out_dir / name).read_bytes() if (out_dir / name).exists() else b""
        current = (ROOT / name).read_bytes() if (ROOT / name).exists() else None
        if fresh != current:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only report modules that differ from the protos (exit 1)")
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flowtel-protoc-") as tmp:
        out_dir = Path(tmp)
        generate(out_dir)
        stale = _stale(out_dir)
        if ns.check:
            for name in stale:
                print(f"stale: {name} (regenerate: python -m flowtel.lib.hubble.api.generate)",
                      file=sys.stderr)
            return 1 if stale else 0
        for name in generated_names():
            (ROOT / name).write_bytes((out_dir / name).read_bytes())
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
