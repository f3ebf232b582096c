#!/usr/bin/env bash
# Multi-host TPU pod run: the same command on every worker at once; each calls
# jax.distributed.initialize() (EFFLLM_DISTRIBUTED=1), reads only its rows of every batch,
# and Orbax writes one checkpoint to the shared --workdir (use a gs:// bucket).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/smollm_1p7b.py:134m gs://BUCKET/runs/134m [overrides...]
#
# Re-running the same line resumes from the latest checkpoint (after a preemption, too).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${EFFLLM_REPO_DIR:-effllm-jax}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  cd $repo && pip install -q -e . 'jax[tpu]==0.10.2'
  EFFLLM_DISTRIBUTED=1 python -m effllm_jax.train --config=$config --workdir=$workdir $*
"
