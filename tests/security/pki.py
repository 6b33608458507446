"""A throwaway PKI made with the openssl CLI: CAs, server and client certificates.

EC P-256 keys (fast to make). ``Pki.issue`` signs with ``openssl x509 -req``;
``expired=True`` signs with ``openssl ca -startdate/-enddate`` instead, which sets a
validity window in the past (OpenSSL 3.0 has no ``x509 -not_after``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")


def openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {proc.stderr}")


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

_CA_CNF = """\
[ca]
default_ca = rooftop
[rooftop]
database = {db}/index.txt
new_certs_dir = {db}
serial = {db}/serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
"""


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    def pem(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._serial = 1000

    def ca(self, name: str) -> Path:
        """A self-signed CA; returns its certificate (``NAME.crt``, key ``NAME.key``)."""
        openssl("req", "-x509", *_EC, "-days", "3", "-keyout", f"{name}.key",
                "-out", f"{name}.crt", "-subj", f"/CN={name}", cwd=self.root)  # fmt: skip
        return self.root / f"{name}.crt"

    def issue(
        self,
        name: str,
        *,
        ca: str,
        cn: str,
        sans: tuple[str, ...] = (),
        usage: str = "clientAuth",
        expired: bool = False,
    ) -> Cert:
        """A certificate for ``cn`` (SANs like ``DNS:agent-1``, ``IP:127.0.0.1``).

        ``usage`` is the extended key usage: ``serverAuth`` for the collector,
        ``clientAuth`` for agents and operators (as docs/SECURITY.md makes them).
        """
        d = self.root
        openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
        ext = d / f"{name}.ext"
        ext.write_text((f"subjectAltName={','.join(sans)}\n" if sans else "")
                       + f"extendedKeyUsage={usage}\n")  # fmt: skip
        self._serial += 1
        if expired:
            db = d / f"{name}.db"
            db.mkdir()
            (db / "index.txt").touch()
            (db / "serial").write_text(f"{self._serial:04X}\n")
            cnf = d / f"{name}.cnf"
            cnf.write_text(_CA_CNF.format(db=db))
            openssl("ca", "-batch", "-config", str(cnf), "-cert", f"{ca}.crt",
                    "-keyfile", f"{ca}.key", "-in", f"{name}.csr", "-out", f"{name}.crt",
                    "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
                    "-notext", "-extfile", str(ext), cwd=d)  # fmt: skip
        else:
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt",
                    "-CAkey", f"{ca}.key", "-set_serial", str(self._serial), "-days", "2",
                    "-out", f"{name}.crt", "-extfile", str(ext), cwd=d)  # fmt: skip
        return Cert(d / f"{name}.crt", d / f"{name}.key")


def replace_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` beside ``target`` and rename it over: readers never see half a file."""
    tmp = target.with_name(target.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, target)
