#!/usr/bin/env python3
"""Run effllm-jax on a Cloud TPU pod: create, ship, install, launch detached, watch, stop, delete.

`launch/tpu_pod.sh` is a thin wrapper around this file. The launcher is Python (standard library
only, so it runs on any laptop with gcloud) rather than bash because its hard parts are argument
handling and quoting: every override must reach the trainer on every worker byte for byte,
through gcloud's `--command` string and the worker's shell. Here each argv is quoted with
`shlex.quote` (POSIX quoting, like bash's `printf %q`), gcloud is called with an argv list (no
local shell in between), and the tests import the very functions that build the remote scripts.

    launch/tpu_pod.sh create my-tpu --zone=us-east5-b --accelerator-type=v5litepod-16 --spot
    launch/tpu_pod.sh launch my-tpu --zone=us-east5-b --config=configs/smollm_1p7b.py:134m \
        --workdir=gs://BUCKET/runs/134m --config.data.sources="('austen','shakespeare')"
    launch/tpu_pod.sh status my-tpu --zone=us-east5-b
    launch/tpu_pod.sh logs my-tpu --zone=us-east5-b [--worker=all] [--follow]
    launch/tpu_pod.sh stop my-tpu --zone=us-east5-b
    launch/tpu_pod.sh delete my-tpu --zone=us-east5-b

On every worker (paths relative to the remote home, `--remote-dir`, default `effllm/`):
    src/COMMIT/          the shipped commit (`git archive`), so re-launching it ships nothing
    installed            "COMMIT PYTHON" of the last `pip install -e '.[tpu]'` (install once)
    logs/STAMP.log       one log per launch; logs/latest.log points at the newest
    trainer.pid          process group of the detached trainer (what `stop` kills)
    jax_cache/           JAX_COMPILATION_CACHE_DIR unless --compilation-cache says otherwise
Every subcommand takes --dry-run: print each command (gcloud, git) and run none of them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

PROG = "launch/tpu_pod.sh"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING_MARK = "effllm-missing-commit"  # the probe prints this on a worker that lacks the commit
# A trainer's command line starts with the interpreter (`env` and `exec` replace themselves).
# The [.] keeps this pattern from matching the shell that runs it.
TRAINER_PATTERN = "^[^ ]*python[^ ]* .*-m effllm_jax[.]train"
READY_STATES = {"READY", "ACTIVE"}
DEAD_STATES = {"PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED", "STOPPED"}


class UsageError(Exception):
    """Bad command line: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- remote scripts
# Each returns a bash script for the worker; every value in it is quoted with q().

def q(word: str) -> str:
    """One shell word that the worker's shell reads back as exactly `word` (cf. printf %q).

    shlex.quote's single quotes, except that a word holding a single quote goes in double
    quotes with $ ` " and backslash escaped, so overrides such as sources="('a','b')" stay
    legible in --dry-run's output."""
    if "'" not in word:
        return shlex.quote(word)
    return '"' + re.sub(r'([$`"\\])', r"\\\1", word) + '"'


def quote_argv(argv: Sequence[str]) -> str:
    """One shell word per argument: a shell evaluating the result sees exactly `argv`."""
    return " ".join(q(a) for a in argv)


def _prelude(remote_dir: str) -> str:
    """Find (make) the worker's root; `ours PID` holds for processes running from under it, and
    `trainer_group` prints the recorded trainer's process group while any of ours is in it."""
    return f"""set -eu
if [ -z "${{BASH_VERSION:-}}" ]; then echo "$(hostname): error: needs bash as the login shell" >&2; exit 1; fi
cd "$HOME"
mkdir -p {q(remote_dir)}
root=$(cd {q(remote_dir)} && pwd)
ours() {{
  case "$(readlink "/proc/$1/cwd" 2>/dev/null || true)" in "$root"/*) return 0 ;; esac
  return 1
}}
trainer_group() {{
  pgid=$(cat "$root/trainer.pid" 2>/dev/null || true)
  for pid in $(pgrep -g "${{pgid:-none}}" 2>/dev/null || true); do
    if ours "$pid"; then echo "$pgid"; return; fi
  done
}}
"""


def probe_script(remote_dir: str, commit: str) -> str:
    """Prints MISSING_MARK on a worker that does not have the commit unpacked yet."""
    return _prelude(remote_dir) + (
        f'if [ ! -d "$root/src/{commit}" ]; then echo "{MISSING_MARK} on $(hostname)"; fi\n')


