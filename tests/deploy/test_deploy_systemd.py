"""The systemd units in deploy/systemd: real ``systemd-analyze`` verify and security.

Needs ``systemd-analyze`` (Debian's ``systemd`` package; ``security --offline`` since
systemd 252). The tests skip, saying so, where it is missing or too old.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rooftop.agent.config import load_config as load_agent_config
from rooftop.agent.hooks import DEFAULT_SOCKET_PATH
from rooftop.collector.config import load_config as load_collector_config
from tests.security.pki import OPENSSL, Pki
from tests.support import NotifySocket

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
CONFIG = REPO / "deploy" / "config"
SECURITY_DOC = REPO / "docs" / "DEPLOY-SECURITY.md"
UNITS = ("rooftop-agent.service", "rooftop-collector.service")
INSTALLED_AGENTCTL = "/usr/local/bin/agentctl"
MAX_EXPOSURE = 2.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="no systemd-analyze on PATH (Debian package 'systemd'; .ci/install-test-tools.sh)",
)


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value in order (systemd keys repeat; configparser can't)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def one(unit: dict[str, list[str]], key: str) -> str:
    found = unit.get(key, [])
    assert len(found) == 1, f"{key}: expected one setting, found {found}"
    return found[0]


def agentctl() -> Path:
    """The venv's real ``agentctl``: what ExecStart points at in the verified copy."""
    path = Path(sys.executable).with_name("agentctl")
    assert path.is_file() and os.access(path, os.X_OK), f"{path}: install the package first"
    return path


