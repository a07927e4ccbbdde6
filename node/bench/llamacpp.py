"""llama.cpp beside the swarm, for `potluck bench-perf --llama-cpp`.

Runs llama.cpp's own `llama-bench` on GGUF files of the same weights: first on the file the swarm serves (for
the demo: the Q4_1 GGUF itself, whose values the nodes hold bit for bit), then on any other (an F32
conversion, say); each once in one process and once over llama.cpp's RPC backend with rpc servers on loopback
(one thread each, every layer on the servers). Its decode figure (`tg`) is tokens/s over the generated tokens
only, as bench-perf's is.

llama.cpp is not a dependency: `deploy/llamacpp.sh` builds it from the `llama-cpp-python` source package
and converts the model folder to an F32 GGUF; this module only runs the binaries it made."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.weights.gguf import read_header

RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")  # the name changed in 2025


@dataclass(frozen=True)
class LlamaCpp:
    bench: Path        # llama-bench
    rpc_server: Path   # ggml-rpc-server (or rpc-server in older builds)
    gguf: Path
    batched: Path | None = None  # llama-batched-bench (builds before 2026-12 lack it)

    @classmethod
    def find(cls, build: str | Path, gguf: str | Path) -> "LlamaCpp":
        """The binaries under `build` (its bin/ or itself) and the model file; ValueError saying what is missing."""
        build, gguf = Path(build).expanduser(), Path(gguf).expanduser()
        folders = [build / "bin", build]
        bench = next((f / "llama-bench" for f in folders if (f / "llama-bench").is_file()), None)
        server = next((f / n for n in RPC_SERVER_NAMES for f in folders if (f / n).is_file()), None)
        if bench is None or server is None:
            raise ValueError(f"--llama-cpp {build}: no llama-bench and {' or '.join(RPC_SERVER_NAMES)} in it or its "
                             "bin/ (build them with deploy/llamacpp.sh)")
        if not gguf.is_file():
            raise ValueError(f"--llama-gguf {gguf}: no such file (deploy/llamacpp.sh converts the model folder)")
        batched = next((f / "llama-batched-bench" for f in folders if (f / "llama-batched-bench").is_file()), None)
        return cls(bench, server, gguf, batched)

    def decode_tps(self, tokens: int, threads: int, rpc: list[str] | None = None, repeats: int = 1) -> list[float]:
        """llama-bench's decode tokens/s, one per repeat; `rpc`: run every layer on these rpc servers."""
        args = [str(self.bench), "-m", str(self.gguf), "-p", "0", "-n", str(tokens), "-t", str(threads),
                "-r", str(repeats), "-o", "jsonl"]
        if rpc:
            args += ["--rpc", ",".join(rpc), "-ngl", "99"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"llama-bench failed (exit {done.returncode}): {tail}")
        return decode_samples(done.stdout)


    def batched_decode(self, sessions: tuple[int, ...], prompt: int, tokens: int,
                       threads: int) -> dict[int, "BatchedRun"]:
        """llama-batched-bench: `n` sequences decoding together in one context, for each n in `sessions`, each
        after its own `prompt`-token prompt; None when this build has no llama-batched-bench."""
        if self.batched is None:
            raise ValueError("this llama.cpp build has no llama-batched-bench (rebuild with deploy/llamacpp.sh)")
        context = max(sessions) * (prompt + tokens) + 64
        args = [str(self.batched), "-m", str(self.gguf), "-c", str(context), "-b", "2048", "-ub", "512",
                "-npp", str(prompt), "-ntg", str(tokens), "-npl", ",".join(map(str, sessions)), "-t", str(threads),
                "--output-format", "jsonl"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"llama-batched-bench failed (exit {done.returncode}): {tail}")
        return batched_runs(done.stdout)


