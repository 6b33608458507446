"""Regenerate the Python code for ``protos/`` — the only way to do it.

``protos/rooftop/v1/telemetry.proto`` becomes ``rooftop/v1/telemetry_pb2*.py(i)``: the
include root is ``protos/``, so the proto's path (``rooftop/v1/telemetry.proto``) is
its Python import path (``rooftop.v1``) and its protobuf package (``rooftop.v1``).
Run from the repository root::

    python protos/generate.py            # writes rooftop/v1/ in the package
    python protos/generate.py --out DIR  # writes DIR/rooftop/v1/ (the staleness test)

The generator versions are pinned (pyproject ``dev`` extra) so that every machine emits
byte-identical files; ``tests/protos/test_generated.py`` fails when the committed code is
stale.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

PINNED = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}
ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = sorted(PROTO_ROOT.rglob("*.proto"))


def check_pins() -> None:
    """Refuse to run with generator versions other than the pinned ones."""
    for dist, want in PINNED.items():
        have = importlib.metadata.version(dist)
        if have != want:
            sys.exit(f"generate.py: {dist} {have} installed, {want} pinned; "
                     f"run: pip install '{dist}=={want}'")


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) with the mypy plugins into ``out``."""
    import grpc_tools  # imported here: only this script needs the generator
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in PROTOS),
    ]
    rc = protoc.main(args)
    if rc != 0:
        sys.exit(f"protoc failed with exit code {rc}")


def main() -> None:
    """Parse arguments and generate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    check_pins()
    generate(args.out)


if __name__ == "__main__":
    main()