def installable_copy(unit: str, tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart's /usr/local/bin/agentctl replaced by the venv's agentctl.

    ``systemd-analyze verify`` fails on an ExecStart binary that does not exist, and
    the installed path does not exist here; everything else is verified as shipped.
    """
    text = (SYSTEMD / unit).read_text()
    assert text.count(f"ExecStart={INSTALLED_AGENTCTL} ") == 1
    text = text.replace(f"ExecStart={INSTALLED_AGENTCTL} ", f"ExecStart={agentctl()} ")
    copy = tmp_path / unit
    copy.write_text(text + extra)
    return copy


def verify(path: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify``: exit status and the lines that mention this unit.

    verify exits 0 on unknown keys and unparsable values (it only warns, "ignoring"),
    so a clean unit is one with status 0 and no line about it.
    """
    proc = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [ln for ln in lines if path.name in ln or str(path) in ln]


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_clean(unit: str, tmp_path: Path):
    rc, complaints = verify(installable_copy(unit, tmp_path))
    assert rc == 0 and not complaints, complaints


@needs_systemd_analyze
def test_verify_check_catches_a_typo(tmp_path: Path):
    """The check above can fail: a misspelt hardening key is reported."""
    copy = installable_copy(UNITS[0], tmp_path, extra="ProtectSystm=strict\n")
    _, complaints = verify(copy)
    assert any("ProtectSystm" in line for line in complaints), complaints


def exposure(path: Path) -> tuple[float, str]:
    proc = subprocess.run(
        [str(SYSTEMD_ANALYZE), "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if "--offline" in out and ("unrecognized" in out or "Unknown option" in out):
        pytest.skip("systemd-analyze security --offline needs systemd >= 252")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert match, out
    return float(match.group(1)), out


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_exposure_score_at_most_2_5_and_documented(unit: str, tmp_path: Path):
    score, report = exposure(installable_copy(unit, tmp_path))
    assert score <= MAX_EXPOSURE, report
    # docs/DEPLOY-SECURITY.md states the score; it must be the one measured now.
    documented = re.search(
        rf"^\|\s*`{re.escape(unit)}`\s*\|\s*\*\*(\d+(?:\.\d+)?)\*\*", SECURITY_DOC.read_text(), re.M
    )
    assert documented, f"{SECURITY_DOC.name} has no score row for {unit}"
    assert float(documented.group(1)) == score, f"doc says {documented.group(1)}, measured {score}"


@needs_systemd_analyze
def test_exposure_score_rises_without_hardening(tmp_path: Path):
    """The score parsed above is real: dropping the sandbox pushes it over the bar."""
    text = (SYSTEMD / UNITS[1]).read_text()
    bare = "\n".join(
        ln for ln in text.splitlines() if not ln.startswith(("Protect", "Private", "Restrict"))
    )
    path = tmp_path / "bare.service"
    path.write_text(bare.replace(f"ExecStart={INSTALLED_AGENTCTL} ", f"ExecStart={agentctl()} "))
    score, _ = exposure(path)
    assert score > MAX_EXPOSURE


def test_agent_unit_hardening_and_device_allow_list():
    unit = parse_unit(SYSTEMD / "rooftop-agent.service")
    assert one(unit, "Service.ExecStart") == (
        f"{INSTALLED_AGENTCTL} agent --config /etc/rooftop/agent.toml"
    )
    assert one(unit, "Service.EnvironmentFile") == "-/etc/rooftop/agent.env"
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.WatchdogSec") == "30s"
    assert one(unit, "Service.Restart") == "on-failure"
    assert one(unit, "Service.DynamicUser") == "yes"
    assert one(unit, "Service.CapabilityBoundingSet") == ""
    assert one(unit, "Service.AmbientCapabilities") == ""
    assert one(unit, "Service.MemoryMax") == "256M"
    assert one(unit, "Service.CPUQuota") == "20%"
    # /dev/nvidia* is needed, so no PrivateDevices; a closed list of NVIDIA devices instead.
    assert one(unit, "Service.PrivateDevices") == "no"
    assert one(unit, "Service.DevicePolicy") == "closed"
    allowed = unit["Service.DeviceAllow"]
    assert "/dev/nvidiactl rw" in allowed and "char-nvidia-frontend rw" in allowed
    assert all(d.startswith(("/dev/nvidia", "char-nvidia")) for d in allowed), allowed
    assert one(unit, "Service.RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert unit["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


def test_collector_unit_hardening():
    unit = parse_unit(SYSTEMD / "rooftop-collector.service")
    assert one(unit, "Service.ExecStart") == (
        f"{INSTALLED_AGENTCTL} collector --config /etc/rooftop/collector.toml"
    )
    # rooftop/collector/service.py speaks sd_notify (tests/collector/test_collector_notify.py).
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert one(unit, "Service.WatchdogSec") == "30s"
    assert one(unit, "Service.PrivateDevices") == "yes"
    assert one(unit, "Service.MemoryMax") == "2G"
    assert one(unit, "Service.CapabilityBoundingSet") == ""
    assert "Service.DeviceAllow" not in unit


def test_agent_unit_directories_match_the_agent_config():
    """StateDirectory holds the spool, RuntimeDirectory the hook socket, as configured."""
    unit = parse_unit(SYSTEMD / "rooftop-agent.service")
    config = load_agent_config(CONFIG / "agent.toml", env={})
    state = Path("/var/lib") / one(unit, "Service.StateDirectory")
    runtime = Path("/run") / one(unit, "Service.RuntimeDirectory")
    assert config.spool_dir.is_relative_to(state)
    assert Path(DEFAULT_SOCKET_PATH).parent == runtime
    # Engines run as other users: they must reach the socket, which the receiver chmods.
    assert one(unit, "Service.RuntimeDirectoryMode") == "0755"
    # The daemon pings the watchdog from the sampling loop: a tick must come well within it.
    watchdog_s = float(one(unit, "Service.WatchdogSec").removesuffix("s"))
    assert 1 / config.rate_hz <= watchdog_s / 4


def test_collector_config_names_the_units_credentials():
    """Every credential file collector.toml names is one LoadCredential= provides."""
    unit = parse_unit(SYSTEMD / "rooftop-collector.service")
    config = load_collector_config(CONFIG / "collector.toml")
    ids = {value.partition(":")[0] for value in unit["Service.LoadCredential"]}
    creds = Path("/run/credentials/rooftop-collector.service")
    named = [config.tls_cert_file, config.tls_key_file, config.token_file]
    assert all(p is not None and p.parent == creds for p in named), named
    assert {p.name for p in named if p is not None} <= ids


def test_agent_config_names_the_units_credentials():
    """agent.toml asks for TLS, mTLS and a token, each a file LoadCredential= provides."""
    unit = parse_unit(SYSTEMD / "rooftop-agent.service")
    config = load_agent_config(CONFIG / "agent.toml", env={})
    assert not config.insecure
    ids: dict[str, Path] = {}
    for value in unit["Service.LoadCredential"]:
        name, _, source = value.partition(":")
        ids[name] = Path(source)
    creds = Path("/run/credentials/rooftop-agent.service")
    named = [config.ca_file, config.cert_file, config.key_file, config.token_file]
    assert all(p is not None and p.parent == creds for p in named), named
    assert {p.name for p in named if p is not None} == set(ids)
    assert all(src.parent == Path("/etc/rooftop/credentials/agent") for src in ids.values())


@pytest.mark.slow
def test_daemon_speaks_the_notify_protocol_the_unit_expects(tmp_path: Path):
    """Type=notify + WatchdogSec: the real daemon, run on the shipped agent.toml, says
    READY=1, pings WATCHDOG=1 within WatchdogSec/2 and STOPPING=1 on SIGTERM.

    The shipped config names credentials under /run/credentials/, which systemd fills;
    here the ROOFTOP_* variables point the same keys at a throwaway PKI instead."""
    if OPENSSL is None:
        pytest.skip("no openssl CLI to make the test certificates")
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("collector-ca")
    agent_cert = pki.issue("agent", ca="collector-ca", cn="deploy-test")
    token = tmp_path / "token"
    token.write_text("deploy-test-token\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    env.update(
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="2000000",  # pings due every 1 s
        ROOFTOP_AGENT_ID="deploy-test",
        ROOFTOP_SPOOL_DIR=str(tmp_path / "spool"),
        ROOFTOP_COLLECTORS="127.0.0.1:9",  # nothing there: the agent keeps retrying
        ROOFTOP_RATE_HZ="10",
        ROOFTOP_CA_FILE=str(ca),
        ROOFTOP_CERT_FILE=str(agent_cert.cert),
        ROOFTOP_KEY_FILE=str(agent_cert.key),
        ROOFTOP_TOKEN_FILE=str(token),
    )
    proc = subprocess.Popen(
        [str(agentctl()), "agent", "--config", str(CONFIG / "agent.toml"), "--fake", "h100"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    messages = notify.messages
    try:
        notify.wait_for_watchdogs(proc)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
        notify.drain()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert any(m.startswith("READY=1") for m in messages), (messages, output)
    assert messages.count("WATCHDOG=1") >= 2, (messages, output)
    assert "STOPPING=1" in messages, (messages, output)
    assert proc.returncode == 0, output
