#!/usr/bin/env bash
# Prove the `ray up` path on this machine, end to end, with the cluster launcher's `local`
# provider (cluster/local.yaml) and no cloud:
#
#   1. a throwaway sshd on 127.0.0.1 only (its own config, host key and client key pair under a
#      temp dir; openssh-server, rsync and netcat come from apt when missing), run inside its
#      own PID namespace, so that whatever runs through it -- the Ray head, and the `ray stop`
#      that `ray down` sends -- sees and touches only this cluster's processes, never another
#      Ray on the machine (a test session's);
#   2. `ray up` of a copy of cluster/local.yaml that points at that sshd and names the Python
#      interpreter that holds the project (its __PYTHON__): SSH, rsync of the repository, setup
#      commands (version checks), `ray start --head`;
#   3. a Ray Jobs submission (the dashboard's job API, bound to 127.0.0.1) and a smoke study of
#      studies/ablate_k.py run on the head with `ray exec`, joining the cluster (--address auto);
#   4. a check of the study's results from this side (liftplace.results), then `ray down` and
#      the sshd's end. A trap does the teardown on any failure or interrupt.
#
#     sudo env PATH="$PATH" scripts/ray_up_local.sh   # root: apt, /run/sshd, unshare; ~4 min, 2 cores
#
# The interpreter: LIFTPLACE_PYTHON if set, else the `python` first on PATH, which must import
# liftplace and ray (the virtual environment that `pip install -e .` went into; sudo resets
# PATH, hence `env PATH="$PATH"`, or `sudo LIFTPLACE_PYTHON="$(command -v python)" ...`). Every
# command, here and on the "head" over SSH, runs that interpreter by its absolute path: the SSH
# login shell's own `python` and `ray` are whatever its PATH finds, not your virtual environment.
# Environment: LIFTPLACE_PYTHON, LIFTPLACE_SSH_PORT (default 2222), LIFTPLACE_KEEP=1 keeps the
# temp dir.
# Root's home gets ~/ray_bootstrap_config.yaml and ~/ray_bootstrap_key.pem from `ray up` (the
# launcher writes them into the SSH user's home): they are removed (or restored) at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${LIFTPLACE_SSH_PORT:-2222}"
GCS=127.0.0.1:6390        # cluster/local.yaml's head ports
DASHBOARD=127.0.0.1:8275
RAY_TMP=/tmp/ray-liftplace-local
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1

