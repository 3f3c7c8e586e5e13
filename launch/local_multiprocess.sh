#!/usr/bin/env bash
# Run a jclip command as N processes on this machine, joined over loopback: a stand-in for N hosts.
#
#   launch/local_multiprocess.sh 2 train --config configs/shapes_tiny.py --workdir runs/two_hosts
#
# Each process gets DEVICES_PER_PROCESS simulated CPU devices (default 2); process 0 prints the results.
# Logs of the other processes go to <workdir>/process_<i>.log.
set -euo pipefail
processes=${1:?usage: $0 NUM_PROCESSES train|evaluate ARGS...}
command=${2:?usage: $0 NUM_PROCESSES train|evaluate ARGS...}
shift 2
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
logs=${LOG_DIR:-$(mktemp -d)}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}" JAX_PLATFORMS=cpu
pids=()
for ((i = 1; i < processes; i++)); do
  "$python" -m "jclip.$command" "$@" --multihost --coordinator_address="127.0.0.1:$port" \
    --num_processes="$processes" --process_id="$i" > "$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
"$python" -m "jclip.$command" "$@" --multihost --coordinator_address="127.0.0.1:$port" \
  --num_processes="$processes" --process_id=0 || status=$?
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || echo "a process failed; logs of processes 1..$((processes - 1)) are in $logs" >&2
exit "$status"