def stop_body(grace_s: int) -> str:
    """Kill the recorded trainer's process group and any trainer running from our code dirs."""
    return f"""pgid=$(trainer_group)
pids=${{pgid:+-$pgid}}
for pid in $(pgrep -u "$(id -u)" -f "{TRAINER_PATTERN}" || true); do
  if ours "$pid"; then pids="$pids $pid"; fi
done
if [ -n "$pids" ]; then
  echo "$(hostname): stopping trainer(s) $pids"
  # shellcheck disable=SC2086  # $pids is a list of ids
  kill -TERM -- $pids 2>/dev/null || true
  waited=0
  # shellcheck disable=SC2086
  while [ "$waited" -lt {int(grace_s)} ] && kill -0 -- $pids 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
  done
  # shellcheck disable=SC2086
  kill -KILL -- $pids 2>/dev/null || true
fi
rm -f "$root/trainer.pid"
# A killed TPU process leaves the libtpu lock file behind, and it would block the next one.
rm -f /tmp/libtpu_lockfile 2>/dev/null || true
"""


def stop_script(remote_dir: str, grace_s: int) -> str:
    """Stop every trainer this launcher started on the worker."""
    return _prelude(remote_dir) + stop_body(grace_s) + 'echo "$(hostname): no trainer running"\n'


@dataclass
class LaunchSpec:
    """What `launch` starts on every worker."""
    commit: str
    config: str
    workdir: str
    overrides: list[str]
    python: str = "python3"
    compilation_cache: Optional[str] = None  # None: $root/jax_cache on each worker
    env: tuple[str, ...] = ()  # extra KEY=VALUE for the trainer
    stamp: str = "run"
    grace_s: int = 30

    def trainer_argv(self) -> list[str]:
        """The trainer's argv, after `env VARS...`."""
        return [self.python, "-m", "effllm_jax.train", f"--config={self.config}",
                f"--workdir={self.workdir}", *self.overrides]


def launch_script(remote_dir: str, spec: LaunchSpec) -> str:
    """Unpack the shipped commit, install it once, stop stale trainers, start one detached."""
    c = spec.commit
    cache = ('JAX_COMPILATION_CACHE_DIR="$root/jax_cache"' if spec.compilation_cache is None
             else q(f"JAX_COMPILATION_CACHE_DIR={spec.compilation_cache}"))
    env = " ".join(["EFFLLM_DISTRIBUTED=1", "PYTHONUNBUFFERED=1", cache]
                   + [q(kv) for kv in spec.env])
    return _prelude(remote_dir) + f"""host=$(hostname)
code="$root/src/{c}"
tarball="$HOME/effllm-{c}.tar.gz"
if [ ! -d "$code" ]; then
  if [ ! -f "$tarball" ]; then
    echo "$host: error: neither $code nor $tarball is here" >&2
    exit 1
  fi
  rm -rf "$code.partial" && mkdir -p "$code.partial"
  tar -xzf "$tarball" -C "$code.partial"
  mv "$code.partial" "$code"
fi
rm -f "$tarball"
mkdir -p "$root/logs"
if [ "$(cat "$root/installed" 2>/dev/null || true)" != "{c} "{q(spec.python)} ]; then
  echo "$host: pip install -e .[tpu] of {c[:12]} (once per commit)"
  install_log="$root/logs/install-{c}.log"
  if ! (cd "$code" && {q(spec.python)} -m pip install -e ".[tpu]") >"$install_log" 2>&1; then
    tail -n 20 "$install_log" >&2
    echo "$host: error: pip install failed, full log in $install_log" >&2
    exit 1
  fi
  echo "{c} "{q(spec.python)} >"$root/installed"
fi
{stop_body(spec.grace_s)}log="$root/logs/{spec.stamp}.log"
ln -sfn "$log" "$root/logs/latest.log"
echo {q(c)} >"$root/commit"
cd "$code"
# setsid + nohup: the trainer outlives this ssh session, as the leader of its own process group.
setsid nohup env {env} \\
  {quote_argv(spec.trainer_argv())} >"$log" 2>&1 </dev/null &
echo "$!" >"$root/trainer.pid"
echo "$host: trainer started (pid $!), log $log"
"""


