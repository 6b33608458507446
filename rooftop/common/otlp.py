"""OTLP metrics export settings: one type and one parser for both roles.

The collector's ``[[otlp]]`` tables and the agent's ``[otlp]`` table take the same
keys and values, parsed and checked here::

    [otlp]
    endpoint = "http://otel-collector:4317"  # see "endpoint" below
    protocol = "grpc"                # or "http/protobuf" (the OTel spec's names)
    interval_s = 10                  # export every this many seconds
    timeout_s = 10                   # per export
    insecure = false                 # grpc only: plaintext (an http:// endpoint implies it)
    headers = { "x-api-key" = "..." }  # sent with every export

``endpoint``: for ``grpc`` ``host:port`` or a URL (``http://`` is plaintext,
``https://`` TLS, without a scheme ``insecure`` decides); for ``http/protobuf`` an
``http(s)://`` base URL to which ``/v1/metrics`` is appended, unless it already ends
so. ``http/json`` is refused: the OpenTelemetry Python exporter does not speak it;
``http`` alone is refused too (not a spec value; say ``http/protobuf``). ``headers`` is
a table; the agent's former list of ``"key=value"`` strings is refused with the table
to write instead. Header names are sent in lower case (gRPC metadata requires it).

The standard OpenTelemetry variables fill in what the table leaves out (the file
wins, as code wins over the environment in the OTel SDKs); per key, the
metrics-specific variable comes before the generic one, then the default:

=========== ============================================== ==========================
key         variable (``OTEL_EXPORTER_OTLP_[METRICS_]…``)   format
=========== ============================================== ==========================
endpoint    ``…ENDPOINT``                                  the generic one gets
                                                           ``/v1/metrics`` appended for
                                                           http/protobuf; the metrics
                                                           one is used as is
protocol    ``…PROTOCOL``                                  ``grpc`` | ``http/protobuf``
headers     ``…HEADERS``                                   ``k=v,k2=v2``, values
                                                           URL-encoded
timeout_s   ``…TIMEOUT``                                   milliseconds
insecure    ``…INSECURE``                                  ``true`` | ``false``
interval_s  ``OTEL_METRIC_EXPORT_INTERVAL``                milliseconds
=========== ============================================== ==========================

With no OTLP table in the file, an endpoint variable alone configures one export
(``otlp_exports``). The exporter itself reads the TLS file and compression
variables (``OTEL_EXPORTER_OTLP_CERTIFICATE``, ``…_COMPRESSION``, …).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from rooftop.common.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "INTERVAL_ENV",
    "OTLP_KEYS",
    "PROTOCOLS",
    "OtlpExport",
    "OtlpProtocol",
    "env_names",
    "otlp_exports",
    "parse_otlp_table",
]

OtlpProtocol = Literal["grpc", "http/protobuf"]
PROTOCOLS: tuple[OtlpProtocol, ...] = ("grpc", "http/protobuf")
OTLP_KEYS = ("endpoint", "protocol", "interval_s", "timeout_s", "insecure", "headers")
ENV_PREFIX = "OTEL_EXPORTER_OTLP_"
INTERVAL_ENV = "OTEL_METRIC_EXPORT_INTERVAL"
_METRICS_PATH = "/v1/metrics"
# RFC 9110 token: what a header name may be.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_REFUSED_PROTOCOLS = {
    "http": "'http' is not an OTLP protocol name; use 'http/protobuf' (OTLP/HTTP) or 'grpc'",
    "http/json": "'http/json' is not supported (the OpenTelemetry Python exporter sends "
    "grpc or http/protobuf only); use 'http/protobuf'",
}
_ENV_SUFFIX = {"endpoint": "ENDPOINT", "protocol": "PROTOCOL", "headers": "HEADERS",
               "timeout_s": "TIMEOUT", "insecure": "INSECURE"}  # fmt: skip


def env_names(key: str) -> tuple[str, ...]:
    """The environment variables for ``key``, the one that wins first."""
    if key == "interval_s":
        return (INTERVAL_ENV,)
    suffix = _ENV_SUFFIX[key]
    return (f"{ENV_PREFIX}METRICS_{suffix}", f"{ENV_PREFIX}{suffix}")


# ---- checks of one value, named after where it came from ---------------------------


def _protocol(value: object, source: str) -> OtlpProtocol:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: expected a string ('grpc' or 'http/protobuf')")
    text = value.strip()
    if text in PROTOCOLS:
        return text
    reason = _REFUSED_PROTOCOLS.get(text.lower(), f"{text!r} is not 'grpc' or 'http/protobuf'")
    raise ConfigError(f"{source}: {reason}")


def _seconds(value: object, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: expected a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{source}: must be > 0 seconds, not {value}")
    return float(value)


def _millis(text: str, source: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        raise ConfigError(f"{source}: expected milliseconds, got {text!r}") from None
    if not (math.isfinite(ms) and ms > 0):
        raise ConfigError(f"{source}: must be > 0 milliseconds, not {text!r}")
    return ms / 1000


def _bool_env(text: str, source: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise ConfigError(f"{source}: expected true or false, got {text!r}")
    return lowered == "true"


def _endpoint(value: object, source: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: expected a string (host:port or a URL)")
    text = value.strip()
    if not text or any(c.isspace() for c in text):
        raise ConfigError(f"{source}: {value!r} is not host:port or a URL")
    return text


def _header(name: str, value: object, source: str) -> tuple[str, str]:
    # Values are often secrets (API keys): name the header, never echo the value.
    if not _HEADER_NAME.match(name):
        raise ConfigError(f"{source}: {name!r} is not a valid header name")
    if not isinstance(value, str):
        raise ConfigError(f"{source}: the value of {name!r} must be a string")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{source}: the value of {name!r} holds a control character")
    return name.lower(), value.strip()


def _headers_table(value: object, source: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, list):
        names = [str(v).partition("=")[0].strip() for v in value]
        example = ", ".join(f'"{n}" = "..."' for n in names if n) or '"x-api-key" = "..."'
        raise ConfigError(
            f"{source}: a list of \"key=value\" strings is no longer read; headers is a "
            f"table: headers = {{ {example} }}"
        )
    if not isinstance(value, dict):
        raise ConfigError(f'{source}: expected a table, e.g. headers = {{ "x-api-key" = "..." }}')
    return tuple(sorted(_header(str(k), v, source) for k, v in value.items()))


def _headers_env(text: str, source: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for i, item in enumerate(text.split(","), start=1):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{source}: entry {i} is not key=value")
        headers.append(_header(name.strip(), unquote(value), source))
    return tuple(sorted(headers))


def _http_url(endpoint: str, source: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"{source}: http/protobuf needs an http:// or https:// URL, not {endpoint!r}"
        )


def _with_metrics_path(base: str) -> str:
    return base if base.rstrip("/").endswith(_METRICS_PATH) else base.rstrip("/") + _METRICS_PATH


# ---- the type ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OtlpExport:
    """One OTLP metrics destination, checked.

    ``endpoint`` is exactly what the exporter sends to: for ``http/protobuf`` the full
    URL (``parse_otlp_table`` appends ``/v1/metrics`` to a configured base URL).

    Raises:
        ConfigError: a value out of range, naming ``otlp.<key>``.
    """

    endpoint: str
    protocol: OtlpProtocol = "grpc"
    interval_s: float = 10.0
    timeout_s: float = 10.0
    insecure: bool = False  # grpc without TLS; http:// implies it, https:// excludes it
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check(self.endpoint, self.protocol, self.interval_s, self.timeout_s, self.insecure,
               self.headers, "otlp")

    @property
    def plaintext(self) -> bool:
        """Whether the export travels without TLS: the URL's scheme, else ``insecure``."""
        scheme = urlsplit(self.endpoint).scheme if "://" in self.endpoint else ""
        return scheme == "http" if scheme else self.insecure

    def as_table(self, *, redact: bool = True) -> dict[str, Any]:
        """The settings as a TOML table that parses back to them (header values hidden)."""
        return {
            "endpoint": self.endpoint,
            "protocol": self.protocol,
            "interval_s": self.interval_s,
            "timeout_s": self.timeout_s,
            "insecure": self.insecure,
            "headers": {k: "<redacted>" if redact else v for k, v in self.headers},
        }


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(OtlpExport)
                             if f.default is not MISSING}


