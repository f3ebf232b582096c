"""Multi-host start: jax.distributed from flags, the environment, or auto-detection on TPU.

  python -m effllm_jax.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=0

CPU and GPU clusters pass all three (each flag may come from its environment variable instead:
EFFLLM_COORDINATOR_ADDRESS, EFFLLM_NUM_PROCESSES, EFFLLM_PROCESS_ID; a flag wins). With none of
them, EFFLLM_DISTRIBUTED=1 (set by launch/tpu_pod.sh on every worker) calls
jax.distributed.initialize() with auto-detection (TPU pods, Slurm, Open MPI).

Once started: `barrier(name)` between processes, and `check_shared_run_dir(workdir)`, which
fails at once, on every process, when the processes do not see one shared run directory
(per-host local folders), instead of hanging in a checkpoint barrier.
"""
from __future__ import annotations

import itertools
import logging
import os
import uuid
from typing import Any, Mapping

import jax

from effllm_jax import paths

log = logging.getLogger(__name__)

ENV_VARS = {"coordinator_address": "EFFLLM_COORDINATOR_ADDRESS",
            "num_processes": "EFFLLM_NUM_PROCESSES", "process_id": "EFFLLM_PROCESS_ID"}
AUTO_ENV_VAR = "EFFLLM_DISTRIBUTED"
_sequence = itertools.count()  # barrier and key names: every process calls in the same order


class DistributedError(ValueError):
    """Multi-host settings that cannot work (missing or inconsistent flags)."""


def cluster_settings(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None,
                     environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """Keyword arguments for jax.distributed.initialize, {} to auto-detect, or None (one process).

    Explicit values win over the environment variables; all three must be given together.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    for name, var in ENV_VARS.items():
        if given[name] in (None, "") and environ.get(var, "") != "":
            given[name] = environ[var]
    if all(v in (None, "") for v in given.values()):
        return {} if environ.get(AUTO_ENV_VAR) == "1" else None
    missing = [f"--{k} (or {ENV_VARS[k]})" for k, v in given.items() if v in (None, "")]
    if missing:
        raise DistributedError("multi-host start needs --coordinator_address, --num_processes and "
                               f"--process_id together; missing {', '.join(missing)}")
    try:
        count, index = int(given["num_processes"]), int(given["process_id"])
    except (TypeError, ValueError):
        raise DistributedError(f"--num_processes={given['num_processes']!r} and --process_id="
                               f"{given['process_id']!r} must be integers") from None
    if count < 1 or not 0 <= index < count:
        raise DistributedError(f"--process_id={index} must be in [0, --num_processes={count})")
    address = str(given["coordinator_address"])
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator_address={address!r} must be HOST:PORT "
                               "(process 0's address and a free port)")
    if count == 1:
        return None
    return {"coordinator_address": address, "num_processes": count, "process_id": index}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts jax.distributed when flags, environment or EFFLLM_DISTRIBUTED=1 ask for it.

    Must run before anything touches a device. Returns True if it started a multi-process run.
    """
    settings = cluster_settings(coordinator_address, num_processes, process_id)
    if settings is None or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**settings)
    log.info("process %d of %d (%d local devices of %d)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _client() -> Any:
    # The coordination service's client: the same key-value store and barriers that Orbax and
    # jax.experimental.multihost_utils use, without compiling anything.
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    if client is None:
        raise DistributedError(f"{jax.process_count()} processes but jax.distributed is not "
                               "initialized")
    return client


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Waits until every process has reached the barrier `name` (no-op for one process)."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(f"effllm/{name}/{next(_sequence)}", int(timeout_s * 1000))


def check_shared_run_dir(workdir: str, timeout_s: float = 300.0) -> None:
    """Raises paths.PathError on every process unless all of them see `workdir` as one directory.

    Process 0 writes a random token into the run directory; every process reads it back, and
    all of them learn who could not (through the coordination service, so nothing hangs).
    """
    if jax.process_count() == 1:
        return
    client, me, timeout_ms = _client(), jax.process_index(), int(timeout_s * 1000)
    key = f"effllm/shared_run_dir/{next(_sequence)}"
    probe = paths.join(workdir, ".shared_run_dir_check")
    if me == 0:
        token = uuid.uuid4().hex
        paths.write_text(probe, token)
        client.key_value_set(f"{key}/token", token)
    else:
        token = client.blocking_key_value_get(f"{key}/token", timeout_ms)
    try:
        seen = paths.read_text(probe) == token
    except OSError:
        seen = False
    client.key_value_set(f"{key}/seen/{me}", "1" if seen else "0")
    blind = [i for i in range(jax.process_count())
             if client.blocking_key_value_get(f"{key}/seen/{i}", timeout_ms) != "1"]
    if me == 0:  # every process has answered: the probe is no longer needed
        paths.remove(probe)
    if blind:
        raise paths.PathError(
            f"the run directory {workdir} is not shared between the processes: process(es) "
            f"{blind} of {jax.process_count()} cannot see the file process 0 wrote there; give "
            "every process the same shared --workdir (gs://bucket/run, or a network file system)")
