"""The deployment files: compose.yaml is valid Compose and consistent with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from hps.settings import known_env_vars

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def _compose() -> dict:
    # PyYAML resolves the `<<: *hps` merge keys, which the spec parser does not.
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_follows_the_compose_specification() -> None:
    data = {k: v for k, v in _compose().items() if not k.startswith("x-")}
    compose = PyCompose.from_json(json.dumps(data))
    compose.validate()
    assert set(compose.service_names()) == {
        "postgres", "minio", "store-setup", "migrate", "bot", "scheduler", "worker", "trainer"
    }  # fmt: skip


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_accepts_it_when_the_plugin_exists(tmp_path: Path) -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("docker has no compose plugin here")
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=x\n")
    result = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(COMPOSE),
            "--env-file",
            str(tmp_path / ".env"),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def _kinds(command: list[str]) -> set[str]:
    return set(command[command.index("--kinds") + 1].split(","))


def test_services_are_wired_as_documented() -> None:
    services = _compose()["services"]
    for name in ("worker", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert services[name]["image"] == "hps-worker"
    for name in ("bot", "scheduler", "worker", "trainer"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "store-setup": {"condition": "service_completed_successfully"},
        }
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["store-setup"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_workers_share_no_volume_with_the_bot_and_everyone_uses_the_object_store() -> None:
    """Images and model versions go through MinIO, so a worker can run on a machine that
    reaches only PostgreSQL and MinIO (docs/deploy.md)."""
    services = _compose()["services"]
    volumes = {name: set(services[name].get("volumes", [])) for name in services}
    platform = ("migrate", "bot", "scheduler")
    assert not volumes["worker"] & volumes["trainer"]
    for gpu in ("worker", "trainer"):
        assert volumes[gpu] and not any(volumes[gpu] & volumes[other] for other in platform)
    bucket = services["store-setup"]["command"][0]
    assert "mc mb --ignore-existing local/hps" in bucket
    for name in (*platform, "worker", "trainer"):
        env = services[name]["environment"]
        assert env["HPS_STORE__URL"] == "s3://hps/platform"
        assert env["HPS_STORE__ENDPOINT_URL"] == "http://minio:9000"
        assert env["HPS_STORE__ACCESS_KEY_ID"] == "hps-platform" and "hps-platform" in bucket


def test_training_has_a_worker_of_its_own_and_every_job_kind_a_worker() -> None:
    """The weekly adapt_sd job runs for hours: on the rounds' worker it would hold /dream
    rounds up that long."""
    from pipeline.handlers import HANDLERS

    services = _compose()["services"]
    rounds, training = _kinds(services["worker"]["command"]), _kinds(services["trainer"]["command"])
    assert training == {"train_classifier", "adapt_sd"}
    assert "generate" in rounds and not rounds & training
    assert rounds | training == set(HANDLERS)


def test_no_service_needs_an_env_file_that_may_not_exist() -> None:
    """`.env` is optional (the secrets may come from the environment `docker compose` runs
    in); a missing required one is named by its `${VAR:?...}` check instead."""
    for name, service in _compose()["services"].items():
        for entry in service.get("env_file") or []:
            assert isinstance(entry, dict) and entry["required"] is False, name
    assert "${HPS_STORE__SECRET_ACCESS_KEY:?" in COMPOSE.read_text()


def test_every_setting_in_compose_exists() -> None:
    names = set()
    for service in _compose()["services"].values():
        names.update(k for k in (service.get("environment") or {}) if k.startswith("HPS_"))
    names |= set(re.findall(r"\b(HPS_[A-Z0-9_]+)=", COMPOSE.read_text()))
    assert names and names <= known_env_vars()


def test_dockerfile_has_the_targets_compose_builds() -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\w+)$", DOCKERFILE.read_text(), re.MULTILINE))
    built = {s["build"]["target"] for s in _compose()["services"].values() if "build" in s}
    assert built == {"bot", "worker"} and built <= targets
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", DOCKERFILE.read_text(), re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


@pytest.mark.parametrize("service", ["migrate", "bot", "scheduler", "worker", "trainer"])
def test_each_service_command_exists_in_the_cli(service: str) -> None:
    command = _compose()["services"][service]["command"]
    words = []
    for word in command:  # the sub-command path, up to its first option
        if word.startswith("-"):
            break
        words.append(word)
    result = subprocess.run(
        [sys.executable, "-m", "cli", *words, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_health_checks_ask_hps_health_about_the_process_they_watch() -> None:
    """Not `hps db status` (true while the bot is disconnected or the worker hung): the
    heartbeats of the very process in the container (docs/runbook.md)."""
    services = _compose()["services"]
    watched = {"bot": "bot", "scheduler": "scheduler", "worker": "worker", "trainer": "worker"}
    for name, kind in watched.items():
        assert services[name]["command"][0] == kind
        assert services[name]["healthcheck"]["test"] == ["CMD", "hps", "health", kind, "--here"]
    checks = re.findall(r"^HEALTHCHECK .* CMD (\[.*\])$", DOCKERFILE.read_text(), re.MULTILINE)
    assert [json.loads(c) for c in checks] == [
        ["hps", "health", "--here"],
        ["hps", "health", "worker", "--here"],
    ]


def test_the_cuda_12_constraints_differ_from_ci_s_only_in_torch_and_cuda() -> None:
    """constraints-cu126.txt (older NVIDIA drivers, docs/deploy.md) pins the same versions
    of everything but torch, torchvision and the CUDA packages torch brings."""

    def pins(name: str) -> set[str]:
        text = (ROOT / name).read_text().splitlines()
        return {line for line in text if line and not line.startswith("#")}

    cuda = re.compile(r"^(torch|torchvision|triton|cuda-[\w-]+|nvidia-[\w-]+)==")
    main, cu126 = pins("constraints.txt"), pins("constraints-cu126.txt")
    assert {p for p in main if not cuda.match(p)} == {p for p in cu126 if not cuda.match(p)}
    assert {p for p in cu126 if cuda.match(p)} == {"torch==2.9.1", "torchvision==0.24.1"}
    index = "https://download.pytorch.org/whl/cu126"
    first_step = f"--index-url {index} torch==2.9.1 torchvision==0.24.1"
    assert first_step in (ROOT / "constraints-cu126.txt").read_text()
    assert first_step in (ROOT / "docs" / "deploy.md").read_text()


def test_the_invite_url_in_the_docs_asks_for_what_the_bot_uses() -> None:
    """docs/deploy.md's invite URL and permission table are `bot.invite.PERMISSIONS`: the
    integer, and each permission named (Discord's names), nothing else."""
    from bot.invite import PERMISSIONS, invite_url

    deploy = (ROOT / "docs" / "deploy.md").read_text()
    url = invite_url(123).replace("client_id=123", "client_id=APPLICATION_ID")
    assert url in deploy and f"permissions={PERMISSIONS.value}" in url
    names = {
        "read_messages": "View Channels",  # discord.py's name of view_channel
        "send_messages": "Send Messages",
        "send_messages_in_threads": "Send Messages in Threads",
        "attach_files": "Attach Files",
        "read_message_history": "Read Message History",
    }
    assert {name for name, on in PERMISSIONS if on} == set(names)
    table = deploy[deploy.index("| permission | why |") :].split("\n\n")[0]
    listed = [row.split("|")[1].strip() for row in table.splitlines()[2:]]
    assert listed == list(names.values())
    assert "Use External Emojis" not in deploy


def _copied_into_base() -> set[str]:
    """The paths the Dockerfile's `base` stage COPYs from the build context (both images
    build from it: `pip install .` sees only these)."""
    text = DOCKERFILE.read_text()
    base = text[text.index(" AS base\n") : text.index("\nFROM ", text.index(" AS base\n"))]
    copied = set()
    for line in base.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied.update(Path(w).as_posix().rstrip("/") for w in words[1:-1])
    return copied


def _ignored_by_docker(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(Path(path).match(p) or path == p for p in patterns)


def test_the_image_gets_every_file_pip_install_needs() -> None:
    """Every package pyproject.toml installs, the console script's module, and the files the
    build reads (readme, license files, the constraints pip installs with) are COPYed."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in includes}
    scripts = {
        target.split(":")[0].split(".")[0] for target in project["project"]["scripts"].values()
    }
    files = {project["project"]["readme"], *project["project"]["license-files"]}
    files |= set(re.findall(r"pip install -c (\S+)", DOCKERFILE.read_text()))
    files.add("pyproject.toml")
    needed = packages | scripts | files
    assert {"hps", "bot", "db", "pipeline", "cli", "LICENSE", "constraints.txt"} <= needed
    copied = _copied_into_base()
    assert needed <= copied, f"the Dockerfile does not COPY {sorted(needed - copied)}"
    for path in needed:
        assert (ROOT / path).exists() and not _ignored_by_docker(path), path
