"""The agent's configuration: a frozen ``AgentConfig`` from TOML, then ``ROOFTOP_*`` env.

Precedence, lowest first: defaults, the TOML file, environment variables, explicit
overrides (CLI flags). Every key is a top-level TOML key; its environment variable
is ``ROOFTOP_`` + the key in capitals (``ENV_VARS`` lists them all, in one place).
Lists from the environment are comma-separated; booleans are ``true/false/1/0/yes/no``.

An unknown key or a value of the wrong type is a ``ConfigError`` naming the key (and
the file and line where it is set), never a silent default::

    agent_id = "gpu-node-17"
    collectors = ["collector-a:7443", "collector-b:7443"]  # any order: rendezvous homing
    ca_file = "/etc/rooftop/ca.crt"        # TLS: the CA that signed the collector's cert
    cert_file = "/etc/rooftop/agent.crt"   # mTLS: this agent's certificate (CN/SAN = agent_id)
    key_file = "/etc/rooftop/agent.key"
    token_file = "/etc/rooftop/token"      # bearer token; never sent over plaintext
    # insecure = true          # plaintext gRPC instead: only when asked for explicitly
    backend = "nvml"           # or "fake:h100", "fake:a100", "replay:/path/trace.jsonl"
    rate_hz = 1
    spool_dir = "/var/lib/rooftop/spool"

    [otlp]                     # direct OTLP export (no collector needed)
    endpoint = "http://127.0.0.1:4317"
    protocol = "grpc"          # or "http/protobuf" (OTLP/HTTP, .../v1/metrics)

The one table, ``[otlp]``, is the collector's ``[[otlp]]``: the same keys and values,
parsed by ``rooftop.common.otlp``. Its environment is the standard
``OTEL_EXPORTER_OTLP_*`` variables, which fill in what the table leaves out (and with
no table, ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone enables the export); there are no
``ROOFTOP_OTLP_*`` variables. TLS files and the token are re-read when they change,
at the next (re)connect: rotate them without a restart.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rooftop.agent.hooks._core import DEFAULT_SOCKET_PATH
from rooftop.common.configfile import line_of, located, read_toml
from rooftop.common.errors import ConfigError
from rooftop.common.otlp import OtlpExport, otlp_exports
from rooftop.common.text import identity_problem

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "ENV_VARS", "NODE_NAME_ENV", "AgentConfig", "load_config"]

ENV_PREFIX = "ROOFTOP_"
CONFIG_ENV = "ROOFTOP_CONFIG"  # path of the TOML file when --config is not given
# The node's name from the downward API (deploy/k8s/base/agent.yaml): host.name and the
# default agent_id in a pod, whose own host name is the pod's generated name.
NODE_NAME_ENV = "NODE_NAME"

_MIB = 1024 * 1024
# gRPC takes message limits as a C int; anything near that is a typo, not a batch size.
MAX_MESSAGE_BYTES = 1024 * _MIB
_BACKEND = re.compile(r"^(nvml|fake:[A-Za-z0-9_-]+(:[A-Za-z0-9_,-]+)?|replay:.+)$")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``agentctl agent`` needs to know; units are in the names."""

    agent_id: str = field(default_factory=socket.gethostname)
    hostname: str = ""  # host name reported to the collector (host.name); "" = this machine's
    # host:port, any order: each agent's home is chosen by rendezvous hashing of its
    # agent_id, failover to the next-ranked; a DNS name with several addresses (a
    # Kubernetes headless Service) is several collectors.
    collectors: tuple[str, ...] = ()
    insecure: bool = False  # plaintext gRPC, asked for explicitly; excludes TLS keys and the token
    ca_file: Path | None = None  # PEM roots to verify the collector with (TLS)
    cert_file: Path | None = None  # PEM client certificate (mTLS); CN or a SAN = agent_id
    key_file: Path | None = None  # its private key
    token_file: Path | None = None  # bearer token (first non-comment line); TLS only
    server_name: str = ""  # expected name in the collector's certificate, if not its address
    backend: str = "nvml"  # "nvml" | "fake:PROFILE[:WORKLOAD,...]" | "replay:PATH"
    fake_gpus: int = 1  # how many GPUs a fake:PROFILE backend has
    host_sensor: bool = True  # host and per-process CPU via psutil, when available
    rate_hz: float = 1.0
    window_s: float = 5.0
    hysteresis_windows: int = 2  # a changed verdict must win this many windows in a row
    hook_socket: str = DEFAULT_SOCKET_PATH  # in-process engine hooks send here; "" disables
    engine_urls: tuple[str, ...] = ()  # engines' /metrics to scrape: "URL[@GPU,...]"
    # Kubernetes: the kubelet's pod-resources API, read for GPU -> pod attribution; ""
    # disables it, and a node without the socket just has no pod attributes.
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    pod_resources_refresh_s: float = 10.0  # seconds between List calls (API v1 has no Watch)
    spool_dir: Path = Path("/var/lib/rooftop/spool")
    spool_max_bytes: int = 256 * _MIB
    spool_segment_bytes: int = 16 * _MIB
    fsync_interval_s: float = 0.5
    batch_interval_s: float = 1.0  # a batch leaves at least this often (DESIGN §7: ≤ 1 s)
    batch_max_bytes: int = 1 * _MIB
    batch_max_samples: int = 500
    # "auto": records until the collector's ack says it reads Batch.gpu_columns, then
    # columns (per stream: a failover starts over, and the stream turns a spooled batch
    # into what its collector reads). "columns": always, which collectors older than
    # Ack.columns drop; "records": never (OPERATOR-GUIDE, "Upgrade").
    batch_format: str = "auto"
    max_message_bytes: int = 4 * _MIB
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    # Batches in flight and no ack for this long: fail over (a wedged collector answers
    # keepalive pings all the same). Not shorter: a collector that just took a dead
    # peer's agents is slow for everyone, and agents hopping between busy collectors
    # every few seconds only add streams for them to take (measured: 5 s did that).
    ack_timeout_s: float = 30.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    return_home_after_s: float = 30.0  # home healthy this long before the agent returns
    home_probe_interval_s: float = 5.0  # health check of home while away
    resolve_interval_s: float = 30.0  # DNS names in collectors resolved again this often
    shutdown_timeout_s: float = 5.0  # final flush budget on SIGTERM (systemd waits 90 s)
    # touched after each sampling tick; `agentctl alive FILE` probes it (Kubernetes)
    heartbeat_file: Path | None = None
    otlp: OtlpExport | None = None  # the [otlp] table: direct OTLP metrics export; None = none

    def __post_init__(self) -> None:
        _validate(self)


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AgentConfig))
# The [otlp] table is the one key without a ROOFTOP_ variable: OTEL_EXPORTER_OTLP_* set it.
ENV_VARS: Mapping[str, str] = {key: ENV_PREFIX + key.upper() for key in KEYS if key != "otlp"}
_RETIRED_ENV_PREFIX = ENV_PREFIX + "OTLP_"
_TYPES: Mapping[str, str] = {f.name: str(f.type) for f in dataclasses.fields(AgentConfig)}


