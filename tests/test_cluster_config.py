"""The Ray cluster-launcher files the project ships (cluster.yaml, cluster/*.yaml).

Each is checked by Ray's own validator (what `ray up` runs first), and for what matters here:
pinned versions (the AWS defaults would install a nightly Ray), GPU workers that autoscale from
zero, no credentials, a dashboard that stays on localhost, and commands that run the interpreter
holding the project by its path (commands over SSH run in a login shell whose `python` and `ray`
are not the virtual environment's). The end-to-end `ray up` run of scripts/ray_up_local.sh is
opt-in (LIFTPLACE_CLUSTER_TEST=1): it takes minutes and root.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
# Found on disk (not named): a missing cluster.yaml must fail the test below, not be parametrized in.
CLUSTER_FILES = sorted([*ROOT.glob("cluster.yaml"), *(ROOT / "cluster").glob("*.yaml")])
IDS = [str(p.relative_to(ROOT)) for p in CLUSTER_FILES]
SCRIPT = ROOT / "scripts" / "ray_up_local.sh"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(path: Path) -> dict:
    """The config as `ray up` sees it: merged with the provider's defaults."""
    return prepare_config(copy.deepcopy(load(path)))


def commands(config: dict, keys=COMMAND_KEYS) -> str:
    return "\n".join(cmd for key in keys for cmd in config.get(key) or [])


# The interpreter each file's commands must name: cluster/local.yaml's placeholder (the script
# fills in the absolute path of the one that holds the project), and the virtual environment
# that cluster.yaml creates and installs into on every node.
PLACEHOLDER = "__PYTHON__"
CLUSTER_ENV = "~/liftplace-env/bin/"
# What a login shell would look up on its PATH: python, python3, python3.11, pip, pip3, ray.
PATH_LOOKUP = re.compile(r"(python|pip)[\d.]*|ray")
SEPARATORS = set("();|&")
REDIRECTIONS = {"<", ">", ">>", ">&", "<&", "&>", "&>>", "<<<"}
WRAPPERS = {"sudo", "env", "exec", "nice", "nohup", "time", "timeout"}


