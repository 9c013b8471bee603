"""The container files agree with the code: real `graddiag` commands, real settings, declared volumes.

No Docker engine is needed: docker-compose.yml and docker-compose.gpu.yml are read with PyYAML and the
Dockerfile with a small parser of its instructions.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from graddiag.service.cli import build_parser
from graddiag.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PREFIX = Settings.model_config["env_prefix"]
GPU_RESERVATION = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
# Services of docker-compose.yml that do not run a graddiag command: Ray nodes run `ray start`, and
# PostgreSQL runs its image's own command.
RAY_NODES = {"ray-head", "ray-worker"}
IMAGE_COMMAND = {"postgres"}
DIST = "dist"


# -- helpers -------------------------------------------------------------------------------------------


def load_yaml(name: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(data, dict), name
    return data


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped, as Docker does."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def build_args() -> dict[str, str]:
    args = {}
    for keyword, arguments in dockerfile():
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            args[name] = default
    return args


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile():
        if keyword == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def position(predicate: Any) -> int:
    """Index of the first Dockerfile instruction matching predicate(keyword, arguments)."""
    for index, (keyword, arguments) in enumerate(dockerfile()):
        if predicate(keyword, arguments):
            return index
    raise AssertionError("no such Dockerfile instruction")


def check_command(command: list[str]) -> Any:
    """argparse's namespace for a `graddiag ...` command line; a SystemExit fails the test."""
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), command
    assert command[0] == "graddiag", f"{command}: not a graddiag command"
    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit as exc:
        pytest.fail(f"{command} is not a valid graddiag command line (exit {exc.code})")
    # The flags' values must pass the Settings validation too, as `graddiag serve/worker` applies them.
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    Settings.model_validate(given)
    return args


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's volumes, short or long syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
            continue
        # ${VAR:-default} may hold a colon; split the short syntax around the interpolations.
        parts = re.findall(r"(?:\$\{[^}]*\}|[^:])+", volume)
        source, target, *mode = parts
        found.append((source, target, "ro" in ",".join(mode).split(",")))
    return found


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def default_services(compose: dict[str, Any]) -> dict[str, Any]:
    """The services `docker compose up` starts: those without a profile."""
    return {name: service for name, service in compose["services"].items() if not service.get("profiles")}


def dist_services(compose: dict[str, Any]) -> dict[str, Any]:
    return {name: service for name, service in compose["services"].items() if DIST in service.get("profiles", [])}


def graddiag_services(services: dict[str, Any]) -> dict[str, Any]:
    return {name: service for name, service in services.items() if name not in RAY_NODES | IMAGE_COMMAND}


def ray_start_flags(command: list[str]) -> dict[str, str]:
    """`ray start` flags of a Ray node's command, as {flag: value} ('' for switches)."""
    assert command[:2] == ["ray", "start"], command
    flags = {}
    for part in command[2:]:
        assert part.startswith("--"), f"{command}: {part!r} is not a --flag[=value]"
        name, _, value = part.partition("=")
        flags[name] = value
    return flags


def assert_setting_names(names: list[str] | set[str], where: str) -> None:
    for name in names:
        if name.startswith(PREFIX):
            assert name[len(PREFIX) :].lower() in Settings.model_fields, f"{where}: {name} is not a graddiag setting"


# -- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_services_run_real_graddiag_commands() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    assert {"api", "worker"} <= set(services)
    for name, service in graddiag_services(services).items():
        assert "command" in service, f"{name}: no command"
        check_command(service["command"])
    for name in IMAGE_COMMAND:
        assert "command" not in services[name], f"{name} runs its image's own command"
    for name in RAY_NODES:
        assert "--block" in ray_start_flags(services[name]["command"]), f"{name}: ray start must stay in front"

    api = check_command(services["api"]["command"])
    assert api.command == "serve" and api.workers == "0" and api.host == "0.0.0.0"
    assert check_command(services["worker"]["command"]).command == "worker"


def test_compose_environment_uses_real_settings() -> None:
    compose = load_yaml("docker-compose.yml")
    for name, service in compose["services"].items():
        env = environment(service)
        assert_setting_names(set(env), f"service {name}")
        settings = {
            key[len(PREFIX) :].lower(): value
            for key, value in env.items()
            if key.startswith(PREFIX) and "${" not in value
        }
        Settings.model_validate(settings)  # the values validate too