def _positive(cfg: AgentConfig, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key} must be > 0, not {value}")


def _validate(cfg: AgentConfig) -> None:
    if not cfg.agent_id.strip():
        raise ConfigError("agent_id must not be empty")
    for key in ("agent_id", "hostname"):
        # The collector refuses control characters in identities (bad_identity): say so
        # at start, not as every batch rejected later.
        problem = identity_problem(key, getattr(cfg, key))
        if problem is not None:
            raise ConfigError(problem)
    if cfg.hostname != cfg.hostname.strip() or any(c.isspace() for c in cfg.hostname):
        raise ConfigError(f"hostname: {cfg.hostname!r} is not a host name (no spaces)")
    for address in cfg.collectors:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or any(c.isspace() for c in address):
            raise ConfigError(f"collectors: {address!r} is not a host:port address")
    if not _BACKEND.match(cfg.backend):
        raise ConfigError(f"backend: {cfg.backend!r} is not one of nvml, fake:PROFILE, replay:PATH")
    _positive(
        cfg,
        "rate_hz",
        "window_s",
        "spool_max_bytes",
        "spool_segment_bytes",
        "batch_interval_s",
        "batch_max_bytes",
        "batch_max_samples",
        "max_message_bytes",
        "keepalive_time_s",
        "keepalive_timeout_s",
        "connect_timeout_s",
        "ack_timeout_s",
        "backoff_base_s",
        "backoff_max_s",
        "return_home_after_s",
        "home_probe_interval_s",
        "resolve_interval_s",
        "hysteresis_windows",
        "fake_gpus",
        "pod_resources_refresh_s",
    )
    if cfg.max_message_bytes > MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"max_message_bytes must be at most {MAX_MESSAGE_BYTES} (1 GiB), "
            f"not {cfg.max_message_bytes}"
        )
    if cfg.rate_hz > 100:
        raise ConfigError(f"rate_hz must be ≤ 100, not {cfg.rate_hz}")
    if cfg.window_s * cfg.rate_hz < 1:
        raise ConfigError(
            f"window_s ({cfg.window_s}) must hold at least one sample at rate_hz {cfg.rate_hz}"
        )
    if not (math.isfinite(cfg.fsync_interval_s) and cfg.fsync_interval_s >= 0):
        raise ConfigError(f"fsync_interval_s must be ≥ 0, not {cfg.fsync_interval_s}")
    if not (math.isfinite(cfg.shutdown_timeout_s) and cfg.shutdown_timeout_s >= 0):
        raise ConfigError(f"shutdown_timeout_s must be ≥ 0, not {cfg.shutdown_timeout_s}")
    if cfg.spool_segment_bytes > cfg.spool_max_bytes // 2:
        raise ConfigError("spool_segment_bytes must be at most half of spool_max_bytes")
    if cfg.batch_max_bytes + 64 * 1024 > cfg.max_message_bytes:
        raise ConfigError("max_message_bytes must exceed batch_max_bytes by at least 64 KiB")
    if cfg.batch_format not in ("auto", "records", "columns"):
        raise ConfigError(
            f"batch_format: {cfg.batch_format!r} is not one of auto, records, columns"
        )
    if cfg.backoff_max_s < cfg.backoff_base_s:
        raise ConfigError("backoff_max_s must be ≥ backoff_base_s")
    _validate_security(cfg)
    if cfg.otlp is not None and not isinstance(cfg.otlp, OtlpExport):
        raise ConfigError(f"otlp must be an OtlpExport or None, not {type(cfg.otlp).__name__}")


