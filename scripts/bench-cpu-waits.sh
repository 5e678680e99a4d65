#!/usr/bin/env bash
# Where the CPU time of one QUIC transfer goes: run one `fedgate bench wan` row with fedgate-quic and
# read, between 9 s and 17 s into it, each QUIC process's and the emulator's CPU (user, system), time
# spent runnable but waiting for a CPU (/proc/PID/schedstat) and context switches (/proc/PID/status).
#
#   scripts/bench-cpu-waits.sh                    # the 20 ms row, default delivery tick
#   scripts/bench-cpu-waits.sh --emu-tick-us 0    # any extra `fedgate bench wan` arguments
#
# Needs root (like the bench). Processes are only read, never signalled. Run it on a quiet host.
set -euo pipefail
cd "$(dirname "$0")/.."
fedgate=${FEDGATE:-.venv/bin/fedgate}
out=$(mktemp -d /tmp/fedgate-cpu-waits.XXXXXX)
"$fedgate" bench wan --rate 100 --duration 20 --row 20:0.01 --transports fedgate-quic --no-plot \
    --calibrate 0 --no-progress --out "$out/wan" "$@" >"$out/wan.log" 2>&1 &
bench=$!
sleep 9
descendants() {  # every process under pid $1
    local kid
    for kid in $(pgrep -P "$1" || true); do echo "$kid"; descendants "$kid"; done
}
# the processes of this run only: the QUIC sender and receiver and the emulator under our bench
pids=""
for p in $(descendants "$bench"); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'quic_bulk\|tun_forwarder'; then pids+="$p "; fi
done
declare -A user sys wait invol
sample() {  # pid -> "user sys wait_ns involuntary_switches"
    local f
    read -r -a f <"/proc/$1/stat"
    echo "${f[13]} ${f[14]} $(cut -d' ' -f2 "/proc/$1/schedstat") $(awk '/^nonvoluntary/{print $2}' "/proc/$1/status")"
}
for p in $pids; do read -r user[$p] sys[$p] wait[$p] invol[$p] < <(sample "$p"); done
sleep 8
hz=$(getconf CLK_TCK)
printf '%-34s %8s %8s %10s %14s\n' process "user %" "sys %" "waiting %" "preempted/s"
for p in $pids; do
    [[ -r /proc/$p/stat ]] || continue
    read -r u s w i < <(sample "$p")
    name=$(tr '\0' ' ' <"/proc/$p/cmdline" | grep -o 'quic_bulk [a-z]*\|tun_forwarder' || echo "?")
    awk -v n="$name (pid $p)" -v u=$((u - user[$p])) -v s=$((s - sys[$p])) -v w=$((w - wait[$p])) \
        -v i=$((i - invol[$p])) -v hz="$hz" \
        'BEGIN { printf "%-34s %8.1f %8.1f %10.1f %14.0f\n", n, 100 * u / hz / 8, 100 * s / hz / 8, 100 * w / 8e9, i / 8 }'
done
wait "$bench" || { cat "$out/wan.log"; exit 1; }
grep -m1 -E "fedgate-quic +[0-9]" "$out/wan.log" || tail -5 "$out/wan.log"
echo "JSON: $out/wan.json"