def test_compose_volumes_are_declared_and_shared() -> None:
    compose = load_yaml("docker-compose.yml")
    declared = set(compose.get("volumes") or {})
    services = compose["services"]
    for name, service in services.items():
        for source, target, _ in mounts(service):
            assert target.startswith("/"), f"{name}: {target}"
            if is_named_volume(source):
                assert source in declared, f"{name}: volume {source!r} is not in the top-level volumes"

    # Every service of the default stack sees the same SQLite file: its directory is one named volume.
    databases = set()
    for name, service in default_services(compose).items():
        url = environment(service)["GRADDIAG_DB_URL"]
        assert url.startswith("sqlite:////"), url
        directory = str(Path(urlsplit(url).path[1:]).parent)
        (volume,) = [source for source, target, ro in mounts(service) if target == directory and not ro]
        assert is_named_volume(volume), f"{name}: the database directory {directory} is not on a named volume"
        databases.add((volume, url))
    assert len(databases) == 1, databases


def test_compose_data_directory_is_mounted_read_only() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    for name, service in graddiag_services(services).items():
        data_dir = environment(service)["GRADDIAG_DATA_DIR"]
        (mount,) = [(source, ro) for source, target, ro in mounts(service) if target == data_dir]
        assert mount == ("${GRADDIAG_DATA_DIR:-./data/cifar10}", True), f"{name}: {mount}"


def test_compose_api_is_checked_and_workers_wait_for_it() -> None:
    compose = load_yaml("docker-compose.yml")
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    port = check_command(api["command"]).port
    probe = " ".join(api["healthcheck"]["test"])
    assert api["healthcheck"]["test"][0] == "CMD" and f"127.0.0.1:{port}/healthz" in probe
    assert any(str(p).endswith(f":{port}") for p in api["ports"])
    # The API migrates the database before it is healthy; workers start after that.
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    replicas = worker["deploy"]["replicas"]
    assert isinstance(replicas, int) and replicas >= 1
    assert "container_name" not in worker  # a scaled service cannot have one


def test_gpu_reservation_only_in_the_override() -> None:
    base, gpu = load_yaml("docker-compose.yml"), load_yaml("docker-compose.gpu.yml")
    # CPU-only hosts must be able to start the base file: no device reservation anywhere in it.
    assert "devices" not in json.dumps(base) and "nvidia" not in json.dumps(base)
    assert set(gpu["services"]) <= set(base["services"])
    # The trainers get GPUs: local workers, and the Ray workers (Ray counts them and places GPU runs there).
    assert set(gpu["services"]) == {"worker", "ray-worker"}
    for name, service in gpu["services"].items():
        assert service["deploy"]["resources"]["reservations"]["devices"] == [GPU_RESERVATION], name
        assert "cpu" not in service["build"]["args"]["TORCH_INDEX_URL"], name
        assert service["image"] != base["services"][name]["image"], f"{name}: a CUDA build needs its own tag"
    # The Ray workers' GPU image still has the dist extra, like the CPU one.
    assert (
        gpu["services"]["ray-worker"]["build"]["args"]["EXTRAS"]
        == base["services"]["ray-worker"]["build"]["args"]["EXTRAS"]
    )


# -- docker-compose.yml: the dist profile ------------------------------------------------------------


