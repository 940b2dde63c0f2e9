"""The images' dependency lock agrees with pyproject.toml (docker/requirements.txt)."""

import re
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def pinned_in_dockerfile(name: str) -> str:
    """The version a Dockerfile pins with ``ARG <NAME>_VERSION=...``."""
    text = (ROOT / "docker" / "Dockerfile").read_text() + (ROOT / "docker" / "Dockerfile.gpu").read_text()
    arg = re.sub(r"[-.]", "_", name).upper() + "_VERSION"
    return re.search(rf"ARG {arg}=(\S+)", text).group(1)


def test_the_lock_pins_every_runtime_dependency_within_its_range():
    pins = lock()
    wanted = [Requirement(r) for r in requires("ocd-serve")]  # pyproject.toml's, as installed
    wanted = [r for r in wanted if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", "cpu", "gpu"))]
    checked = []
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        version = pins.get(name) or pinned_in_dockerfile(name)
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} is outside {req.specifier}"
        checked.append(name)
    assert {"torch", "onnxruntime", "onnxruntime-gpu", "fastapi", "uvicorn", "numpy"} <= set(checked)
    assert "torch" not in pins and "onnxruntime" not in pins  # pinned in the Dockerfiles, per image
    assert pinned_in_dockerfile("torch") == "2.13.0"