def status_script(remote_dir: str) -> str:
    """One line per worker: running or not, commit, log, and the log's last line."""
    return _prelude(remote_dir) + """host=$(hostname)
pgid=$(trainer_group)
state="not running"
if [ -n "$pgid" ]; then state="running (pid $pgid)"; fi
log=$(readlink "$root/logs/latest.log" 2>/dev/null || echo none)
echo "$host: trainer $state; commit $(cat "$root/commit" 2>/dev/null || echo none); log $log"
if [ -f "$log" ]; then  # the last line, or tqdm's last progress update
  echo "$host:   $(tail -n 1 "$log" | tr "\\r" "\\n" | grep . | tail -n 1)"
fi
"""


def logs_script(remote_dir: str, lines: int, follow: bool, prefix: bool) -> str:
    """Tail (or follow) the latest log; with `prefix`, each line starts with the host name."""
    tail = f'tail -n {int(lines)}{" -F" if follow else ""} "$root/logs/latest.log"'
    if prefix:
        tail += ' | sed -u "s|^|$(hostname): |"'
    return _prelude(remote_dir) + f"""if [ ! -e "$root/logs/latest.log" ]; then
  echo "$(hostname): no log yet in $root/logs" >&2
  exit 1
fi
{tail}
"""


# ----------------------------------------------------------------------------- local side