def test_dist_profile_runs_postgres_a_ray_cluster_the_api_and_the_dispatcher() -> None:
    compose = load_yaml("docker-compose.yml")
    dist = dist_services(compose)
    assert set(dist) == {"postgres", "ray-head", "ray-worker", "api-dist", "dispatcher"}
    assert all(service["profiles"] == [DIST] for service in dist.values())
    assert set(default_services(compose)) == {"api", "worker"}  # `docker compose up` is unchanged

    api = check_command(dist["api-dist"]["command"])
    assert api.command == "serve" and api.workers == "0" and api.host == "0.0.0.0"
    probe = " ".join(dist["api-dist"]["healthcheck"]["test"])
    assert f"127.0.0.1:{api.port}/healthz" in probe

    # The dispatcher connects as a Ray Client to the head's client server, after the API migrated the schema.
    dispatcher = check_command(dist["dispatcher"]["command"])
    assert dispatcher.command == "dispatch"
    head = ray_start_flags(dist["ray-head"]["command"])
    assert dispatcher.ray_address == f"ray://ray-head:{head['--ray-client-server-port']}"
    assert f"'127.0.0.1', {head['--ray-client-server-port']}" in " ".join(dist["ray-head"]["healthcheck"]["test"])
    assert dist["dispatcher"]["depends_on"] == {
        "api-dist": {"condition": "service_healthy"},
        "ray-head": {"condition": "service_healthy"},
    }
    # The head schedules and trains nothing; the workers join it.
    assert "--head" in head and head["--num-cpus"] == "0" and head["--num-gpus"] == "0"
    worker = ray_start_flags(dist["ray-worker"]["command"])
    assert worker["--address"] == f"ray-head:{head['--port']}" and "--head" not in worker
    assert dist["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "container_name" not in dist["ray-worker"]  # scaled with --scale ray-worker=N


def test_dist_profile_shares_one_postgres_database() -> None:
    compose = load_yaml("docker-compose.yml")
    dist = dist_services(compose)
    urls = {environment(service)["GRADDIAG_DB_URL"] for service in graddiag_services(dist).values()}
    (url,) = urls
    parts = urlsplit(url)
    assert parts.scheme == "postgresql+psycopg" and parts.hostname == "postgres" and parts.port == 5432
    postgres = environment(dist["postgres"])
    assert parts.username == postgres["POSTGRES_USER"] and parts.path == "/" + postgres["POSTGRES_DB"]
    assert parts.password == postgres["POSTGRES_PASSWORD"] == "${GRADDIAG_PG_PASSWORD:-}"  # no default secret
    assert "ports" not in dist["postgres"]  # reachable inside the compose network only
    (data,) = [source for source, target, _ in mounts(dist["postgres"]) if target == "/var/lib/postgresql/data"]
    assert is_named_volume(data) and data in (compose.get("volumes") or {})


def test_dist_profile_ray_nodes_hold_the_data_and_no_database_credentials() -> None:
    dist = dist_services(load_yaml("docker-compose.yml"))
    dispatcher = environment(dist["dispatcher"])
    for name in RAY_NODES:
        env = environment(dist[name])
        assert not {key for key in env if key.startswith(PREFIX)}, f"{name}: Ray nodes get no graddiag settings"
        assert "shm_size" in dist[name], f"{name}: Ray's object store lives in /dev/shm"
    # Tasks load CIFAR-10 from the paths the dispatcher sends them: the workers mount them there.
    worker_mounts = {target: (source, ro) for source, target, ro in mounts(dist["ray-worker"])}
    assert worker_mounts[dispatcher["GRADDIAG_DATA_DIR"]] == ("${GRADDIAG_DATA_DIR:-./data/cifar10}", True)
    cache, read_only = worker_mounts[dispatcher["GRADDIAG_CACHE_DIR"]]
    assert is_named_volume(cache) and not read_only
    # One cluster token for every Ray process (the nodes and the dispatcher, a Ray Client); no default.
    for name in (*RAY_NODES, "dispatcher"):
        env = environment(dist[name])
        assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", "${GRADDIAG_RAY_TOKEN:-}"), name


def test_dist_profile_image_has_the_dist_extra() -> None:
    dist = dist_services(load_yaml("docker-compose.yml"))
    builds = {json.dumps(service["build"], sort_keys=True) for service in graddiag_services(dist).values()}
    builds |= {json.dumps(dist[name]["build"], sort_keys=True) for name in RAY_NODES}
    (build,) = [json.loads(b) for b in builds]  # one image for all of them
    extras = build["args"]["EXTRAS"]
    assert "dist" in extras.split(",")
    result = run_requirements_step(extras)  # the Dockerfile's own step: it refuses extras pyproject lacks
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("ray") for line in result.stdout.splitlines())
    assert any(line.startswith("psycopg") for line in result.stdout.splitlines())


