"""Who may call a node and what the path can read: the swarm key (HMAC call tokens, sealed gossip)
and TLS (certificates from files, or automatic ones endorsed by the node's ed25519 identity).

One `Security` value describes a process's choice; every channel and server port is made through it,
so plaintext, private and encrypted swarms share all other code."""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import hmac
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from common.swarm.records import node_id_of
from common.wire.caller import CALLER_METADATA, caller_token

log = logging.getLogger(__name__)

KEY_PREFIX = "potluck-swarm-key-v1:"
AUTH_METADATA = "potluck-auth"          # the call token's metadata key
TOKEN_WINDOW = 120.0                    # seconds a token stays valid after the time it is stamped with
TOKEN_FUTURE = 30.0                     # seconds a token may be stamped ahead of the node's clock (clock skew;
                                        # `potluck doctor` warns past 30 s); later stamps are refused
UNAUTHENTICATED_MESSAGE = "this node serves a private swarm: calls need the swarm's key (--swarm-key)"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # health says nothing about the swarm; probes need no key
TLS_NAME = "potluck-node"                # the name automatic certificates are issued to (and checked for)
ENDORSEMENT_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # identity public key + its signature


class SecurityError(ValueError):
    """A key or certificate that cannot be used; the message says which and why."""


# -- the swarm key --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwarmKey:
    """A private swarm's shared secret. Members prove it on every call; gossip is sealed with it."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise SecurityError("a swarm key needs at least 16 bytes of secret")

    @classmethod
    def generate(cls) -> "SwarmKey":
        return cls(secrets.token_bytes(32))

    @classmethod
    def parse(cls, text: str, source: str = "swarm key") -> "SwarmKey":
        text = text.strip()
        if not text.startswith(KEY_PREFIX):
            raise SecurityError(f"{source}: not a Potluck swarm key (make one with `potluck swarm-key new FILE`)")
        try:
            return cls(bytes.fromhex(text[len(KEY_PREFIX):]))
        except ValueError:
            raise SecurityError(f"{source}: the key is not hexadecimal") from None

    @classmethod
    def load(cls, path: str | Path) -> "SwarmKey":
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise SecurityError(f"--swarm-key {path}: {error.strerror or error}") from None
        return cls.parse(text, f"--swarm-key {path}")

    def text(self) -> str:
        return KEY_PREFIX + self.secret.hex()

    def write(self, path: str | Path) -> None:
        """Write the key to a new file readable by its owner only."""
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.text() + "\n")

    def _derive(self, purpose: bytes, length: int = 32) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=b"potluck/" + purpose).derive(self.secret)

    @property
    def tag(self) -> str:
        """A public name for the swarm (mDNS): members recognise each other; it reveals nothing of the key."""
        return self._derive(b"tag", 8).hex()

    def token(self, method: str, now: float | None = None, nonce: str | None = None) -> str:
        """A one-time proof of membership for one call of `method`."""
        stamp = int((time.time() if now is None else now) * 1000)
        nonce = nonce or secrets.token_hex(12)
        return f"v1.{stamp}.{nonce}.{self._mac(method, stamp, nonce)}"

    def _mac(self, method: str, stamp: int, nonce: str) -> str:
        message = f"v1.{stamp}.{nonce}.{method}".encode()
        return hmac.new(self._derive(b"calls"), message, hashlib.sha256).hexdigest()

    def seal(self, data: bytes) -> bytes:
        """Encrypt and authenticate gossip (records of a private swarm never leak into another)."""
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(self._derive(b"records")).encrypt(nonce, data, b"potluck-records")

    def unseal(self, data: bytes) -> bytes | None:
        """The sealed bytes' content, or None when they were not sealed with this key."""
        if len(data) < 28:
            return None
        try:
            return AESGCM(self._derive(b"records")).decrypt(data[:12], data[12:], b"potluck-records")
        except InvalidTag:
            return None


