"""deploy/container/Dockerfile, checked statically (no Docker engine runs here or in CI).

Multi-stage; the final stage on a pinned base (an exact version tag or a digest);
a numeric non-root USER; no compiler or build tool installed in the final stage; the
entrypoint is agentctl, a console script of this package; and the build context
(.dockerignore) admits what the build stage copies.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# What a final image must not carry: a compiler or a build tool (Debian package names).
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|build-essential|make|cmake|python3?-dev|libc6?-dev|rustc|cargo)\b"
)
# A tag pinned to one release (python:3.11.13-slim-bookworm) or a digest.
PINNED = re.compile(r"^[\w./-]+(:\w+\.\w+\.\w+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuation lines joined."""
    text = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image, _, name = re.sub(r"--platform=\S+\s+", "", rest).partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], image)
            stages.append(Stage(base=image.strip(), name=name.strip()))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            assert stages, f"{keyword} before any FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())[1]


def test_the_image_is_built_in_stages_and_the_last_copies_only_from_the_build():
    build, *_, final = stages()
    assert len(stages()) >= 2
    copies = final.all("COPY")
    assert copies and all(c.startswith(f"--from={build.name} ") for c in copies), copies


def test_the_final_base_is_pinned():
    final = stages()[-1]
    assert PINNED.match(final.base), final.base
    assert ":" in final.base or "@sha256:" in final.base, "no tag at all means :latest"
    assert not final.base.endswith((":latest", ":3", ":3.11", ":slim")), final.base


def test_the_final_stage_runs_as_a_numeric_non_root_user():
    (user,) = stages()[-1].all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user  # numeric: runAsNonRoot can verify it
    assert not gid or (gid.isdigit() and int(gid) != 0), user


def test_no_compiler_or_build_tool_is_installed_in_the_final_stage():
    for run in stages()[-1].all("RUN"):
        assert not BUILD_TOOLS.search(run), run
        assert "apt-get install" not in run and "pip install" not in run, run


def test_a_build_tool_in_the_final_stage_would_be_caught():
    text = DOCKERFILE.read_text() + "RUN apt-get install -y --no-install-recommends gcc\n"
    final = parse(text)[1][-1]
    assert any(BUILD_TOOLS.search(run) for run in final.all("RUN"))


def test_the_entrypoint_is_agentctl():
    final = stages()[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert entrypoint.startswith("["), "exec form: signals reach agentctl, not a shell"
    program = Path(entrypoint.strip('[]"').split('", "')[0])
    assert program.name == "agentctl"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["agentctl"] == "rooftop.cli:main"
    # The venv's bin, made in the build stage and copied whole.
    assert any(str(program.parent.parent) in c for c in final.all("COPY"))
    assert any(f"python -m venv {program.parent.parent}" in r for r in stages()[0].all("RUN"))


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, body) for p in prefixes) or fnmatch.fnmatch(
            Path(path).name, body
        ):
            result = not negate
    return result


def test_the_build_context_admits_what_the_build_copies():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        source
        for copy in stages()[0].all("COPY")
        if not copy.startswith("--from")
        for source in copy.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert not ignored(source, patterns), f"{source} is left out by .dockerignore"
    for kept_out in (".venv", ".git", "tests/conftest.py", "build"):
        assert ignored(kept_out, patterns), kept_out
    assert ignored("rooftop/__pycache__", patterns)
    assert not ignored("rooftop/cli.py", patterns)


def test_exposed_ports_are_the_collectors_container_ports():
    (expose,) = stages()[-1].all("EXPOSE")
    collector = REPO / "deploy" / "k8s" / "base" / "collector.yaml"
    (deployment,) = [
        d for d in yaml.safe_load_all(collector.read_text()) if d and d["kind"] == "Deployment"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {int(p) for p in expose.split()} == {p["containerPort"] for p in container["ports"]}
