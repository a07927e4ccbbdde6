"""Coverage-guided fuzzing of a live node with atheris (libFuzzer): each input is one call's bytes.

    .venv/bin/python -m tests.support.fuzz_atheris -runs=5000        # any libFuzzer flags: -max_total_time=600 ...

A tiny LLaMA node (layers 0:3, grpc.aio on 127.0.0.1) runs in this process, its `node` modules
instrumented for coverage. An input's first byte picks a method; the rest is split into messages
(a 2-byte big-endian length before each) and sent undecoded. A call that ends with INTERNAL, UNKNOWN
or a deadline is a crash, and so is a wrong result from the healthy session run every 100 inputs
(compared with plain transformers). The seeds are valid messages of every method.

Memory is checked here, not by libFuzzer's -rss_limit_mb: that reads the peak RSS (getrusage), which a
child started by subprocess inherits from its parent at exec, so under pytest it measured pytest's peak.
The healthy check fails when this process's current RSS has grown by more than POTLUCK_FUZZ_GROWTH_MB
(default 1024) since the first input."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["node"]):
    from common.wire import codec
    from common.wire.generated import potluck_pb2 as pb
    from node.config import NodeConfig
    from node.server import start_node

import grpc
import torch
from transformers import AutoModelForCausalLM

from tests.support.families import tiny_config
from tests.support.swarm_fixtures import BackgroundLoop

HIDDEN = 64
SERVICE = pb.DESCRIPTOR.services_by_name["Potluck"]
METHODS = [(f"/{SERVICE.full_name}/{m.name}", m.client_streaming) for m in SERVICE.methods]
METHODS.append(("/grpc.health.v1.Health/Check", False))
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
          grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}


def frame(method: int, messages: list[bytes]) -> bytes:
    return bytes([method]) + b"".join(len(m).to_bytes(2, "big") + m for m in messages)


def split(data: bytes) -> list[bytes]:
    messages = []
    while len(data) >= 2:
        size = int.from_bytes(data[:2], "big")
        messages.append(data[2 : 2 + size])
        data = data[2 + size :]
    return messages


def seeds() -> list[bytes]:
    hidden = codec.encode_tensor(torch.randn(1, 2, HIDDEN))
    open_ = pb.SessionRequest(open=pb.OpenSession(session_id="seed", start=0, end=3, max_length=8, batch_size=1,
                                                  wire_dtype="float32")).SerializeToString()
    step = pb.SessionRequest(step=pb.Step(hidden=hidden, position_ids=codec.encode_tensor(torch.arange(2)[None]),
                                          attention_mask=codec.encode_tensor(torch.ones(1, 2, dtype=torch.int64)),
                                          step_id=1)).SerializeToString()
    by_name = {
        "Info": [b""],
        "Forward": [pb.ForwardRequest(start=0, end=3, hidden=hidden, wire_dtype="float32").SerializeToString()],
        "Inference": [open_, step, pb.SessionRequest(close=pb.CloseSession()).SerializeToString()],
        "Push": [pb.PushRequest(session_id="seed", step=pb.Step(hidden=hidden, step_id=9)).SerializeToString()],
        "Gossip": [pb.GossipRequest(records=[pb.SignedRecord(payload=b"\x80", public_key=b"k" * 32,
                                                             signature=b"s" * 64)]).SerializeToString()],
    }
    return [frame(i, by_name.get(path.rsplit("/", 1)[1], [b""])) for i, (path, _) in enumerate(METHODS)]


def resident_mb() -> float:
    """This process's current resident set (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Target:
    def __init__(self, address: str, folder: Path):
        self.channel = grpc.insecure_channel(address)
        self.count = 0
        self.growth_limit_mb = float(os.environ.get("POTLUCK_FUZZ_GROWTH_MB", "1024"))
        self.baseline_mb: float | None = None
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.manual_seed(5)
        self.inputs = torch.randn(1, 5, HIDDEN)
        with torch.no_grad():
            hidden, positions = self.inputs, torch.arange(5)[None]
            emb = model.model.rotary_emb(hidden, positions)
            for layer in model.model.layers[:3]:
                hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=emb)
        self.expected = hidden

    def __call__(self, data: bytes) -> None:
        self.count += 1
        if self.baseline_mb is None:
            self.baseline_mb = resident_mb()
        if self.count % 100 == 0:
            self.healthy()
            self.bounded_memory()
        path, streaming = METHODS[data[0] % len(METHODS)] if data else METHODS[0]
        messages = split(data[1:])
        try:
            if streaming:
                for _ in self.channel.stream_stream(path)(iter(messages), timeout=30):
                    pass
            else:
                self.channel.unary_unary(path)(messages[0] if messages else b"", timeout=30)
        except grpc.RpcError as error:
            if error.code() not in PROPER:
                raise RuntimeError(f"{path}: {error.code().name}: {error.details()}") from None

    def healthy(self) -> None:
        """A session of 5 tokens (prefill 3, 2 decode steps) equal to plain transformers."""
        requests = [pb.SessionRequest(open=pb.OpenSession(session_id=f"healthy-{self.count}", start=0, end=3,
                                                          max_length=5, batch_size=1, wire_dtype="float32"))]
        for start, end in [(0, 3), (3, 4), (4, 5)]:
            requests.append(pb.SessionRequest(step=pb.Step(hidden=codec.encode_tensor(self.inputs[:, start:end]),
                                                           position=start)))
        stream = self.channel.stream_stream(
            "/potluck.v1.Potluck/Inference",
            request_serializer=pb.SessionRequest.SerializeToString,
            response_deserializer=pb.SessionReply.FromString,
        )
        replies = list(stream(iter(requests), timeout=60))
        got = torch.cat([codec.decode_tensor(r.result.hidden) for r in replies[1:]], dim=1)
        torch.testing.assert_close(got, self.expected, rtol=1e-5, atol=1e-5)


    def bounded_memory(self) -> None:
        grown = resident_mb() - self.baseline_mb
        if grown > self.growth_limit_mb:
            raise RuntimeError(f"resident memory grew by {grown:.0f} MB over {self.count} inputs "
                               f"(limit {self.growth_limit_mb:.0f} MB)")


def main() -> None:
    work = Path(
        os.environ.get("POTLUCK_FUZZ_DIR") or tempfile.mkdtemp(prefix="potluck-atheris-")
    )  # the test's tmp_path
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).save_pretrained(work / "model")
    corpus = work / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(seeds()):
        (corpus / f"seed-{index}").write_bytes(seed)
    loop = BackgroundLoop()
    node = loop.run(start_node(NodeConfig(model=str(work / "model"), start=0, end=3, max_length=64, cache_tokens=1024,
                                          admission_wait=0.0, mdns=False, identity=str(work / "id.pem"))))
    target = Target(node.address, work / "model")
    atheris.Setup([*sys.argv, str(corpus)], target)
    atheris.Fuzz()  # exits the process when libFuzzer is done (-runs, -max_total_time)


if __name__ == "__main__":
    main()
