"""Every module's ``__all__`` names things that exist, and the edges import only where allowed."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import rooftop

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(rooftop.__path__, prefix="rooftop.")
    # __main__ runs the CLI on import; the vLLM plugin is tested on its own.
    if m.name != "rooftop.__main__" and not m.name.startswith("rooftop.agent.hooks.vllm")
)


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str):
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", ()):
        assert hasattr(module, exported), f"{name}.__all__ lists missing {exported!r}"


def test_replay_diagnosis_needs_neither_grpc_nor_the_otel_sdk():
    probe = (
        "import sys; from rooftop.cli import main; from rooftop.agent import diagnose, trace; "
        "bad = [m for m in ('grpc', 'opentelemetry.sdk') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
