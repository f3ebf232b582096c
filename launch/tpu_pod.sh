#!/usr/bin/env bash
# Multi-host TPU pod runs: create a TPU VM (or queued resource), ship the current commit to every
# worker, install it once, start the trainer detached on all workers at once (each calls
# jax.distributed.initialize(), EFFLLM_DISTRIBUTED=1), and watch, stop or delete it.
#
#   launch/tpu_pod.sh create my-tpu --zone=us-east5-b --accelerator-type=v5litepod-16 --spot
#   launch/tpu_pod.sh launch my-tpu --zone=us-east5-b --config=configs/smollm_1p7b.py:134m \
#       --workdir=gs://BUCKET/runs/134m [--config.x=y ...] [-- other trainer flags]
#   launch/tpu_pod.sh {status|logs|stop|delete} my-tpu --zone=us-east5-b   [--dry-run on any]
#
# Re-running launch on the same gs:// workdir resumes from its latest checkpoint (after a
# preemption, too). The work is done by launch/pod.py (why Python: see its docstring).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/pod.py" "$@"