# -- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_base_and_non_root_user() -> None:
    instructions = dockerfile()
    assert [a for k, a in instructions if k == "FROM"] == ["python:3.11-slim"]
    users = [a for k, a in instructions if k == "USER"]
    assert users, "the image must set a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert position(lambda k, a: k == "USER") < position(lambda k, a: k == "CMD")
    # The user exists: created with that uid (or name) in the image.
    assert any(k == "RUN" and "useradd" in a and re.search(rf"--uid {user}\b|\b{user}$", a) for k, a in instructions)
    # Run-time RUNs after USER would run unprivileged and fail to install; installs happen before it.
    assert all("pip install" not in a for k, a in instructions[position(lambda k, a: k == "USER") :] if k == "RUN")


def test_dockerfile_installs_with_the_constraints_file_in_cached_layers() -> None:
    args = build_args()
    assert args["CONSTRAINTS"] == "constraints.txt" and (ROOT / args["CONSTRAINTS"]).is_file()
    installs = [a for k, a in dockerfile() if k == "RUN" and "pip install" in a]
    assert installs
    for run in installs:
        for command in run.split("&&"):
            if "pip install" in command:
                assert '-c "$CONSTRAINTS"' in command, command

    # Layer caching: pyproject + constraints, then the dependencies, then the source.
    copy_manifest = position(lambda k, a: k == "COPY" and "pyproject.toml" in a and "constraints.txt" in a)
    install_deps = position(lambda k, a: k == "RUN" and "-r /tmp/requirements.txt" in a)
    copy_source = position(lambda k, a: k == "COPY" and ("service" in a.split() or "." in a.split()[:-1]))
    install_project = position(lambda k, a: k == "RUN" and "pip install --no-deps" in a)
    assert copy_manifest < install_deps < copy_source < install_project


def test_dockerfile_installs_cpu_torch_by_default() -> None:
    assert build_args()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    (run,) = [a for k, a in dockerfile() if k == "RUN" and "torch torchvision" in a]
    assert '--index-url "$TORCH_INDEX_URL"' in run


def test_dockerfile_command_is_a_real_graddiag_command() -> None:
    instructions = dockerfile()
    assert not [a for k, a in instructions if k == "ENTRYPOINT"]
    (cmd,) = [a for k, a in instructions if k == "CMD"]
    args = check_command(json.loads(cmd))  # exec form: signals reach graddiag itself
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert f"{args.port}" in next(a for k, a in instructions if k == "EXPOSE").split()


def test_dockerfile_environment_uses_real_settings() -> None:
    env = dockerfile_env()
    assert_setting_names(set(env), "Dockerfile ENV")
    Settings.model_validate({key[len(PREFIX) :].lower(): value for key, value in env.items() if key.startswith(PREFIX)})


def test_dockerfile_copies_exist_and_are_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "data", ".env"} <= set(ignored)
    for keyword, arguments in dockerfile():
        if keyword != "COPY":
            continue
        *sources, _ = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            for pattern in ignored:
                assert not fnmatch.fnmatch(source, pattern) and not source.startswith(pattern + "/"), (
                    f"COPY {source} is excluded by .dockerignore pattern {pattern!r}"
                )


def requirements_step() -> list[str]:
    """The Dockerfile's `python -c ...` that lists the requirements to install, as its argv."""
    (run,) = [a for k, a in dockerfile() if k == "RUN" and "tomllib" in a]
    argv = shlex.split(run.split(" > /tmp/requirements.txt")[0])
    assert argv[:2] == ["python", "-c"]
    return [sys.executable, *argv[1:]]


def run_requirements_step(extras: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXTRAS": extras}
    return subprocess.run(requirements_step(), cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def test_dockerfile_requirements_come_from_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = run_requirements_step("")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == project["dependencies"]

    unknown = run_requirements_step("no-such-extra")
    assert unknown.returncode != 0 and "no-such-extra" in unknown.stderr


def test_dockerfile_default_extras_exist_in_pyproject() -> None:
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    extras = [e for e in build_args()["EXTRAS"].split(",") if e]
    assert extras == ["tensorboard"]
    missing = [e for e in extras if e not in optional]
    assert not missing, f"Dockerfile EXTRAS names extras pyproject.toml lacks: {missing}"
    result = run_requirements_step(build_args()["EXTRAS"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == project_dependencies_with(optional, extras)


def project_dependencies_with(optional: dict[str, list[str]], extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(d for e in extras for d in optional[e])]
