#!/bin/bash
# Resident memory of `keyward serve` before and after N requests with nobody
# scraping /metrics (issue #25). Needs oha. Usage: bench/metrics-memory.sh BINARY N
BIN=$1; N=$2
D=$(mktemp -d)
env -i PATH=$PATH KEYWARD_DATABASE_URL=sqlite://$D/k.db KEYWARD_MASTER_KEY=$(openssl rand -base64 32) KEYWARD_LISTEN=127.0.0.1:18777 KEYWARD_AUDIT_FILE=$D/audit.jsonl KEYWARD_LOG_LEVEL=warn $BIN serve >$D/log 2>&1 &
PID=$!
sleep 2
oha -n 20000 -c 16 --no-tui http://127.0.0.1:18777/healthz >/dev/null
sleep 1
A=$(grep VmRSS /proc/$PID/status | awk '{print $2}')
T0=$(date +%s.%N)
oha -n $N -c 16 --no-tui http://127.0.0.1:18777/healthz | grep -E "Requests/sec" 
T1=$(date +%s.%N)
sleep 2
B=$(grep VmRSS /proc/$PID/status | awk '{print $2}')
echo "$BIN: RSS after warm-up ${A} KiB, after $N more requests without a scrape ${B} KiB; growth $((B-A)) KiB; $(echo "($B-$A)*1024/$N" | bc -l | cut -c1-5) bytes/request"
kill $PID; wait $PID 2>/dev/null; rm -rf $D