def _validate_security(cfg: AgentConfig) -> None:
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise ConfigError("cert_file and key_file go together (mTLS)")
    if cfg.insecure and cfg.token_file is not None:
        raise ConfigError(
            "token_file: a bearer token is never sent over plaintext; "
            "drop insecure = true and configure TLS (ca_file)"
        )
    tls_keys = [k for k in ("ca_file", "cert_file", "key_file") if getattr(cfg, k) is not None]
    tls_keys += ["server_name"] if cfg.server_name else []
    if cfg.insecure and tls_keys:
        raise ConfigError(f"insecure = true (plaintext) contradicts {', '.join(tls_keys)}")
    if any(c.isspace() for c in cfg.server_name):
        raise ConfigError(f"server_name: {cfg.server_name!r} is not a host name")


# --- converting one value -------------------------------------------------------------


def _from_toml(key: str, value: Any) -> Any:
    """A TOML value converted to the field's type; raises ``ValueError`` saying what was due."""
    kind = _TYPES[key]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("expected an integer")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError("expected a number")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValueError("expected a string")
    if kind in ("Path", "Path | None"):
        if isinstance(value, str) and value:
            return Path(value)
        raise ValueError("expected a path (a string)")
    if kind == "tuple[str, ...]":
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError("expected a list of strings")
    raise AssertionError(f"no conversion for {key}: {kind}")  # a field added without one


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_env(key: str, text: str) -> Any:
    """An environment string converted to the field's type; raises ``ValueError``."""
    kind = _TYPES[key]
    text = text.strip()
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if kind == "int":
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ValueError("expected an integer") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind == "tuple[str, ...]":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return _from_toml(key, text)


