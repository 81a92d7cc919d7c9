"""The image, without a container daemon: deploy/Dockerfile's filesystem built step by step.

Like the Dockerfile: the build stage's COPY lines copied into a fresh source folder (what
.dockerignore leaves out left out), wheels of allot-client and allot built there; a fresh
virtual environment given exactly requirements.lock, then the two wheels with --no-deps, then
`pip check`. From it, as the image's non-root user (user 65534 when we are root and a
Python 3.11 exists that it can run, else ourselves) in a working directory it cannot write:
`allot migrate quota` on SQLite in the data dir, and a quota process answering health.
Built once per run (module fixture), with pip's local cache.
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.settings import REPO_ROOT
from tests.support.servers import TEST_SECRET, free_port

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
PIP_TIMEOUT = 300  # seconds for one pip step on a loaded machine, from the local cache
NOBODY = 65534


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), by stage."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            out.append([])
        out[-1].append(" ".join(line.split()))
    return out


def ignored(relative: str) -> bool:
    patterns = [
        p.strip()
        for p in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = pathlib.PurePosixPath(relative).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        if pattern.startswith("**/"):  # at any depth
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):  # from the root
            return True
    return False


def copy_context(source: str, target: pathlib.Path) -> None:
    src = REPO_ROOT / source
    if src.is_file():
        shutil.copy2(src, target)
        return

    def skip(folder: str, names: list[str]) -> list[str]:
        base = pathlib.Path(folder).relative_to(REPO_ROOT)
        return [n for n in names if ignored(str(base / n))]

    shutil.copytree(src, target, symlinks=True, ignore=skip)


def run(*args: str | pathlib.Path, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=PIP_TIMEOUT, **kwargs
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


# Root runs the image's processes as NOBODY, when a Python 3.11 exists that NOBODY can run.
OTHER_USER = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
image_user: dict = {}


def as_image_user() -> dict:
    return dict(image_user)


def base_python() -> str:
    """A Python 3.11 for the venv, and who runs the image's processes: as root, user NOBODY
    with an interpreter that user can run (the image's is /usr/local/bin/python; ours may live
    under a home folder only its owner can enter); otherwise, or when there is none, we
    ourselves, still in a working directory we cannot write (unless we are root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    ours = os.path.realpath(sys._base_executable)
    if os.geteuid() == 0:
        for candidate in (ours, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
            try:
                probe = subprocess.run(
                    [candidate, "-c", "import ensurepip, venv"], capture_output=True,
                    timeout=30, **OTHER_USER,
                )  # fmt: skip
            except OSError:  # missing, or not reachable for that user
                continue
            if probe.returncode == 0:
                image_user.update(OTHER_USER)
                return candidate
    image_user.clear()
    return ours


def test_the_dockerfile_installs_the_lock_before_the_code():
    build, final = stages()
    assert build[0].startswith("FROM python:3.11-slim AS build")
    steps = "\n".join(final)
    lock_at = steps.index("pip install --no-deps -r /opt/allot/requirements.lock")
    code_at = steps.index("pip install --no-deps /wheels/*.whl")
    assert lock_at < code_at
    # the final stage never copies the source: the code is in site-packages only
    assert not [s for s in final if s.startswith("COPY") and ("shared" in s or "services" in s)]
    assert "USER 65532:65532" in final
    # the data dir the fixture below makes: the image's user owns it, the settings point at it
    assert "chown 65532:65532 /var/lib/allot" in steps
    assert "ALLOT_DATA_DIR=/var/lib/allot" in steps and "WORKDIR /var/lib/allot" in final
    for needed in (".git", ".venv", "build", "var", "shared/__pycache__", "var/quota.db"):
        assert ignored(needed), needed
    assert not ignored("services/quota/migrations/versions/0001_initial.py")


@pytest.fixture(scope="module")
def image():
    """/opt/allot (the venv), /etc/allot, /var/lib/allot and a read-only working directory
    under a fresh temporary root, made as the Dockerfile makes them."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="allot-image-"))
    try:
        root.chmod(0o755)  # the image user must reach the venv
        src = root / "src"
        src.mkdir()
        for step in stages()[0]:
            if step.startswith("COPY "):
                source, dest = step.split()[1:3]
                copy_context(source, src / dest.removeprefix("./"))
        venv = root / "opt" / "allot"
        run(base_python(), "-m", "venv", venv)
        pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
        run(*pip, "install", "-q", "--no-deps", "-r", REPO_ROOT / "requirements.lock")
        wheels = root / "wheels"
        run(*pip, "wheel", "-q", "--no-deps", "-w", wheels, "./clients/python", ".", cwd=src)
        run(*pip, "install", "-q", "--no-deps", *sorted(wheels.glob("*.whl")))
        run(*pip, "check")
        shutil.rmtree(src)  # the image holds no source
        (root / "etc" / "allot").mkdir(parents=True)
        shutil.copy2(REPO_ROOT / "deploy" / "catalog.yaml", root / "etc" / "allot" / "catalog.yaml")
        data = root / "var" / "lib" / "allot"
        data.mkdir(parents=True, mode=0o700)
        if image_user:
            os.chown(data, NOBODY, NOBODY)
        workdir = root / "app"  # not writable by the image user, like the image's /
        workdir.mkdir(mode=0o555)
        yield root
        image_user.clear()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def image_env(root: pathlib.Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{root}/opt/allot/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
        "ALLOT_CATALOG": str(root / "etc" / "allot" / "catalog.yaml"),
        "ALLOT_DATA_DIR": str(root / "var" / "lib" / "allot"),
        **extra,
    }


def test_stubs_and_code_are_installed_once_and_importable(image):
    python = image / "opt" / "allot" / "bin" / "python"
    probe = (
        "import pathlib, allot.quota.v1.quota_service_pb2_grpc as q, allot_client, shared;"
        "import services.quota;"
        "print(q.__file__); print(shared.__file__);"
        "print(not pathlib.Path(shared.__file__).parent.joinpath('gen', 'allot').exists())"
    )
    out = run(python, "-c", probe, cwd=image / "app", env=image_env(image)).stdout.split()
    site = str(image / "opt" / "allot" / "lib")
    assert out[0].startswith(site) and out[1].startswith(site), out
    assert out[2] == "True", "the stubs must not also be shipped under shared/gen"
    assert not (image / "src").exists()


def test_migrate_and_serve_as_the_non_root_user(image):
    env = image_env(image, ALLOT_AUTH_SECRET=TEST_SECRET, ALLOT_BILLING_ADDR="")
    allot = image / "opt" / "allot" / "bin" / "allot"
    done = run(allot, "migrate", "quota", cwd=image / "app", env=env, **as_image_user())
    assert "quota: migrated" in done.stdout
    database = image / "var" / "lib" / "allot" / "quota.db"
    assert database.stat().st_uid == (NOBODY if image_user else os.geteuid())

    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(image / "opt" / "allot" / "bin" / "python"), "-m", "services.quota"],
        env={**env, "ALLOT_QUOTA_ADDR": addr},
        cwd=image / "app",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **as_image_user(),
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while (left := deadline - time.monotonic()) > 0:
            line = lines.get(timeout=left)
            if line is None or line.startswith("READY quota "):
                break
            seen.append(line)
        else:
            pytest.fail("quota did not start:\n" + "".join(seen))
        assert line is not None, "quota exited:\n" + "".join(seen)
        with grpc.insecure_channel(addr) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