T0=$(date +%s)
phase() { printf '\n=== [%4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { echo "ray_up_local: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it may apt-get install openssh-server, rsync and netcat, and it runs sshd in a PID namespace (unshare)"
# sys.executable, not the name found on PATH: a shim (pyenv) or a relative name would mean
# something else in the SSH login shell; a virtual environment's bin/python stays unresolved
# (its symlink's target is the base interpreter, without the environment's packages).
PYTHON="${LIFTPLACE_PYTHON:-$(command -v python || true)}"
[ -n "$PYTHON" ] || die "no python on PATH: activate the virtual environment that holds the project (sudo resets PATH: sudo env PATH=\"\$PATH\" $0), or set LIFTPLACE_PYTHON"
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')" || die "cannot run $PYTHON"
"$PYTHON" -c 'import liftplace, ray, yaml' 2>/dev/null \
    || die "$PYTHON cannot import liftplace and ray: put the interpreter the project was installed into first on PATH (sudo env PATH=\"\$PATH\" $0), or set LIFTPLACE_PYTHON to it"
RAY=("$PYTHON" -m ray.scripts.scripts)      # the `ray` command of that interpreter
REMOTE_PYTHON="$(printf '%q' "$PYTHON")"    # the same two, in the commands sent over SSH
REMOTE_RAY="$REMOTE_PYTHON -m ray.scripts.scripts"

WORK="$(mktemp -d /tmp/liftplace-rayup.XXXXXX)"
CFG="$WORK/cluster-local.yaml"
STORAGE="$WORK/results"
PROJECT="$WORK/project"       # where the launcher rsyncs the repository on the "head"
KEY="$WORK/client_key"
NS_PID=""
CLUSTER_UP=0
POLICY_RC=0
OK=0

cleanup() {
    local rc=$?
    set +e
    if [ "$CLUSTER_UP" = 1 ]; then
        phase "teardown: ray down"
        timeout 120 "${RAY[@]}" exec "$CFG" "$REMOTE_RAY stop"
        timeout 300 "${RAY[@]}" down -y "$CFG"
    fi
    if [ -n "$NS_PID" ]; then
        phase "teardown: stopping sshd (and whatever is left in its PID namespace)"
        # unshare ignores SIGTERM while it waits: signal its child, the sshd (the namespace's
        # init, whose end ends every process left in the namespace).
        local sshd_pid
        sshd_pid="$(pgrep -P "$NS_PID" || true)"
        if [ -n "$sshd_pid" ]; then kill "$sshd_pid" 2>/dev/null; fi
        for _ in $(seq 50); do kill -0 "$NS_PID" 2>/dev/null || break; sleep 0.2; done
        if [ -n "$sshd_pid" ] && kill -0 "$NS_PID" 2>/dev/null; then kill -KILL "$sshd_pid" 2>/dev/null; fi
        wait "$NS_PID" 2>/dev/null
    fi
    if [ "$POLICY_RC" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    for f in ray_bootstrap_config.yaml ray_bootstrap_key.pem; do
        if [ -e "$WORK/backup.$f" ]; then cp -p "$WORK/backup.$f" "$HOME/$f"; else rm -f "$HOME/$f"; fi
    done
    rm -f /tmp/ray/cluster-liftplace-local.state /tmp/ray/cluster-liftplace-local.lock
    if [ "$OK" = 1 ] && [ "${LIFTPLACE_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK" "$RAY_TMP"
    else
        echo "kept for inspection: $WORK (sshd.log, the config copy, results) and $RAY_TMP (Ray's logs)"
    fi
    phase "done: $([ "$OK" = 1 ] && echo PASSED || echo "FAILED (exit $rc)")"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

phase "preflight: interpreter, ports and packages"
echo "interpreter: $PYTHON (ray $("$PYTHON" -c 'import ray; print(ray.__version__)'))"
"$PYTHON" - "$PORT" 6390 8275 20011 52375 <<'EOF' || die "a port this script needs is in use (another run of it? LIFTPLACE_SSH_PORT picks the sshd port)"
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        # As the servers bind: a previous run's connections in TIME_WAIT do not count as in use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            sys.exit(f"port {port} is in use")
EOF
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v rsync >/dev/null || need+=(rsync)
command -v nc >/dev/null || need+=(netcat-openbsd)
if [ "${#need[@]}" -gt 0 ]; then
    echo "installing ${need[*]} with apt"
    # Keep the package scripts from starting a system-wide sshd on port 22.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && POLICY_RC=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "sshd: $(/usr/sbin/sshd -V 2>&1 | head -1); $(rsync --version | head -1)"
other_ray() { pgrep -c -x raylet 2>/dev/null || true; }
echo "raylets already running on this machine (other Ray sessions, left alone): $(other_ray)"

phase "sshd on 127.0.0.1:$PORT in its own PID namespace"
mkdir -p /run/sshd && chmod 755 /run/sshd   # sshd's privilege separation directory
ssh-keygen -q -t ed25519 -N '' -C liftplace-ray-up-local-host -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -C liftplace-ray-up-local -f "$KEY"
install -m 600 "$KEY.pub" "$WORK/authorized_keys"
cat > "$WORK/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $WORK/host_key
PidFile $WORK/sshd.pid
AuthorizedKeysFile $WORK/authorized_keys
AllowUsers root
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The key files live under /tmp (mode 1777), which strict modes would refuse.
StrictModes no
X11Forwarding no
AllowTcpForwarding local
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -t -f "$WORK/sshd_config"
unshare --pid --mount-proc --kill-child /usr/sbin/sshd -D -f "$WORK/sshd_config" -E "$WORK/sshd.log" &
NS_PID=$!
SSH=(ssh -p "$PORT" -i "$KEY" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@127.0.0.1)
for _ in $(seq 50); do "${SSH[@]}" true 2>/dev/null && break; sleep 0.2; done
"${SSH[@]}" true || die "cannot ssh to 127.0.0.1:$PORT (see $WORK/sshd.log)"
echo "ssh works; processes visible inside the namespace: $("${SSH[@]}" 'ps -e --no-headers | wc -l')"

phase "cluster config: a copy of cluster/local.yaml for this sshd and $PYTHON"
KEY="$KEY" PORT="$PORT" PROJECT="$PROJECT" ROOT="$ROOT" PYTHON="$PYTHON" \
    "$PYTHON" - "$ROOT/cluster/local.yaml" "$CFG" <<'EOF'
import os, shlex, sys, yaml
with open(sys.argv[1]) as f:
    config = yaml.safe_load(f)
config["auth"]["ssh_private_key"] = os.environ["KEY"]
config["auth"]["ssh_proxy_command"] = f"nc 127.0.0.1 {os.environ['PORT']}"
config["file_mounts"] = {os.environ["PROJECT"]: os.environ["ROOT"]}
python = shlex.quote(os.environ["PYTHON"])
for key, value in config.items():
    if key.endswith("_commands"):
        config[key] = [command.replace("__PYTHON__", python) for command in value]
left = [key for key, value in config.items() if "__PYTHON__" in str(value)]
assert not left, f"__PYTHON__ left in {left}"
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
for f in ray_bootstrap_config.yaml ray_bootstrap_key.pem; do
    if [ -e "$HOME/$f" ]; then cp -p "$HOME/$f" "$WORK/backup.$f"; fi
done
echo "$CFG"

phase "ray up"
# For the record: the SSH login shell's own `python`, which need not be $PYTHON (and is not
# used: every command names $PYTHON).
echo "the SSH login shell's python: $("${SSH[@]}" "bash --login -c -i 'command -v python || echo none' 2>/dev/null" | tail -1)"
CLUSTER_UP=1
timeout 900 "${RAY[@]}" up -y --no-config-cache "$CFG"
timeout 120 "${RAY[@]}" exec "$CFG" "$REMOTE_RAY status --address $GCS"

phase "the dashboard listens on localhost only"
"$PYTHON" - "${DASHBOARD##*:}" <<'EOF'
import ipaddress, sys

port, hosts = int(sys.argv[1]), set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # listening sockets: state 0A
    for line in open(table).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            raw = bytes.fromhex(address)  # little-endian 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            hosts.add(str(ipaddress.ip_address(raw)))
print(f"port {port} listens on {sorted(hosts)}")
assert hosts == {"127.0.0.1"}, hosts
EOF

phase "Ray Jobs: ray job submit to http://$DASHBOARD"
# The entrypoint runs in a shell on the head with the PATH of the SSH login shell that started
# Ray: it names the interpreter too (the job client quotes each word).
timeout 300 "${RAY[@]}" job submit --address "http://$DASHBOARD" -- \
    "$PYTHON" -c "import ray; ray.init(); print('the job sees', ray.cluster_resources())"

phase "a smoke study on the cluster: ray exec ... studies/ablate_k.py --address auto"
timeout 1500 "${RAY[@]}" exec "$CFG" "cd $PROJECT && export RAY_ADDRESS=$GCS RAY_AUTH_MODE=disabled \
RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 LIFTPLACE_CACHE=$WORK/cache && \
$REMOTE_PYTHON studies/ablate_k.py --preset smoke --seeds 1 --address auto --storage $STORAGE \
--set train.steps=10 --set eval.num_images=32 --set eval.sampler_steps=2"

phase "check the results from this side"
"$PYTHON" - "$STORAGE/ablate_k" "$ROOT" <<'EOF'
import importlib.util, math, sys
from pathlib import Path
from liftplace.results import load_study, summarize

folder, root = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("ablate_k", root / "studies" / "ablate_k.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
summary = summarize(load_study(folder))
print(summary[["variant", "steps", "final_fid", "runner"]].to_string(index=False))
expected = len(module.STUDY.variants)  # one seed: a run per variant (in trials or cohorts)
assert len(summary) == expected, f"{len(summary)} runs, expected {expected}"
assert sorted(summary["variant"]) == sorted(module.STUDY.variants), sorted(summary["variant"])
assert (summary["steps"] == 10).all() and not summary["diverged"].any()
assert all(math.isfinite(f) and f > 0 for f in summary["final_fid"])
assert (folder / "analysis" / "REPORT.md").is_file(), "no analysis/REPORT.md"
print(f"OK: {expected} runs, every variant, 10 steps each, finite FIDs, {folder / 'analysis' / 'REPORT.md'}")
EOF

phase "ray down"
# `ray down` sends a bare `ray stop` through the login shell, which need not find this `ray`
# (it then only warns): the interpreter's own `ray stop` first, and a check that it worked.
timeout 120 "${RAY[@]}" exec "$CFG" "$REMOTE_RAY stop"
left="$("${SSH[@]}" 'pgrep -c -x raylet || true')"
[ "$left" = 0 ] || die "$left raylet(s) still running on the head after its ray stop"
timeout 300 "${RAY[@]}" down -y "$CFG"
CLUSTER_UP=0
echo "raylets left running on this machine (other Ray sessions): $(other_ray)"
OK=1