def _check(endpoint: str, protocol: str, interval_s: float, timeout_s: float, insecure: bool,
           headers: tuple[tuple[str, str], ...], name: str) -> None:
    """Every rule on a whole export; errors name ``{name}.<key>``."""
    _endpoint(endpoint, f"{name}.endpoint")
    _protocol(protocol, f"{name}.protocol")
    _seconds(interval_s, f"{name}.interval_s")
    _seconds(timeout_s, f"{name}.timeout_s")
    for key, value in headers:
        _header(key, value, f"{name}.headers")
    if protocol == "http/protobuf":
        _http_url(endpoint, f"{name}.endpoint")
    if insecure and endpoint.startswith("https://"):
        raise ConfigError(f"{name}.insecure: plaintext contradicts the https:// endpoint")


# ---- parsing -----------------------------------------------------------------------


def _from_env(key: str, env: Mapping[str, str]) -> tuple[Any, str] | None:
    """The value ``key`` takes from the environment and the variable it came from."""
    for var in env_names(key):
        text = env.get(var)
        if text is None or not text.strip():
            continue
        if key == "endpoint":
            return _endpoint(text, var), var
        if key == "protocol":
            return _protocol(text, var), var
        if key == "headers":
            return _headers_env(text, var), var
        if key == "insecure":
            return _bool_env(text, var), var
        return _millis(text, var), var  # timeout_s, interval_s
    return None