def command_words(command: str) -> list[str]:
    """The word each simple command of a shell command line runs (after `VAR=value`s and
    wrappers such as sudo, env, timeout; `bash -c CODE` is read too, and the command after a
    bare `--`, as in `ray job submit -- CMD`)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words, start, skip, shell = [], True, False, None
    for token in lexer:
        if skip:
            skip = False
        elif token in REDIRECTIONS:
            skip = True  # a file name follows
        elif set(token) <= SEPARATORS or token == "--":
            start, shell = True, None
        elif shell is not None:  # bash's arguments: after -c, the code
            if token == "-c":
                shell = "code"
            elif not token.startswith("-"):
                words += command_words(token) if shell == "code" else []
                shell = None
        elif start:
            if re.match(r"[A-Za-z_]\w*=", token):
                continue
            if token in WRAPPERS:
                continue
            if token.startswith("-") or re.fullmatch(r"\d+[smhd]?", token):
                continue  # a wrapper's option (sudo -E, nice -n 19, timeout 300)
            words.append(token)
            start = False
            shell = "options" if os.path.basename(token) in ("bash", "sh") else None
    return words


def path_lookups(command: str, allowed=()) -> list[str]:
    """The commands in `command` that run a python, pip or ray found on PATH, not one of `allowed`
    (an exact word, or a prefix ending with /)."""
    found = []
    for word in command_words(command):
        if word in allowed or any(a.endswith("/") and word.startswith(a) for a in allowed):
            continue
        if PATH_LOOKUP.fullmatch(os.path.basename(word)):
            found.append(word)
    return found


def pyproject_pins() -> dict:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(re.fullmatch(r"ray\[[^\]]*\]==(\S+)", d).group(1) for d in deps if d.startswith("ray["))
    torch_max = next(re.search(r"<=(\S+?)(,|$)", d).group(1) for d in deps if d.startswith("torch>"))
    return {"ray": ray_pin, "torch": torch_max}


def test_the_aws_and_the_local_cluster_files_are_shipped():
    assert {"cluster.yaml", "cluster/local.yaml"} <= set(IDS)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_rays_validator_accepts_it(path):
    validate_config(prepared(path))  # raises on unknown keys, bad types, min/max worker clashes


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_setup_pins_the_clients_ray_and_the_projects_torch(path):
    config = prepared(path)
    setup = commands(config, ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands"))
    assert "ray-wheels" not in setup and "dev0" not in setup, "a nightly Ray wheel (the AWS default) is installed"
    pins = pyproject_pins()
    assert pins["ray"] == ray.__version__, "pyproject.toml pins another Ray than the installed one"
    if config["provider"]["type"] == "local":  # this machine's install is checked, not changed
        ray_found = re.findall(r"ray\.__version__ == '([^']+)'", setup)
        torch_found = re.findall(r"torch\.__version__\S* == '([^']+)'", setup)
    else:
        ray_found = re.findall(r"""ray\[[\w,]+\]==([^"'\s]+)""", setup)
        torch_found = re.findall(r"""torch==([^"'\s]+)""", setup)
        assert re.search(r"pip install[^\n]*-e ~/liftplace", setup), "the project itself is not installed"
    # (prepare_config copies setup_commands into the head's and the workers' lists: sets.)
    assert set(ray_found) == {pins["ray"]}, f"setup pins Ray {ray_found}, the project {pins['ray']}"
    assert set(torch_found) == {pins["torch"]}, f"setup pins torch {torch_found}, the project <= {pins['torch']}"


@pytest.mark.parametrize("path", [p for p in CLUSTER_FILES if load(p)["provider"]["type"] != "local"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_gpu_workers_autoscale_from_zero(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not (head.get("resources") or {}).get("GPU"), "the head node should be a CPU node"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpus = sorted(t["resources"]["GPU"] for t in workers.values())
    assert 1 in gpus and 8 in gpus, f"expected a 1-GPU and an 8-GPU worker type, got GPU counts {gpus}"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, f"{name}: min_workers should be 0 (autoscale from zero)"
        assert node_type["max_workers"] >= 1, name
        resources = node_type["resources"]
        assert all(isinstance(v, int) for v in resources.values()), f"{name}: resources must be integers"
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_no_credentials_in_it(path):
    text = path.read_text()
    for pattern in (r"aws_access_key", r"aws_secret", r"secret_access", r"AKIA[0-9A-Z]{16}", r"-----BEGIN",
                    r"password\s*[:=]", r"private_key_id", r"client_secret"):
        assert not re.search(pattern, text, re.IGNORECASE), f"{path.name} holds something like a credential: {pattern}"
    key = (load(path).get("auth") or {}).get("ssh_private_key")
    assert key is None or "\n" not in key, "ssh_private_key must be a path, not key material"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_the_dashboard_stays_on_localhost(path):
    started = commands(prepared(path), ("head_start_ray_commands", "worker_start_ray_commands"))
    assert re.search(r"(/ray|-m ray\.scripts\.scripts) start --head", started)
    assert "0.0.0.0" not in started and "--dashboard-host" not in started
    assert "RAY_USAGE_STATS_ENABLED=0" in started and "RAY_AUTH_MODE=disabled" in started


def test_the_local_script_matches_the_local_cluster_file():
    started = commands(load(ROOT / "cluster" / "local.yaml"), ("head_start_ray_commands",))
    script = SCRIPT.read_text()
    port = re.search(r"--port=(\d+)", started).group(1)
    dashboard = re.search(r"--dashboard-port=(\d+)", started).group(1)
    temp_dir = re.search(r"--temp-dir=(\S+)", started).group(1)
    assert f"GCS=127.0.0.1:{port}" in script and f"DASHBOARD=127.0.0.1:{dashboard}" in script
    assert f"RAY_TMP={temp_dir}" in script
    # It would end every Ray process of the SSH user on the machine.
    assert not re.search(r"(\bray|ray\.scripts\.scripts) stop", started)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_path_lookup_check_finds_a_bare_python_pip_or_ray():
    """The check below, on commands it must refuse and on ones it must let through."""
    bare = {
        "python -m pip install x": ["python"],
        "RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1\nray start --head --port=6390": ["ray"],
        "ray stop": ["ray"],
        "ulimit -n 65536; A=1 ray start --address=$RAY_HEAD_IP:6379": ["ray"],
        "cd ~/liftplace && python3 studies/ablate_k.py": ["python3"],
        "test -x x || sudo -E pip install boto3": ["pip"],
        "bash --login -c -i 'python -c \"import ray\"'": ["python"],
        "timeout 300 ray job submit -- python -c 'import ray'": ["ray", "python"],
        "(true && python3.11 -V) >/dev/null": ["python3.11"],
    }
    for command, words in bare.items():
        assert path_lookups(command) == words, command
    fine = [
        f"{PLACEHOLDER} -c \"import ray, torch; print(ray.__version__)\"",
        f"RAY_AUTH_MODE=disabled {PLACEHOLDER} -m ray.scripts.scripts start --head",
        f"ulimit -n 65536; A=1 {CLUSTER_ENV}ray start --address=$RAY_HEAD_IP:6379",
        f"~/.local/bin/uv pip install --python {CLUSTER_ENV}python -e ~/liftplace",
        "grep -q x ~/.bashrc || printf '%s\\n' 'export PATH=\"$HOME/x/bin:$PATH\"' >> ~/.bashrc",
    ]
    for command in fine:
        assert path_lookups(command, (PLACEHOLDER, CLUSTER_ENV)) == [], command


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=IDS)
def test_setup_and_start_commands_name_the_projects_interpreter(path):
    """No command `ray up` runs (the provider's defaults merged in) looks up python, pip or ray
    on the SSH login shell's PATH, where a user's virtual environment is not: cluster/local.yaml's
    name the placeholder the script fills in, cluster.yaml's the environment it installs into."""
    config = prepared(path)
    local = config["provider"]["type"] == "local"
    allowed = (PLACEHOLDER,) if local else (CLUSTER_ENV,)
    for key in COMMAND_KEYS:
        for command in config.get(key) or []:
            found = path_lookups(command, allowed)
            assert not found, f"{key}: {command!r} runs {found} from PATH"
    started = commands(config, ("head_start_ray_commands", "worker_start_ray_commands"))
    if local:
        assert CLUSTER_ENV not in commands(config)
        assert f"{PLACEHOLDER} -m ray.scripts.scripts start" in started
        assert f"{PLACEHOLDER} -c" in commands(config, ("setup_commands",))
    else:
        assert PLACEHOLDER not in path.read_text()
        setup = commands(config, ("setup_commands",))
        # The environment the start commands use is the one created and installed into.
        assert re.search(r"uv venv --python 3\.11 ~/liftplace-env\b", setup)
        assert re.search(rf"pip install --python {re.escape(CLUSTER_ENV)}python -e ~/liftplace", setup)
        assert f"{CLUSTER_ENV}ray start --head" in started and f"{CLUSTER_ENV}ray start --address" in started


def script_heredoc(marker: str) -> str:
    """The body of the script's quoted heredoc (<<'EOF') that contains `marker`."""
    bodies = [b for b in re.findall(r"<<'EOF'\n(.*?)\nEOF\n", SCRIPT.read_text(), re.S) if marker in b]
    assert len(bodies) == 1, f"{len(bodies)} heredocs of {SCRIPT.name} contain {marker!r}"
    return bodies[0]


def test_the_local_script_fills_in_the_interpreter(tmp_path):
    """The script's own config step, run on cluster/local.yaml with an interpreter path that
    needs quoting: every placeholder is replaced, and each Python or Ray command runs that path."""
    python = "/opt/my env/bin/python"
    out = tmp_path / "cluster-local.yaml"
    env = {**os.environ, "KEY": str(tmp_path / "key"), "PORT": "2222", "PROJECT": str(tmp_path / "project"),
           "ROOT": str(ROOT), "PYTHON": python}
    subprocess.run([sys.executable, "-", str(ROOT / "cluster" / "local.yaml"), str(out)],
                   input=script_heredoc(PLACEHOLDER), text=True, env=env, check=True)
    assert PLACEHOLDER not in out.read_text()
    config = prepare_config(load(out))
    validate_config(config)
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            assert command_words(command)[-1] == python, f"{key}: {command!r}"
            assert not path_lookups(command, (python,)), f"{key}: {command!r}"
    assert config["auth"]["ssh_proxy_command"] == "nc 127.0.0.1 2222"


def test_the_local_script_runs_the_projects_interpreter_here_and_over_ssh():
    """The script resolves the interpreter (LIFTPLACE_PYTHON first) and runs Ray and Python,
    here and in what it sends with `ray exec`, through it: no python or ray from PATH."""
    text = SCRIPT.read_text()
    assert re.search(r'^PYTHON="\$\{LIFTPLACE_PYTHON:-', text, re.M), "LIFTPLACE_PYTHON is not honoured first"
    assert "import sys; print(sys.executable)" in text and "import liftplace, ray" in text
    # The shell code outside heredocs and comments.
    code = re.sub(r"<<-?'?(\w+)'?([^\n]*)\n.*?\n\1\n", r"\2\n", text, flags=re.S)
    code = "\n; ".join(code.replace("\\\n", " ").splitlines())
    assert not path_lookups(code), f"{SCRIPT.name} runs {path_lookups(code)} from PATH"
    remote = {"$REMOTE_RAY": "/venv/bin/python -m ray.scripts.scripts", "$REMOTE_PYTHON": "/venv/bin/python"}
    sent = re.findall(r'exec "\$CFG" "((?:[^"\\]|\\.)*)"', text, re.S)
    assert len(sent) >= 4, sent  # ray status, the study, ray stop (and again in the teardown)
    for command in sent:
        command = re.sub(r"\$REMOTE_\w+", lambda m: remote[m.group(0)], command.replace("\\\n", ""))
        assert not path_lookups(command, ("/venv/bin/python",)), f"ray exec {command!r}"
    # `ray down` sends a bare `ray stop` of its own: the interpreter's comes first.
    assert re.search(r'exec "\$CFG" "\$REMOTE_RAY stop"\n.*\n.*\n.*down -y "\$CFG"', text)


def test_a_study_on_an_autoscaling_cluster_is_checked_against_its_ceiling(ray_session, tmp_path, monkeypatch):
    """On the head of a `ray up` cluster GPU workers start from zero: a run that fits the
    node types' ceiling is let through (the autoscaler adds the GPUs), a bigger one is refused."""
    from liftplace.config import resolve
    from liftplace.preflight import check_resources
    from liftplace.runner import cluster

    bootstrap = tmp_path / "ray_bootstrap_config.yaml"  # what `ray up` writes on the head
    bootstrap.write_text(yaml.safe_dump(prepared(ROOT / "cluster.yaml")))
    monkeypatch.setattr(cluster, "BOOTSTRAP_CONFIG", str(bootstrap))
    now = ray.cluster_resources()
    assert cluster.cluster_capacity() == {"CPU": now.get("CPU", 0) + 8 * 4 + 96, "GPU": now.get("GPU", 0) + 8 + 8}
    check_resources([resolve("smoke", {"scaling.use_gpu": True, "scaling.num_workers": 8})], cluster.capacity_now())
    with pytest.raises(ValueError, match="asks for 17 GPUs"):
        check_resources([resolve("smoke", {"scaling.use_gpu": True, "scaling.num_workers": 17})], cluster.capacity_now())


@pytest.mark.skipif(os.environ.get("LIFTPLACE_CLUSTER_TEST") != "1",
                    reason="`ray up` through a local sshd takes minutes and root: set LIFTPLACE_CLUSTER_TEST=1")
def test_ray_up_on_this_machine_end_to_end():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "PASSED" in result.stdout and re.search(r"OK: \d+ runs, every variant", result.stdout)
