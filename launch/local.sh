#!/usr/bin/env bash
# Single-host run (CPU, one GPU box or one TPU VM). Extra args go to the trainer, e.g.
#   launch/local.sh configs/tiny.py runs/tiny --config.train.steps=200
set -euo pipefail
config=${1:-configs/tiny.py}
workdir=${2:-runs/$(basename "${config%%.py*}")}
shift $(( $# >= 2 ? 2 : $# ))
exec python -m effllm_jax.train --config="$config" --workdir="$workdir" "$@"
