"""The committed stubs are exactly what protos/generate.sh makes from protos/potluck.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "common" / "wire" / "generated"


def test_stubs_are_reproducible(tmp_path):
    subprocess.run(["bash", "protos/generate.sh", str(tmp_path)], cwd=ROOT, check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    names = sorted(p.name for p in tmp_path.glob("potluck_pb2*"))
    assert names == ["potluck_pb2.py", "potluck_pb2.pyi", "potluck_pb2_grpc.py"]
    for name in names:
        assert (tmp_path / name).read_text() == (GENERATED / name).read_text(), f"{name} is stale: run `make protos`"


def test_health_service_is_registered(bg_loop, tiny_model_dir):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    node = bg_loop.start_node(tiny_model_dir("llama"), 0, 6)
    try:
        with grpc.insecure_channel(node.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "potluck.v1.Potluck"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        bg_loop.stop_node(node)
