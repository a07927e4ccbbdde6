"""Container health check: is the Potluck node (or API) in this container serving?

    python healthcheck.py                          # gRPC health of 127.0.0.1:7000, service potluck.v1.Potluck
    python healthcheck.py 127.0.0.1:31337          # another address
    python healthcheck.py http://127.0.0.1:8000/   # `potluck api`: any HTTP answer below 500

Exit 0 when healthy, 1 otherwise (what Docker's HEALTHCHECK expects). The node's health service
reports "" SERVING as soon as it listens and "potluck.v1.Potluck" SERVING once its layers are
loaded (NOT_SERVING while loading, re-balancing or draining). Health calls need no swarm key.
POTLUCK_HEALTH_TLS=auto dials a node started with `tls = "auto"`: it trusts the certificate the
node presents (the probe only asks the node about itself). Standard library, grpcio and
grpcio-health-checking only: it runs every few seconds and must start fast."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

SERVICE = "potluck.v1.Potluck"
TLS_NAME = "potluck-node"  # the name automatic certificates are issued to (common/wire/security.py)


def _channel(address: str, tls: str):
    import grpc

    if tls == "off":
        return grpc.insecure_channel(address)
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    import socket

    with socket.create_connection((host.strip("[]"), int(port)), timeout=3) as raw, context.wrap_socket(raw) as conn:
        pem = ssl.DER_cert_to_PEM_cert(conn.getpeercert(binary_form=True)).encode()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(pem),
                               options=[("grpc.ssl_target_name_override", TLS_NAME)])


def grpc_healthy(address: str, service: str = SERVICE, tls: str = "off", timeout: float = 5.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with _channel(address, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
    except (grpc.RpcError, OSError) as error:
        print(f"unhealthy: {address}: {error}", file=sys.stderr)
        return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(
            f"unhealthy: {address} {service or '(server)'}: "
            f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
            file=sys.stderr,
        )
        return False
    return True


def http_healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status < 500
    except urllib.error.HTTPError as error:
        return error.code < 500  # 401 without the API key still means the server answers
    except OSError as error:
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    target = argv[0] if argv else os.environ.get("POTLUCK_HEALTH_ADDRESS", "127.0.0.1:7000")
    if target.startswith(("http://", "https://")):
        return 0 if http_healthy(target) else 1
    service = os.environ.get("POTLUCK_HEALTH_SERVICE", SERVICE)
    return 0 if grpc_healthy(target, service, os.environ.get("POTLUCK_HEALTH_TLS", "off")) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