class TokenChecker:
    """The node's side: a token must be well formed, fresh, made with the key for this method, and new."""

    def __init__(self, key: SwarmKey, window: float = TOKEN_WINDOW, max_nonces: int = 1_000_000,
                 future: float = TOKEN_FUTURE):
        self.key = key
        self.window = window
        self.future = min(future, window)  # a token lives at most window + future: its nonce is kept that long
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten
        self._lock = threading.Lock()

    def check(self, method: str, token: str | None, now: float | None = None) -> str | None:
        """None if the call may proceed; otherwise why not (for the node's log, not for the caller)."""
        if not token:
            return "no swarm token"
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit() or not 16 <= len(parts[2]) <= 64:
            return "malformed swarm token"
        stamp, nonce, mac = int(parts[1]), parts[2], parts[3]
        now = time.time() if now is None else now
        if now - stamp / 1000 > self.window:
            return "stale swarm token (or clocks more than %.0fs apart)" % self.window
        if stamp / 1000 - now > self.future:
            return "swarm token stamped in the future (or clocks more than %.0fs apart)" % self.future
        if not hmac.compare_digest(mac, self.key._mac(method, stamp, nonce)):
            return "wrong swarm key"
        with self._lock:
            self._forget(now)
            if nonce in self._seen:
                return "replayed swarm token"
            if len(self._seen) >= self.max_nonces:
                return "too many calls in the token window"
            self._seen[nonce] = now + 2 * self.window
        return None

    def _forget(self, now: float) -> None:
        while self._seen:
            nonce, expiry = next(iter(self._seen.items()))
            if expiry > now:
                break
            del self._seen[nonce]


def _metadata_value(metadata, key: str) -> str | None:
    for item in metadata or ():
        name, value = (item.key, item.value) if hasattr(item, "key") else item
        if name == key:
            return value.decode() if isinstance(value, bytes) else value
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call without a valid, fresh, unused swarm token (health checks excepted)."""

    def __init__(self, checker: TokenChecker, on_reject=None):
        self.checker = checker
        self.on_reject = on_reject  # called with the reason (metrics), or None
        self.rejected = 0

    async def intercept_service(self, continuation, details):
        method = details.method
        if method.startswith(OPEN_METHODS):
            return await continuation(details)
        reason = self.checker.check(method, _metadata_value(details.invocation_metadata, AUTH_METADATA))
        if reason is None:
            return await continuation(details)
        self.rejected += 1
        log.info("rejected a call to %s: %s", method, reason)
        if self.on_reject is not None:
            self.on_reject(reason)
        handler = await continuation(details)
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover  (makes this an async generator, as streaming handlers are)

    if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED, which tells nothing either
        return None
    streaming = handler.response_streaming
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, streaming)]
    return make(deny_stream if streaming else deny, request_deserializer=None, response_serializer=None)


class _TokenAdder:
    """Adds a fresh swarm token (`key`) and this client's proof of identity (`caller`, common/wire/caller.py) to
    every call on the channel."""

    def __init__(self, key: SwarmKey | None, caller: Ed25519PrivateKey | None = None):
        self.key = key
        self.caller = caller
        self._proof = (0, "")  # (second, caller token): one signature a second, not one a call

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
        if self.key is not None:
            metadata.add(AUTH_METADATA, self.key.token(method))
        if self.caller is not None:
            now = int(time.time())
            if self._proof[0] != now:
                self._proof = (now, caller_token(self.caller, now))
            metadata.add(CALLER_METADATA, self._proof[1])
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# grpc.aio files each interceptor under the first call kind it implements: one class per kind.
class _UnaryUnaryAuth(_TokenAdder, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStreamAuth(_TokenAdder, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnaryAuth(_TokenAdder, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStreamAuth(_TokenAdder, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def _client_interceptors(key: SwarmKey | None, caller: Ed25519PrivateKey | None = None) -> list | None:
    if key is None and caller is None:
        return None
    return [kind(key, caller) for kind in (_UnaryUnaryAuth, _UnaryStreamAuth, _StreamUnaryAuth, _StreamStreamAuth)]


# -- TLS ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerCertificate:
    """The certificate chain and key a node presents."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @classmethod
    def load(cls, cert_path: str, key_path: str) -> "ServerCertificate":
        try:
            return cls(Path(cert_path).read_bytes(), Path(key_path).read_bytes())
        except OSError as error:
            raise SecurityError(f"--tls-cert/--tls-key: {error.filename}: {error.strerror}") from None


