"""Regenerate the Python code for ``protos/`` — the only way to do it.

``protos/rooftop/v1/telemetry.proto`` becomes ``rooftop/v1/telemetry_pb2*.py(i)``: the
include root is ``protos/``, so the proto's path (``rooftop/v1/telemetry.proto``) is
its Python import path (``rooftop.v1``) and its protobuf package (``rooftop.v1``).

Vendored protos keep their upstream text: ``protos/k8s/`` (the kubelet's pod-resources
API, protobuf package ``v1``, which the kubelet serves as ``v1.PodResourcesLister``) is
mapped to the virtual path ``rooftop/v1/k8s/`` (protoc's ``-IVIRTUAL=DIR``), so its code
lands in ``rooftop/v1/k8s/podresources/v1/`` with absolute imports that resolve there,
without a Python package option the upstream file does not have.

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
VENDORED = {"k8s": "rooftop/v1/k8s"}  # protos/<dir> -> the import path its code gets
PROTOS = sorted(
    p for p in PROTO_ROOT.rglob("*.proto") if p.relative_to(PROTO_ROOT).parts[0] not in VENDORED
)


def vendored_protos() -> list[str]:
    """The vendored protos, as the virtual paths protoc sees (and the code is named by)."""
    return sorted(
        f"{virtual}/{p.relative_to(PROTO_ROOT / top).as_posix()}"
        for top, virtual in VENDORED.items()
        for p in (PROTO_ROOT / top).rglob("*.proto")
    )


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
        *(f"-I{virtual}={PROTO_ROOT / top}" for top, virtual in VENDORED.items()),
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in PROTOS),
        *vendored_protos(),
    ]
    rc = protoc.main(args)
    if rc != 0:
        sys.exit(f"protoc failed with exit code {rc}")
    # The vendored code's directories become packages (protoc writes no __init__.py).
    for virtual in vendored_protos():
        package = out / Path(virtual).parent
        while package != out / "rooftop" / "v1":
            init = package / "__init__.py"
            if not init.exists():
                init.write_text(
                    '"""Generated protobuf code (protos/generate.py; do not edit)."""\n'
                )
            package = package.parent


def main() -> None:
    """Parse arguments and generate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    check_pins()
    generate(args.out)


if __name__ == "__main__":
    main()