def _node_identity(values: dict[str, Any], env: Mapping[str, str]) -> None:
    """Fill ``hostname`` and ``agent_id`` left unset from ``$NODE_NAME``.

    In a pod, the host name is the pod's generated name, which changes with every
    restart: the node's name (the downward API's ``spec.nodeName``, which the DaemonSet
    sets as ``NODE_NAME``) is what ``host.name`` must say. Set keys win; without either,
    the machine's host name (``socket.gethostname()``) stays the default.
    """
    node = env.get(NODE_NAME_ENV, "").strip()
    if not node:
        return
    if any(c.isspace() for c in node):
        raise ConfigError(f"{NODE_NAME_ENV}: {node!r} is not a node name (no spaces)")
    if not values.get("hostname"):
        values["hostname"] = node
    if not values.get("agent_id"):
        values["agent_id"] = node


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the config from defaults, ``path`` (or ``$ROOFTOP_CONFIG``), env, overrides.

    Args:
        path: the TOML file; None reads ``$ROOFTOP_CONFIG`` if set, else no file.
        env: the environment (``os.environ`` when None).
        overrides: already-typed values (CLI flags), applied last.

    The ``[otlp]`` table comes from the file, what it leaves out from the standard
    ``OTEL_EXPORTER_OTLP_*`` variables (``rooftop.common.otlp``), or an override.

    ``hostname`` and ``agent_id`` that nothing sets come from ``$NODE_NAME`` (the
    Kubernetes node, downward API) when it is set, else the machine's host name.

    Raises:
        ConfigError: unreadable file, invalid TOML, unknown key, wrong type or an
            out-of-range value; the message names the key (and file:line).
    """
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    retired = sorted(name for name in env if name.startswith(_RETIRED_ENV_PREFIX))
    if retired:
        standard = "OTEL_EXPORTER_OTLP_" + retired[0].removeprefix(_RETIRED_ENV_PREFIX)
        raise ConfigError(
            f"{retired[0]} is no longer read: [otlp] takes the standard OpenTelemetry "
            f"variables ({standard}, ...; docs/METRICS.md)"
        )
    values: dict[str, Any] = {}
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        data, text = read_toml(path)
        for key, value in data.items():
            if key == "otlp":
                continue  # below, with the environment
            line = line_of(text, key, table="") or line_of(text, key, table=key)
            where = f"{path}:{line}" if line else str(path)
            if key not in _TYPES:
                raise ConfigError(f"{where}: unknown key {key!r}")
            try:
                values[key] = _from_toml(key, value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {key}: {exc}, got {value!r}") from None
    for key, name in ENV_VARS.items():
        if name in env:
            try:
                values[key] = _from_env(key, env[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}, got {env[name]!r}") from None
    if "otlp" not in (overrides or {}):
        try:
            exports = otlp_exports(data.get("otlp"), env=env, many=False)
        except ConfigError as exc:
            raise located(exc, path, text) from None
        values["otlp"] = exports[0] if exports else None
    for key, value in (overrides or {}).items():
        if key not in _TYPES:
            raise ConfigError(f"unknown key {key!r}")
        values[key] = value
    _node_identity(values, env)
    try:
        return AgentConfig(**values)
    except ConfigError as exc:
        if path is None:
            raise
        raise located(exc, path, text) from None
