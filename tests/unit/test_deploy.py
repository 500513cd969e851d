"""The container image recipe and the docker-compose dev stack, checked for structure
(Docker is not run here): what the image holds, and that the stack's pieces agree."""

from __future__ import annotations

import filecmp
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_chart import containers, render

REPO = Path(__file__).resolve().parents[2]
COMPILERS = ("clang", "gcc", "llvm", "build-essential", "make", "libbpf-dev")


def stages() -> list[list[str]]:
    """The Dockerfile's stages as lists of instructions (continuations joined)."""
    text = (REPO / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    out: list[list[str]] = []
    for line in (ln.strip() for ln in lines):
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def project() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_runtime_stage_has_libbpf_and_no_compiler() -> None:
    *_, runtime = stages()
    joined = " ".join(runtime)
    assert "libbpf1" in joined
    for tool in COMPILERS:
        assert not re.search(rf"\b{re.escape(tool)}\b", joined), tool
    assert any(i.startswith("COPY --from=build /opt/np /opt/np") for i in runtime)
    # the build stage installs wheels only: nothing is compiled in it either
    build, *_ = stages()
    assert any("--only-binary=:all:" in i for i in build)


def test_image_copies_every_package_and_dockerignore_lets_them_in() -> None:
    packages = project()["tool"]["setuptools"]["packages"]
    build, *_ = stages()
    copied = {i.split()[1].rstrip("/") for i in build if i.startswith("COPY ")}
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for pkg in sorted({p.split(".")[0] for p in packages}):  # subpackages come with them
        assert pkg in copied, f"Dockerfile does not copy {pkg}/"
        assert f"!{pkg}/" in ignore, f".dockerignore excludes {pkg}/"
    # test and demo infrastructure stays out of the product
    for infra in ("simnode", "fakekube", "tests", "bench"):
        assert infra not in packages
        assert infra not in copied
        assert f"!{infra}/" not in ignore


def test_image_has_the_reference_layout_for_the_aws_eks_nodeagent_slot() -> None:
    """EKS starts the aws-eks-nodeagent container with the reference flags and no
    command: the image's entrypoint must be /controller, our launcher."""
    *_, final = stages()
    assert 'ENTRYPOINT ["/controller"]' in final
    assert any("/opt/np/bin/np-controller /controller" in i for i in final)
    wrapper = "deploy/eks/aws-eks-na-cli.sh"
    assert any(i.startswith(f"COPY {wrapper} ") for i in final)
    assert f"!{wrapper}" in (REPO / ".dockerignore").read_text().splitlines()
    assert "np-controller" in project()["project"]["scripts"]


def test_every_command_the_chart_runs_is_a_console_script() -> None:
    scripts = project()["project"]["scripts"]
    objs = render({"nodeAgent": {"enablePolicyEventLogs": True}, "resolver": {"enabled": True}})
    commands = {c["command"][0] for c in containers(objs).values()}
    resolver = next(o for o in objs if o["kind"] == "Deployment")
    commands |= {c["command"][0] for c in resolver["spec"]["template"]["spec"]["containers"]}
    assert commands == {"np-agent", "np-conntrack", "np-flowlogs", "np-resolver"}
    assert commands <= set(scripts)


def test_the_wheel_carries_the_committed_bpf_object(tmp_path: Path) -> None:
    """What the image installs: the package built from this tree, with the prebuilt
    object byte-identical to the committed one."""
    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ behind
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "tests", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("np_node_agent-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "bpf/policy.bpf.o" in names
        z.extract("bpf/policy.bpf.o", tmp_path / "x")
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = z.read(entry_points).decode()
    assert filecmp.cmp(
        tmp_path / "x" / "bpf" / "policy.bpf.o", REPO / "bpf" / "policy.bpf.o", shallow=False
    )
    for script in (
        "np-agent",
        "np-conntrack",
        "np-flowlogs",
        "np-resolver",
        "np-cli",
        "aws-eks-na-cli",
    ):
        assert f"{script} =" in scripts


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_compose_builds_the_image_and_bootstraps_kind(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"image", "kind"}
    image = services["image"]
    assert image["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    kind = services["kind"]
    assert kind["depends_on"] == {"image": {"condition": "service_completed_successfully"}}
    assert kind["environment"]["IMAGE"] == image["image"]
    assert kind["network_mode"] == "host"  # the kubeconfig points at 127.0.0.1
    mounts = {v.split(":")[1]: v.split(":")[0] for v in kind["volumes"]}
    assert mounts["/var/run/docker.sock"] == "/var/run/docker.sock"
    for target, source in mounts.items():
        if source.startswith("./") and target != "/work/kube":
            assert (REPO / source).is_dir(), source
    assert (REPO / kind["build"]["context"] / "Dockerfile").is_file()
    up = REPO / "deploy" / "kind" / "up.sh"
    assert kind["command"] == ["/work/deploy/up.sh"]
    assert up.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(up)], check=True)
    subprocess.run(["bash", "-n", str(REPO / "deploy" / "kind" / "down.sh")], check=True)


def test_kind_stack_installs_the_chart_with_the_resolver(compose: dict[str, Any]) -> None:
    up = (REPO / "deploy" / "kind" / "up.sh").read_text()
    assert "/work/charts/np-node-agent" in up
    assert "--values /work/deploy/values-kind.yaml" in up
    assert "kind load docker-image" in up
    values = yaml.safe_load((REPO / "deploy" / "kind" / "values-kind.yaml").read_text())
    image = compose["services"]["image"]["image"]
    assert f"{values['image']['repository']}:{values['image']['tag']}" == image
    objs = render(values)  # the values are valid for the chart (schema included)
    assert any(o["kind"] == "Deployment" and "resolver" in o["metadata"]["name"] for o in objs)
    pod = next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == image
    assert pod["containers"][0]["imagePullPolicy"] == "Never"  # loaded into the node
    assert [c["name"] for c in pod["initContainers"]] == ["mount-bpffs"]
    config = yaml.safe_load((REPO / "deploy" / "kind" / "kind-config.yaml").read_text())
    assert [n["role"] for n in config["nodes"]] == ["control-plane"]
    assert (REPO / "examples" / "walkthrough" / "00-apps.yaml").is_file()
