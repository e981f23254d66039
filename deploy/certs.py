"""
HTTPS for the native runtime (PUBLIC_SCHEME=https): a local certificate authority and a
certificate for APP_HOST and REALTIME_HOST, made with trustme under STATE_DIR/tls.

The CA is made once and kept, so a browser told to trust it keeps trusting it; the
certificate is issued again when the hosts change or it nears its end. With TLS_CERT_FILE
and TLS_KEY_FILE set, nothing is made: nginx serves those files.
"""

import base64
import datetime
import hashlib
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.exceptions import ImproperlyConfigured

CA_NAME = "Split Channels local CA"
# Publicly trusted certificates may not live longer than 398 days; keep to that locally too.
VALID_DAYS = 397
RENEW_DAYS = 30


def ensure_certificate(topology):
    """Make or renew what nginx serves; return the CA file that verifies it, None if not ours."""
    if topology.own_certificate:
        for path in (topology.tls_certificate, topology.tls_key):
            if not path.is_file():
                raise ImproperlyConfigured(f"{path} (TLS_CERT_FILE or TLS_KEY_FILE) is not a file.")
        return None
    folder = topology.tls_certificate.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_file, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    if ca_file.exists() and ca_key.exists():
        ca = trustme.CA.from_pem(ca_file.read_bytes(), ca_key.read_bytes())
    else:
        ca = trustme.CA(organization_name=CA_NAME)
        write_private(ca_key, ca.private_key_pem.bytes())
        ca_file.write_bytes(ca.cert_pem.bytes())
    hosts = sorted({topology.app_host, topology.realtime_host})
    if not is_current(topology.tls_certificate, hosts, ca_file):
        now = datetime.datetime.now(datetime.UTC)
        leaf = ca.issue_cert(
            *hosts, not_before=now, not_after=now + datetime.timedelta(days=VALID_DAYS)
        )
        write_private(topology.tls_key, leaf.private_key_pem.bytes())
        topology.tls_certificate.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    return ca_file


def is_current(cert_file: Path, hosts, ca_file: Path) -> bool:
    """True if `cert_file` names exactly `hosts`, was issued by this CA and is not near its end."""
    if not cert_file.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    renew_at = cert.not_valid_after_utc - datetime.timedelta(days=RENEW_DAYS)
    return (
        sorted(names.get_values_for_type(x509.DNSName)) == hosts
        and cert.issuer == ca.subject
        and datetime.datetime.now(datetime.UTC) < renew_at
    )


def spki_hash(cert_file: Path) -> str:
    """The base64 SHA-256 of the certificate's public key, as Chromium's
    --ignore-certificate-errors-spki-list takes it."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def write_private(path: Path, data: bytes):
    # Created readable by its owner alone before anything secret is written into it.
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)
