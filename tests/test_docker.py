"""Static checks of docker/Dockerfile: no Docker engine runs on CI, so the file itself is checked."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition(" ")
        out.append((head.upper(), rest.strip()))
    return out


def test_base_image_is_a_pinned_cuda_runtime():
    froms = [arg for ins, arg in _instructions() if ins == "FROM"]
    assert froms, "Dockerfile has no FROM"
    for image in froms:
        name, sep, tag = image.split()[0].partition(":")
        assert sep and tag, f"base image {image!r} is not pinned by a tag"
        assert tag != "latest" and "latest" not in image, f"base image {image!r} uses latest"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"base image tag {tag!r} is not an exact version"
    assert "cuda" in froms[0] and "runtime" in froms[0], "base must be a CUDA runtime image"


def test_runs_as_non_root_user():
    users = [arg for ins, arg in _instructions() if ins == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"final USER is {users[-1]!r}"


def test_installs_segmerge_from_the_repository():
    ins = _instructions()
    copies = " ".join(arg for i, arg in ins if i == "COPY")
    assert "pyproject.toml" in copies and "segmerge" in copies, "package sources are not copied in"
    runs = " ".join(arg for i, arg in ins if i == "RUN")
    assert re.search(r"pip install [^&]*/opt/segmerge", runs), (
        "segmerge is not pip-installed from the copy"
    )
    torch_pin = re.search(r"torch==\$\{TORCH_VERSION\}|torch==\d", runs)
    assert torch_pin, "torch must be installed pinned"
    for src in re.findall(r"COPY\s+([^\n]+)", DOCKERFILE.read_text()):
        for path in src.split()[:-1]:
            assert (ROOT / path).exists(), f"COPY source {path} does not exist in the repository"


def test_entrypoint_is_the_segmerge_cli():
    entry = [arg for ins, arg in _instructions() if ins == "ENTRYPOINT"]
    assert entry and entry[-1].replace(" ", "") == '["python","-m","segmerge"]'


def test_configs_are_copied_and_pointed_at():
    """A regular install has no configs/ beside the package: the image must copy them and name
    them in SEGMERGE_CONFIGS, or train and predict find nothing (see test_bundle_paths.py)."""
    ins = _instructions()
    envs = " ".join(arg for i, arg in ins if i == "ENV")
    match = re.search(r"SEGMERGE_CONFIGS=(\S+)", envs)
    assert match, "SEGMERGE_CONFIGS is not set"
    copies = [arg.split() for i, arg in ins if i == "COPY"]
    assert ["configs", match.group(1)] in copies, f"configs/ is not copied to {match.group(1)}"