@dataclass(frozen=True)
class BatchedRun:
    """One llama-batched-bench line: `sessions` sequences, each `prompt` tokens then `tokens` new ones."""

    sessions: int
    prompt: int
    tokens: int
    prefill_s: float   # all prompts
    decode_s: float    # all new tokens

    @property
    def aggregate_tps(self) -> float:
        """New tokens over the whole run (prompts included in the time), as bench-perf's aggregate."""
        return self.sessions * self.tokens / (self.prefill_s + self.decode_s)

    @property
    def decode_tps(self) -> float:
        """New tokens over the decode time only (llama.cpp's S_TG), as bench-perf's "while all decode"."""
        return self.sessions * self.tokens / self.decode_s


def batched_runs(jsonl: str) -> dict[int, BatchedRun]:
    """llama-batched-bench's `--output-format jsonl` lines, by sequence count."""
    runs: dict[int, BatchedRun] = {}
    for line in jsonl.splitlines():
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            runs[int(r["pl"])] = BatchedRun(int(r["pl"]), int(r["pp"]), int(r["tg"]), float(r["t_pp"]),
                                            float(r["t_tg"]))
    if not runs:
        raise RuntimeError("llama-batched-bench printed no result")
    return runs


def gguf_kind(path: Path) -> str:
    """The type most of a GGUF file's matrices are stored in ("Q4_1", "F32", ...): what the table calls it."""
    header = read_header(Path(path))
    kinds = Counter(entry.qtype.name for entry in header.tensors.values() if len(entry.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else "?"


def decode_samples(jsonl: str) -> list[float]:
    """The per-repeat tokens/s of llama-bench's decode tests (`-o jsonl` output; prompt tests are skipped)."""
    samples: list[float] = []
    for line in jsonl.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("n_gen", 0) > 0 and record.get("n_prompt", 0) == 0:
            samples += [float(x) for x in record.get("samples_ts") or [record["avg_ts"]]]
    if not samples:
        raise RuntimeError("llama-bench printed no decode result")
    return samples


class RpcServers:
    """`count` llama.cpp rpc servers on 127.0.0.1, `threads` each; a context manager that always stops them."""

    def __init__(self, binary: Path, count: int, threads: int = 1, timeout: float = 30.0):
        from node.bench.chains import free_port

        self.processes: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        try:
            for _ in range(count):
                port = free_port()
                self.processes.append(subprocess.Popen(
                    [str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self.addresses.append(f"127.0.0.1:{port}")
            for address, process in zip(self.addresses, self.processes):
                _wait_listening(address, process, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def __enter__(self) -> "RpcServers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()



def _wait_listening(address: str, process: subprocess.Popen, timeout: float) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the llama.cpp rpc server for {address} exited with {process.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the llama.cpp rpc server for {address} did not listen within {timeout:.0f} s")


@dataclass
class LlamaSide:
    """Decode tokens/s of llama.cpp and of the swarm, measured in turns (swarm, one process, RPC) per repeat."""

    servers: int
    swarm_tps: list[float]
    single_tps: list[float]
    rpc_tps: list[float]
    gguf: str = ""           # the file's name
    kind: str = "F32"        # what its matrices are stored as (gguf_kind)
    served: bool = False     # the very file the swarm serves (or was made from, value for value)
    label: str = ""          # what the swarm side ran, where not the main chain ("swarm, N nodes, push")

    @property
    def swarm_label(self) -> str:
        return self.label or f"swarm, {self.servers} node{'s' if self.servers > 1 else ''}, push"


def side_by_side(llama: LlamaCpp, swarm_model, ids, new_tokens: int, threads: int, servers: int,
                 repeats: int, served: bool = False, label: str = "") -> LlamaSide:
    """`swarm_model` (a warmed-up client over `servers` nodes) against llama.cpp in one process with `threads`
    threads and over `servers` rpc servers with one thread each, taking turns so that drift hits all three."""
    from node.bench.basic import timed_generate

    side = LlamaSide(servers, [], [], [], llama.gguf.name, gguf_kind(llama.gguf), served, label)
    with RpcServers(llama.rpc_server, servers, threads=1) as rpc:
        for _ in range(repeats):
            side.swarm_tps.append(timed_generate(swarm_model, ids, new_tokens).decode_tps)
            side.single_tps += llama.decode_tps(new_tokens, threads)
            side.rpc_tps += llama.decode_tps(new_tokens, threads, rpc=rpc.addresses)
    return side