class Runner:
    """Runs commands, or with dry_run prints them (copy-pasteable, one block each) and runs none."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def note(self, text: str) -> None:
        """A comment in dry-run output, a progress line otherwise."""
        print(f"# {text}", file=self.out if self.dry_run else sys.stderr, flush=True)

    def run(self, argv: list[str], capture: bool = False, check: bool = True
            ) -> Optional[subprocess.CompletedProcess]:
        """Run argv (no shell); None in dry-run."""
        if self.dry_run:
            print(shlex.join(argv) + "\n", file=self.out, flush=True)
            return None
        kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) if capture else {}
        proc = subprocess.run(argv, **kw)
        if check and proc.returncode != 0:
            detail = (proc.stderr or "").strip().splitlines()[-1:] if capture else []
            raise SystemExit(f"{PROG}: error: {shlex.join(argv[:5])} ... failed "
                             f"(exit {proc.returncode}){': ' + detail[0] if detail else ''}")
        return proc


@dataclass
class Pod:
    """A TPU VM (or a queued resource whose node has the same name) and how to reach it."""
    name: str
    zone: Optional[str]
    project: Optional[str]
    queued: bool = False

    def gcloud(self, *args: str) -> list[str]:
        """gcloud argv with this pod's zone and project."""
        loc = [f"--zone={self.zone}"] if self.zone else []
        loc += [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", *args, *loc]

    def ssh(self, script: str, worker: str = "all") -> list[str]:
        """Run `script` on one worker or on all of them at once (sshd hands the --command
        string to the user's login shell, bash on TPU VMs: one level of quoting)."""
        return self.gcloud("tpu-vm", "ssh", self.name, f"--worker={worker}", f"--command={script}")

    def describe(self) -> list[str]:
        """Prints the state (READY, PREEMPTED, ...; ACTIVE, WAITING_FOR_RESOURCES, ...)."""
        if self.queued:
            return self.gcloud("queued-resources", "describe", self.name,
                               "--format=value(state.state)")
        return self.gcloud("tpu-vm", "describe", self.name, "--format=value(state)")

    def delete(self) -> list[str]:
        """Delete the VM (a queued resource with --force, which deletes its node too)."""
        if self.queued:
            return self.gcloud("queued-resources", "delete", self.name, "--force", "--quiet")
        return self.gcloud("tpu-vm", "delete", self.name, "--quiet")


def create_command(pod: Pod, accelerator_type: str, runtime_version: str, spot: bool,
                   reserved: bool) -> list[str]:
    """The gcloud create command for a TPU VM or a queued resource."""
    kind = ["--spot"] if spot else ["--reserved"] if reserved else []
    if pod.queued:
        return pod.gcloud("queued-resources", "create", pod.name, f"--node-id={pod.name}",
                          f"--accelerator-type={accelerator_type}",
                          f"--runtime-version={runtime_version}", *kind)
    return pod.gcloud("tpu-vm", "create", pod.name, f"--accelerator-type={accelerator_type}",
                      f"--version={runtime_version}", *kind)


def current_state(pod: Pod, runner: Runner) -> Optional[str]:
    """The pod's state, or None when it does not exist (or in dry-run)."""
    proc = runner.run(pod.describe(), capture=True, check=False)
    if proc is None:
        return None
    if proc.returncode != 0:
        if "NOT_FOUND" in proc.stderr or "not found" in proc.stderr.lower():
            return None
        raise SystemExit(f"{PROG}: error: cannot describe {pod.name}: "
                         f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout.strip() or "UNKNOWN"


def cmd_create(args, pod: Pod, runner: Runner) -> None:
    """Create the pod, reuse it when it is up, or recreate it when it was preempted."""
    state = current_state(pod, runner)
    if state in READY_STATES:
        runner.note(f"{pod.name} is {state}: reusing it")
        return
    if state in DEAD_STATES:
        runner.note(f"{pod.name} is {state}: deleting it to create it again")
        runner.run(pod.delete())
        state = None
    if state is None:
        if runner.dry_run:
            runner.note(f"only if {pod.name} does not exist yet (or was preempted):")
        runner.run(create_command(pod, args.accelerator_type, args.runtime_version,
                                  args.spot, args.reserved))
    if runner.dry_run:
        runner.note(f"then poll describe until it prints {' or '.join(sorted(READY_STATES))}")
        return
    deadline = time.monotonic() + 60 * args.wait_minutes
    while (state := current_state(pod, runner)) not in READY_STATES:
        if state in DEAD_STATES or time.monotonic() > deadline:
            raise SystemExit(f"{PROG}: error: {pod.name} is {state or 'gone'} after waiting "
                             f"{args.wait_minutes} min")
        runner.note(f"{pod.name} is {state}; waiting")
        time.sleep(30)
    runner.note(f"{pod.name} is {state}")


def local_commit() -> str:
    """HEAD of this checkout; warns that uncommitted changes are not shipped."""
    git = ["git", "-C", REPO_ROOT]
    proc = subprocess.run([*git, "rev-parse", "--verify", "HEAD"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{PROG}: error: {REPO_ROOT} is not a git checkout with a commit")
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print(f"{PROG}: warning: uncommitted changes are not shipped; launching HEAD "
              f"{proc.stdout.strip()[:12]}", file=sys.stderr)
    return proc.stdout.strip()


def cmd_launch(args, pod: Pod, runner: Runner) -> None:
    """Ship HEAD where missing, install once, stop stale trainers, start detached everywhere."""
    commit = local_commit()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    spec = LaunchSpec(commit=commit, config=args.config, workdir=args.workdir,
                      overrides=args.overrides, python=args.python,
                      compilation_cache=args.compilation_cache, env=tuple(args.env),
                      stamp=f"{stamp}-{commit[:12]}", grace_s=args.grace)
    probe = runner.run(pod.ssh(probe_script(args.remote_dir, commit)), capture=True)
    if runner.dry_run:
        runner.note(f"only if that printed {MISSING_MARK} (a worker lacks {commit[:12]}):")
    if probe is None or MISSING_MARK in probe.stdout:
        with tempfile.TemporaryDirectory() as tmp:
            tarball = os.path.join(tmp, f"effllm-{commit}.tar.gz")
            runner.run(["git", "-C", REPO_ROOT, "archive", "--format=tar.gz",
                        f"--output={tarball}", commit])
            runner.run(pod.gcloud("tpu-vm", "scp", tarball, f"{pod.name}:effllm-{commit}.tar.gz",
                                  "--worker=all"))
    else:
        runner.note(f"every worker has {commit[:12]}: nothing to ship")
    runner.run(pod.ssh(launch_script(args.remote_dir, spec)))


def cmd_status(args, pod: Pod, runner: Runner) -> None:
    """The pod's state, then one line per worker."""
    state = current_state(pod, runner)
    if not runner.dry_run:
        runner.note(f"{pod.name}: {state or 'does not exist'}")
        if state is None:
            return
    runner.run(pod.ssh(status_script(args.remote_dir)))


def cmd_logs(args, pod: Pod, runner: Runner) -> None:
    """Tail or follow the latest log of one worker or of all of them."""
    script = logs_script(args.remote_dir, args.lines, args.follow, prefix=args.worker == "all")
    runner.run(pod.ssh(script, worker=args.worker))


def cmd_stop(args, pod: Pod, runner: Runner) -> None:
    """Stop the trainer (and any stale one) on every worker."""
    runner.run(pod.ssh(stop_script(args.remote_dir, args.grace)))


def cmd_delete(args, pod: Pod, runner: Runner) -> None:
    """Delete the TPU VM or queued resource."""
    runner.run(pod.delete())


COMMANDS = {"create": cmd_create, "launch": cmd_launch, "status": cmd_status, "logs": cmd_logs,
            "stop": cmd_stop, "delete": cmd_delete}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """Subcommands and their flags."""
    common = _Parser(add_help=False, allow_abbrev=False)
    common.add_argument("tpu", help="TPU VM name (for a queued resource: its node id)")
    common.add_argument("--zone", help="e.g. us-east5-b (default: gcloud config compute/zone)")
    common.add_argument("--project", help="default: gcloud config core/project")
    common.add_argument("--dry-run", action="store_true", help="print every command, run none")
    common.add_argument("--remote-dir", default="effllm", help="worker directory, relative to home")
    common.add_argument("--queued", action="store_true", help="a queued resource, not a TPU VM")
    parser = _Parser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    create = sub.add_parser("create", parents=[common], allow_abbrev=False,
                            help="create (or reuse, or recreate after preemption)")
    create.add_argument("--accelerator-type", default="v5litepod-16", help="e.g. v5p-16")
    create.add_argument("--runtime-version", default="v2-alpha-tpuv5-lite",
                        help="TPU software version, e.g. v2-alpha-tpuv5-lite, v2-alpha-tpuv5")
    kind = create.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
    kind.add_argument("--reserved", action="store_true", help="the project's reservation")
    create.add_argument("--wait-minutes", type=float, default=120, help="wait this long for READY")

    launch = sub.add_parser("launch", parents=[common], allow_abbrev=False,
                            help="ship HEAD, install once, start the trainer on every worker",
                            epilog="Trainer overrides: any --config.x=y, and everything after --.")
    launch.add_argument("--config", required=True, help="e.g. configs/smollm_1p7b.py:134m")
    launch.add_argument("--workdir", required=True, help="gs://BUCKET/runs/NAME, shared by all")
    launch.add_argument("--python", default="python3", help="interpreter on the workers")
    launch.add_argument("--compilation-cache", help="JAX_COMPILATION_CACHE_DIR (default: local)")
    launch.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the trainer (repeatable)")
    launch.add_argument("--allow-local-workdir", action="store_true",
                        help="accept a non-gs:// workdir (a single-host TPU VM only)")
    for p in (launch, sub.add_parser("stop", parents=[common], allow_abbrev=False,
                                     help="stop the trainer (and stale ones) on every worker")):
        p.add_argument("--grace", type=int, default=30, help="seconds between SIGTERM and SIGKILL")

    sub.add_parser("status", parents=[common], allow_abbrev=False,
                   help="pod state and every worker's trainer")
    logs = sub.add_parser("logs", parents=[common], allow_abbrev=False,
                          help="tail one worker's log, or all")
    logs.add_argument("--worker", default="0", help="worker index, or all")
    logs.add_argument("--lines", type=int, default=50)
    logs.add_argument("--follow", "-f", action="store_true")
    sub.add_parser("delete", parents=[common], allow_abbrev=False,
                   help="delete the TPU VM or queued resource")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv; trainer overrides (--config.*, and all after --) are kept apart, in order."""
    argv = list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    own = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(own)
    args.overrides = [a for a in argv if a.startswith("--config.")] + rest
    if args.overrides and args.command != "launch":
        raise UsageError(f"trainer overrides only go with launch: {args.overrides[0]}")
    if args.command == "launch":
        if not (args.workdir.startswith("gs://") or args.allow_local_workdir):
            raise UsageError(f"--workdir must be a gs:// path every worker shares, not "
                             f"{args.workdir!r} (--allow-local-workdir for a single-host TPU VM)")
        bad = [kv for kv in args.env if "=" not in kv or not kv.split("=")[0]]
        if bad:
            raise UsageError(f"--env wants KEY=VALUE, not {bad[0]!r}")
    if args.command == "logs" and args.worker != "all" and not args.worker.isdigit():
        raise UsageError(f"--worker is a worker index or all, not {args.worker!r}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: one line and exit 2 on bad usage."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{PROG}: error: {e} (try {PROG} --help)", file=sys.stderr)
        return 2
    pod = Pod(args.tpu, args.zone, args.project, queued=args.queued)
    try:
        COMMANDS[args.command](args, pod, Runner(args.dry_run))
    except KeyboardInterrupt:  # e.g. leaving `logs -f`; the trainers keep running
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
