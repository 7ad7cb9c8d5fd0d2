"""The container files, checked as far as a machine without a Docker engine allows: the Dockerfiles
parse into valid instructions, run as a non-root user with the `longtail` entry point and a health
check, copy only what exists (and what .dockerignore keeps), and install only packages the project
declares or pins; the compose file has the services, volumes, health checks and GPU reservations
that the README documents."""

import shlex
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from longtail.flows.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
#: packages a Dockerfile may name although pyproject does not list them itself: torch is pinned there
#: as a range, the images pin the exact wheel
PINNED = {"torch": "2.13"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with comments dropped and continuation lines joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, args = text.partition(" ")
        out.append((word.upper() if word.upper() in INSTRUCTIONS else word, args.strip()))
    assert not pending, f"{path.name}: a continuation line at the end of the file"
    return out


def pip_commands(instructions) -> list[tuple[str, list[str]]]:
    """``(install | uninstall, [package specs])`` of every pip call in RUN instructions."""
    calls = []
    for kind, args in instructions:
        if kind != "RUN":
            continue
        for part in args.split("&&"):
            words = shlex.split(part)
            if len(words) < 2 or words[0] != "pip":
                continue
            specs, skip = [], False
            for w in words[2:]:
                if skip:
                    skip = False
                elif w in ("--index-url", "--extra-index-url", "-i", "-r", "--find-links"):
                    skip = True  # the option's value follows
                elif not w.startswith("-"):
                    specs.append(w)
            calls.append((words[1], specs))
    return calls


def project_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request):
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_instructions_are_valid(dockerfile):
    name, instructions = dockerfile
    assert instructions, name
    bad = [kind for kind, _ in instructions if kind not in INSTRUCTIONS]
    assert not bad, f"{name}: unknown instructions {bad}"
    kinds = [kind for kind, _ in instructions]
    first = next(k for k in kinds if k != "ARG")
    assert first == "FROM", f"{name}: the first instruction (after ARGs) must be FROM"
    assert kinds.count("FROM") == 1


def test_runs_as_non_root_with_longtail_entrypoint_and_healthcheck(dockerfile):
    name, instructions = dockerfile
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: runs as root"
    # the user is created before it is switched to
    created = [args for kind, args in instructions if kind == "RUN" and "useradd" in args]
    assert created and users[-1].split(":")[0] in created[0]
    entry = [args for kind, args in instructions if kind == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["longtail"]
    health = [args for kind, args in instructions if kind == "HEALTHCHECK"]
    assert len(health) == 1
    cmd = yaml.safe_load(health[0].split(" CMD ", 1)[1])
    assert cmd[:3] == ["longtail", "doctor", "--quick"]
    assert cmd[cmd.index("--device") + 1] == {"cpu": "cpu", "gpu": "cuda"}[name]
    # the health check's command exists in the CLI it installs
    assert "doctor" in {c.name or c.callback.__name__ for c in app.registered_commands}


def test_copies_only_existing_paths_that_dockerignore_keeps(dockerfile):
    name, instructions = dockerfile
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for kind, args in instructions:
        if kind != "COPY":
            continue
        *sources, _ = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path in the repository"
            hits = [p for p in ignored if fnmatch(src, p) or fnmatch(src, p.removeprefix("**/"))]
            assert not hits, f"{name}: COPY {src} is excluded by .dockerignore ({hits})"


def test_pip_names_only_declared_or_pinned_packages(dockerfile):
    name, instructions = dockerfile
    declared = project_requirements()
    calls = pip_commands(instructions)
    assert calls, name
    for verb, specs in calls:
        assert verb in ("install", "uninstall"), verb
        for spec in specs:
            if spec == "." or spec.startswith(".["):  # the project itself, with an extra
                extras = Requirement("longtail" + spec[1:]).extras
                assert extras <= set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                                     .get("optional-dependencies", {})), spec
                continue
            req = Requirement(spec)
            key = req.name.lower()
            if key in PINNED:
                pins = [s for s in req.specifier if s.operator == "=="]
                assert pins and pins[0].version.startswith(PINNED[key] + "."), f"{name}: {spec} is not pinned to {PINNED[key]}.x"
                assert pins[0].version in declared[key].specifier, f"{name}: {spec} is outside pyproject's {declared[key]}"
                continue
            assert key in declared, f"{name}: pip {verb} {spec}: not a dependency or extra of pyproject.toml"
            if verb == "install":
                assert req.specifier == declared[key].specifier or not req.specifier, \
                    f"{name}: {spec} differs from pyproject's {declared[key]}"


def test_gpu_image_swaps_faiss_cpu_for_faiss_gpu():
    calls = pip_commands(parse_dockerfile(DOCKERFILES["gpu"]))
    flat = [(verb, spec) for verb, specs in calls for spec in specs]
    install_gpu = flat.index(("install", ".[gpu]"))
    uninstall = flat.index(("uninstall", "faiss-cpu"))
    reinstall = max(i for i, (verb, spec) in enumerate(flat) if verb == "install" and spec.startswith("faiss-gpu"))
    assert install_gpu < uninstall < reinstall  # faiss-gpu's files are restored after faiss-cpu's removal
    base = next(args for kind, args in parse_dockerfile(DOCKERFILES["gpu"]) if kind == "FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    cpu_base = next(args for kind, args in parse_dockerfile(DOCKERFILES["cpu"]) if kind == "FROM")
    assert cpu_base == "python:3.11-slim"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_compose_services_volumes_and_healthchecks(compose):
    services = compose["services"]
    assert {"prefect-server", "worker", "worker-cpu"} <= set(services)
    server = services["prefect-server"]
    assert server["entrypoint"] == ["prefect"] and server["command"][:2] == ["server", "start"]
    assert "healthcheck" in server and "/api/health" in " ".join(server["healthcheck"]["test"])
    built = {s["image"]: s["build"]["dockerfile"] for s in services.values() if "build" in s}
    assert built == {"longtail:cpu": "docker/Dockerfile.cpu", "longtail:gpu": "docker/Dockerfile.gpu"}
    for path in built.values():
        assert (ROOT / path).is_file()
    for name, svc in services.items():
        assert svc["image"] in built, f"{name} uses an image compose does not build"
        if name == "prefect-server":
            continue
        env = svc["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env), name
        assert "longtail-data:/data" in svc["volumes"], name
    for name in ("worker", "worker-cpu"):
        w = services[name]
        assert w["command"][0] == "deploy" and w["command"][2] == "--cron", name
        assert w["depends_on"]["prefect-server"]["condition"] == "service_healthy"
        assert w["healthcheck"]["test"][1:4] == ["longtail", "doctor", "--quick"], name
    assert set(compose["volumes"]) == {"longtail-data", "prefect-data"}


def test_compose_reserves_one_gpu_per_service(compose):
    gpu = {name: svc for name, svc in compose["services"].items() if svc["image"] == "longtail:gpu"}
    assert len(gpu) >= 3
    ids = []
    for name, svc in gpu.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"], name
        assert len(devices[0]["device_ids"]) == 1, f"{name}: one stage per GPU"
        ids.append(devices[0]["device_ids"][0])
        # the reserved GPU is the only one the container sees, renumbered from 0
        assert svc["environment"]["CUDA_VISIBLE_DEVICES"] == "0", name
    stages = [gpu[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
              for n in gpu if n.startswith("stage-gpu")]
    assert len(set(stages)) == len(stages), "two stage services default to the same GPU"
    assert all(cmd for cmd in ids)
