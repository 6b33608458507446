"""What the agent (and ``agentctl status``) presents to a collector, re-read when it changes.

TLS roots, an mTLS client certificate, a bearer token (``authorization: Bearer …``,
never over plaintext). Each stream asks for them again, and whichever file changed
since (mtime, size, inode) is read again (``rooftop.common.reloading``), so
certificates and tokens rotate without a restart.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import grpc

from rooftop.common.errors import ConfigError
from rooftop.common.reloading import ReloadingFile

__all__ = ["ClientAuth", "read_token", "with_tls_name"]

log = logging.getLogger(__name__)

_NAME_OVERRIDE = "grpc.ssl_target_name_override"


def read_token(path: Path) -> str:
    """The bearer token in ``path``: its first line that is neither blank nor a # comment.

    Raises:
        ConfigError: unreadable, empty, or not a valid header value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token_file {path}: cannot read: {_reason(exc)}") from exc
    for line in text.splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            if not all(33 <= ord(c) < 127 for c in token):
                raise ConfigError(f"token_file {path}: the token must be printable ASCII")
            return token
    raise ConfigError(f"token_file {path} holds no token")


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte offset {exc.start})"
    return exc.strerror or str(exc)


class ClientAuth:
    """TLS roots, an mTLS client certificate and a bearer token, re-read when they change.

    ``credentials()`` and ``metadata()`` are called once per stream (connection): a
    file whose mtime, size or inode changed since is read again, so rotation needs
    no restart. A file unusable *during* a rotation keeps the last good material
    (logged once per change); unusable at construction is a ``ConfigError``.

    Args:
        ca_file: PEM roots for the collector's certificate; None: the system roots.
        cert_file: PEM client certificate chain (mTLS), with ``key_file``.
        key_file: its private key.
        token_file: bearer token, sent as ``authorization: Bearer <token>``.
        server_name: the name to expect in the collector's certificate when it is not
            the address dialled (``grpc.ssl_target_name_override``).
        insecure: plaintext. Refused together with a token: it would travel in the clear.
    """

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        token_file: Path | None = None,
        server_name: str = "",
        insecure: bool = False,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise ConfigError("cert_file and key_file go together (mTLS)")
        if insecure and token_file is not None:
            raise ConfigError(
                "token_file: a bearer token is never sent over plaintext (insecure); use TLS"
            )
        if insecure and (ca_file or cert_file or server_name):
            raise ConfigError("insecure (plaintext) contradicts TLS files or server_name")
        self.insecure = insecure
        self._server_name = server_name
        tls_paths = (ca_file, cert_file, key_file)
        self._tls: ReloadingFile[grpc.ChannelCredentials] | None = None
        if not insecure:
            self._tls = ReloadingFile(
                tls_paths,
                lambda: _channel_credentials(*tls_paths),
                what="TLS files",
                log=log,
                describe=lambda old, new: "the next connection uses the new ones",
            )
        self._token: ReloadingFile[str] | None = None
        if token_file is not None:
            self._token = ReloadingFile(
                (token_file,),
                lambda: read_token(token_file),
                what="token file",
                log=log,
                describe=lambda old, new: (
                    "the next connection presents the new token" if new != old else None
                ),
            )

    @classmethod
    def from_config(cls, config: object) -> ClientAuth:
        """From anything with the agent config's ``ca_file`` … ``insecure`` attributes."""
        return cls(
            ca_file=getattr(config, "ca_file", None),
            cert_file=getattr(config, "cert_file", None),
            key_file=getattr(config, "key_file", None),
            token_file=getattr(config, "token_file", None),
            server_name=getattr(config, "server_name", ""),
            insecure=bool(getattr(config, "insecure", False)),
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials from the current files; None for plaintext."""
        return None if self._tls is None else self._tls.get()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """``authorization`` metadata from the current token file; empty without one."""
        if self._token is None:
            return ()
        return (("authorization", f"Bearer {self._token.get()}"),)

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the expected server name, when one is set."""
        return [(_NAME_OVERRIDE, self._server_name)] if self._server_name else []


def with_tls_name(
    options: list[tuple[str, str | int]], tls_name: str
) -> list[tuple[str, str | int]]:
    """``options`` that verify the certificate against ``tls_name``.

    ``tls_name``: the DNS name an address was resolved from; options that already name
    a server (``server_name``) win.
    """
    if tls_name and all(k != _NAME_OVERRIDE for k, _ in options):
        return [*options, (_NAME_OVERRIDE, tls_name)]
    return options


def _read_pem(key: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read: {exc.strerror or exc}") from exc


def _channel_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials:
    roots = _read_pem("ca_file", ca)
    chain = _read_pem("cert_file", cert)
    private = _read_pem("key_file", key)
    if cert is not None and key is not None:
        # gRPC finds a key that does not match its certificate only at the handshake;
        # ssl finds it now, naming both files (config check, start, a half-done rotation).
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password="")
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(f"key_file {key} does not match cert_file {cert}") from exc
            raise ConfigError(
                f"cert_file {cert} and key_file {key}: not a PEM certificate and its "
                f"unencrypted key ({exc.reason or exc})"
            ) from exc
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=private, certificate_chain=chain
    )