def parse_otlp_table(
    table: object, *, env: Mapping[str, str], name: str = "otlp"
) -> OtlpExport:
    """One export from a TOML table, what it leaves out from ``env`` (module docstring).

    Args:
        table: the parsed ``[otlp]`` table.
        env: the environment (``os.environ``, or a test's mapping).
        name: how errors name the table (``otlp``, ``otlp[1]``).

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range, no
            endpoint; named ``{name}.<key>`` (or the environment variable).
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table of {', '.join(OTLP_KEYS)}")
    for key in table:
        if key not in OTLP_KEYS:
            raise ConfigError(f"unknown key {name}.{key} (known: {', '.join(OTLP_KEYS)})")
    values: dict[str, Any] = {}
    if "interval_s" in table:
        values["interval_s"] = _seconds(table["interval_s"], f"{name}.interval_s")
    if "timeout_s" in table:
        values["timeout_s"] = _seconds(table["timeout_s"], f"{name}.timeout_s")
    if "headers" in table:
        values["headers"] = _headers_table(table["headers"], f"{name}.headers")
    for key in ("interval_s", "timeout_s", "headers"):
        # An empty headers table counts as unset, as it does to the OTel exporter.
        if not values.get(key) and (found := _from_env(key, env)) is not None:
            values[key] = found[0]
    if "protocol" in table:
        protocol = _protocol(table["protocol"], f"{name}.protocol")
    else:
        protocol = found[0] if (found := _from_env("protocol", env)) else "grpc"
    if "endpoint" in table:
        endpoint = _endpoint(table["endpoint"], f"{name}.endpoint")
        if protocol == "http/protobuf":
            _http_url(endpoint, f"{name}.endpoint")
            endpoint = _with_metrics_path(endpoint)
    elif (found := _from_env("endpoint", env)) is not None:
        endpoint, var = found
        if protocol == "http/protobuf":
            _http_url(endpoint, var)
            if var == f"{ENV_PREFIX}ENDPOINT":  # the spec: the generic one is a base URL
                endpoint = endpoint.rstrip("/") + _METRICS_PATH
    else:
        raise ConfigError(
            f"{name}.endpoint: required (or set {ENV_PREFIX}METRICS_ENDPOINT or "
            f"{ENV_PREFIX}ENDPOINT)"
        )
    if "insecure" in table:
        if not isinstance(table["insecure"], bool):
            raise ConfigError(f"{name}.insecure: expected true or false")
        if table["insecure"] and protocol == "http/protobuf":
            raise ConfigError(
                f"{name}.insecure: applies to grpc only; for http/protobuf the endpoint's "
                "scheme decides (http:// is plaintext)"
            )
        values["insecure"] = table["insecure"]
    elif (found := _from_env("insecure", env)) is not None:  # checked even where unused
        # The spec: the variable matters only for a grpc endpoint without a scheme.
        if protocol == "grpc" and "://" not in endpoint:
            values["insecure"] = found[0]
    values.update(endpoint=endpoint, protocol=protocol)
    merged = {**_DEFAULTS, **values}
    _check(merged["endpoint"], merged["protocol"], merged["interval_s"], merged["timeout_s"],
           merged["insecure"], merged["headers"], name)  # named after this table
    return OtlpExport(**merged)


def otlp_exports(
    value: object, *, env: Mapping[str, str], many: bool
) -> tuple[OtlpExport, ...]:
    """The exports an ``otlp`` entry of a parsed TOML file configures.

    Args:
        value: ``data.get("otlp")``: None (no table), a table, or (``many``) a list of
            tables (``[[otlp]]``).
        env: the environment; with no table, an endpoint variable alone makes one export.
        many: whether several exports are allowed (the collector: yes; the agent: one).

    Raises:
        ConfigError: as ``parse_otlp_table``; a list where one table is allowed.
    """
    if value is None:
        if _from_env("endpoint", env) is None:
            return ()
        return (parse_otlp_table({}, env=env),)
    if isinstance(value, list):
        if not many:
            raise ConfigError("otlp: one export only: write [otlp], not [[otlp]]")
        if len(value) == 1:
            return (parse_otlp_table(value[0], env=env),)
        return tuple(parse_otlp_table(t, env=env, name=f"otlp[{i}]") for i, t in enumerate(value))
    return (parse_otlp_table(value, env=env),)
