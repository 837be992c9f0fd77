"""Certificates for a trial of TLS and mutual TLS: a CA, a server certificate and a client
certificate it signed, as PEM files (needs the ``cryptography`` package). For tests, benchmarks
and a first run on a lab network; a deployment uses its own PKI.

    python -m paradiffpolicy.remote.certificates certs/ gpu-box.lab
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CertificateFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: str | Path, host: str = "localhost", days: int = 30) -> CertificateFiles:
    """A CA, a certificate for ``host`` and a client certificate, valid ``days``, written to ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paradiffpolicy trial CA")])

    def issue(name: str, key, ca: bool, san: str | None):
        b = (x509.CertificateBuilder().subject_name(ca_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    def write(stem: str, cert, key) -> tuple[Path, Path]:
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        (out / f"{stem}.key").chmod(0o600)
        return out / f"{stem}.pem", out / f"{stem}.key"

    ca, _ = write("ca", issue("", ca_key, True, None), ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = write("server", issue(host, server_key, False, host), server_key)
    client = write("client", issue("paradiffpolicy client", client_key, False, None), client_key)
    return CertificateFiles(ca, *server, *client)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m paradiffpolicy.remote.certificates <directory> [host]")
    files = make_certificates(sys.argv[1], *sys.argv[2:])
    print("\n".join(f"{k}: {v}" for k, v in vars(files).items()))