def endorsed_certificate(identity: Ed25519PrivateKey) -> ServerCertificate:
    """An automatic TLS certificate for a node: an ECDSA P-256 key derived from its identity (so the same
    on every start), self-signed, carrying the identity's public key and its signature over the TLS key.
    gRPC's TLS cannot use ed25519 keys itself; the endorsement ties the certificate to the node id."""
    seed = identity.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())
    scalar = int.from_bytes(HKDF(hashes.SHA256(), 48, None, b"potluck/tls-key").derive(seed), "big")
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    tls_key = ec.derive_private_key(scalar % (order - 1) + 1, ec.SECP256R1())
    spki = tls_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = identity.public_key().public_bytes_raw()
    endorsement = public + identity.sign(b"potluck-tls-endorsement" + spki)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(tls_key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(spki).digest()[:16], "big") >> 1)
        .not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(2124, 1, 1, tzinfo=datetime.timezone.utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ENDORSEMENT_OID, endorsement), critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    key_pem = tls_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return ServerCertificate(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def endorser(cert_pem: bytes) -> str:
    """The node id whose identity key endorsed this automatic certificate; SecurityError if none did."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        value = cert.extensions.get_extension_for_oid(ENDORSEMENT_OID).value.value
    except (ValueError, x509.ExtensionNotFound):
        raise SecurityError("the certificate carries no Potluck identity endorsement") from None
    public, signature = value[:32], value[32:]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, b"potluck-tls-endorsement" + spki)
    except (InvalidSignature, ValueError):
        raise SecurityError("the certificate's identity endorsement does not verify") from None
    return node_id_of(public)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def fetch_certificate(address: str, timeout: float = 3.0) -> bytes:
    """The certificate a node presents (read in a TLS handshake that trusts nothing yet)."""
    host, port = _split(address)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der).encode()


# -- what a process chooses ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Security:
    """A process's choice. Nodes and clients of one swarm must agree on the key and on TLS.

    tls: "off" (plaintext), "auto" (nodes present certificates endorsed by their identity; dialers pin
    what a node presents to the identity it claims), or "ca" (certificates from files, checked against
    `ca_pem`)."""

    swarm_key: SwarmKey | None = None
    tls: str = "off"
    ca_pem: bytes | None = None              # tls="ca": trusted roots for dialing
    server_name: str | None = None           # tls="ca": the name certificates are checked for (default: host)
    certificate: ServerCertificate | None = None  # a node's own (tls="ca": from files; "auto": made at start)
    caller: Ed25519PrivateKey | None = None  # a client's identity, proved on every call (nodes' quotas key by it)
    _pins: dict = field(default_factory=dict, compare=False, repr=False)  # address -> (certificate PEM, endorser)

    def __post_init__(self) -> None:
        if self.tls not in ("off", "auto", "ca"):
            raise SecurityError(f"tls {self.tls!r}: expected off, auto or ca")
        if self.tls == "ca" and self.ca_pem is None and self.certificate is None:
            raise SecurityError("TLS with certificates needs --tls-ca (to dial) or --tls-cert/--tls-key (to serve)")

    @property
    def private(self) -> bool:
        return self.swarm_key is not None

    @property
    def encrypted(self) -> bool:
        return self.tls != "off"

    # -- dialing ---------------------------------------------------------------------------------------
    def channel(self, address: str, options=()) -> grpc.aio.Channel:
        """A channel to `address` with this process's protection (auto TLS: the first dial of an address
        reads its certificate, see `prefetch`)."""
        interceptors = _client_interceptors(self.swarm_key, self.caller)
        if self.tls == "off":
            return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
        credentials, extra = self._tls_target(address)
        return grpc.aio.secure_channel(address, credentials, options=list(options) + extra, interceptors=interceptors)

    def sync_channel(self, address: str, options=()) -> grpc.Channel:
        """A blocking channel (tools and tests); the swarm token is added per call with `call_metadata`."""
        if self.tls == "off":
            return grpc.insecure_channel(address, options=list(options))
        credentials, extra = self._tls_target(address)
        return grpc.secure_channel(address, credentials, options=list(options) + extra)

    def _tls_target(self, address: str) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
        """What a TLS dial of `address` trusts, and the name it checks the certificate for."""
        if self.tls == "auto":
            roots, name = self._pinned(address), TLS_NAME
        else:
            roots, name = self.ca_pem or self.certificate.cert_pem, self.server_name
        extra = [("grpc.ssl_target_name_override", name)] if name else []
        return grpc.ssl_channel_credentials(root_certificates=roots), extra

    def call_metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        return ((AUTH_METADATA, self.swarm_key.token(method)),) if self.swarm_key is not None else ()

    def _pinned(self, address: str) -> bytes:
        if address not in self._pins:
            try:
                pem = fetch_certificate(address)
                node = endorser(pem)  # an automatic certificate, endorsed by some identity (Info names which)
            except (OSError, SecurityError) as error:
                log.info("no usable certificate from %s: %s", address, error)
                return _unusable_root()  # calls fail with UNAVAILABLE, as for an unreachable node
            self._pins[address] = (pem, node)
        return self._pins[address][0]

    async def prefetch(self, address: str) -> None:
        """Read (and pin) a node's automatic certificate off the event loop, before dialing it."""
        if self.tls == "auto" and address not in self._pins:
            await asyncio.to_thread(self._pinned, address)

    def pinned_node(self, address: str) -> str | None:
        """The node id the certificate pinned for `address` was endorsed by (auto TLS), else None."""
        pin = self._pins.get(address)
        return pin[1] if pin is not None else None

    # -- serving ---------------------------------------------------------------------------------------
    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls == "off":
            return server.add_insecure_port(address)
        cert = self.certificate
        credentials = grpc.ssl_server_credentials([(cert.key_pem, cert.cert_pem)])
        return server.add_secure_port(address, credentials)

    def server_interceptors(self, on_reject=None) -> list[grpc.aio.ServerInterceptor]:
        if self.swarm_key is None:
            return []
        return [AuthInterceptor(TokenChecker(self.swarm_key), on_reject)]

    def for_node(self, identity: Ed25519PrivateKey) -> "Security":
        """This choice completed for a node: auto TLS gets the node's endorsed certificate."""
        if self.tls == "auto" and self.certificate is None:
            return replace(self, certificate=endorsed_certificate(identity), _pins={})
        return self


@functools.cache
def _unusable_root() -> bytes:
    """A root certificate that trusts nothing any node presents."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "potluck-unusable")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2024, 1, 1))
            .not_valid_after(datetime.datetime(2124, 1, 1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


PLAINTEXT = Security()


def load_security(
    swarm_key: str | None = None,
    tls: str = "off",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
) -> Security:
    """A Security from file names (the CLI's and NodeConfig's flags); SecurityError names what is wrong."""
    key = SwarmKey.load(swarm_key) if swarm_key else None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise SecurityError("give both --tls-cert and --tls-key, or neither")
        tls = "ca"
    certificate = ServerCertificate.load(tls_cert, tls_key) if tls_cert else None
    ca_pem = None
    if tls_ca:
        try:
            ca_pem = Path(tls_ca).read_bytes()
        except OSError as error:
            raise SecurityError(f"--tls-ca {tls_ca}: {error.strerror or error}") from None
    return Security(swarm_key=key, tls=tls, ca_pem=ca_pem, server_name=tls_server_name, certificate=certificate)
