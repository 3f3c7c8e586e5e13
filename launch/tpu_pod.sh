#!/usr/bin/env bash
# jclip training on a Cloud TPU pod slice: the same command on every worker VM.
#
#   launch/tpu_pod.sh my-tpu us-central2-b configs/vit_b32.py gs://bucket/runs/vit_b32 --config.batch_size=32768
#
# Assumes jclip is checked out and installed (`pip install -e .` plus jax[tpu]) at ~/jclip on every
# worker. jax.distributed detects the pod; the workdir must be shared storage (a gs:// bucket).
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
zone=${2:?usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
config=${3:?usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
workdir=${4:?usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/jclip && python -m jclip.train --multihost --config $config --workdir $workdir $*"
