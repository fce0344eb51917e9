#!/usr/bin/env bash
# One erasure on a semi-parametric model (SPM), through the API, as a client sees it with curl: a
# digits SPM bootstrapped on the embedded default (SQLite, filesystem broker), the API, two workers
# (the control queue on its own, as README advises, so that the instant stage never waits behind a
# batch) and the scheduler started; the request takes instant effect (its samples leave the
# datastore: a new version, encoder unchanged), then the batch unlearns the encoder and completes
# it; a retrain reference is asked for, and the evidence shows both stages. An edge device that holds the first
# artifact fetches only the datastore delta. A few minutes on two cores.
#
#   docs/examples/spm-walkthrough.sh [FOLDER]    (a fresh folder; default: a new temporary one)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
python="$("$root/bin/ensure-venv")/bin/python"
source "$root/docs/examples/walkthrough-common.sh"
api_port="$(free_port)"

export PYTHONPATH="$root" QFORGET_DATA_DIR="$work/var" QFORGET_DATABASE_URL="" QFORGET_BROKER_URL="" \
    QFORGET_MODEL_STORE="$work/var/models" QFORGET_API_PORT="$api_port" QFORGET_TORCH_THREADS=1 \
    QFORGET_SCHEDULER_INTERVAL_SECONDS=1 QFORGET_BATCH_MIN_SAMPLES=1 QFORGET_DEFAULT_MODEL=digits-spm

echo "# bootstrap a semi-parametric digits model (quantized encoder, datastore of the training samples)"
qforget bootstrap --model digits-spm --semi-parametric 2>/dev/null | tail -1
KEY="$(qforget keys create --role admin --name spm-walkthrough 2>/dev/null | tail -1)"
start api "$python" -m service.cli api
start worker "$python" -m service.cli worker --queues gpu --hostname gpu@%h
start control-worker env QFORGET_WORKER_NICE=0 "$python" -m service.cli worker --queues control --hostname control@%h
start scheduler "$python" -m service.cli scheduler
wait_until_ready

seconds_to_instant="import json, sys; from datetime import datetime as t; r = json.load(sys.stdin); \
print(round((t.fromisoformat(r['parts'][0]['instant_at']) - t.fromisoformat(r['received_at'])).total_seconds(), 2))"
wait_for() {  # wait_for WHAT PATH CONDITION: poll a GET until the Python condition on its JSON holds
    for second in $(seq 600); do
        [ "$(field "$2" "$3")" = True ] && return 0
        sleep 0.2
    done
    echo "$1 not reached after 2 minutes; logs in $work/logs" >&2; exit 1
}
etag() { curl -s -D - -o /dev/null "http://127.0.0.1:$api_port/models/deployed/artifact" -H "Authorization: Bearer $KEY" \
    | tr -d '\r' | sed -n 's/^etag: "\{0,1\}\([0-9a-f]*\)"\{0,1\}$/\1/Ip'; }

FIRST_ETAG="$(etag)"
echo; echo "# the edge device holds the deployed artifact, ETag $FIRST_ETAG"
api POST /forget-requests '{"subject_id": "subject-0001"}' | tee "$work/filed.json"
REQUEST="$(grep -m1 '"id":' "$work/filed.json" | cut -d'"' -f4)"

echo; echo "# the instant stage: the request is instant (or already further) once its samples left the datastore"
wait_for "the instant stage" "/forget-requests/$REQUEST" "['parts'][0]['instant_at'] is not None"
api GET "/forget-requests/$REQUEST"
echo; echo "# a second subject's request, to the control worker that is warm now"
SECOND="$(curl -s -X POST "http://127.0.0.1:$api_port/forget-requests" -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d '{"subject_id": "subject-0002"}' | "$python" -c 'import json, sys; print(json.load(sys.stdin)["id"])')"
wait_for "the second instant stage" "/forget-requests/$SECOND" "['parts'][0]['instant_at'] is not None"
for request in "$REQUEST" "$SECOND"; do
    echo "    request $request: received -> instant stage deployed in $(curl -s "http://127.0.0.1:$api_port/forget-requests/$request" \
        -H "Authorization: Bearer $KEY" | "$python" -c "$seconds_to_instant") s"
done

echo; echo "# the edge device: a new ETag, and the delta from the one it holds"
echo "    deployed artifact ETag now: $(etag)"
api GET "/models/deployed/datastore-delta?since=$FIRST_ETAG"

echo; echo "# the batch stage: the worker unlearns the encoder and completes the request"
wait_for "completion" "/forget-requests/$REQUEST" "['status'] == 'completed'"
api GET "/forget-requests/$REQUEST"

echo; echo "# a retrain reference without the samples, for the evidence"
api POST /models/digits-spm/references '{}' 8
wait_for "the evidence" "/forget-requests/$REQUEST/evidence" "['status'] == 'complete'"
api GET "/forget-requests/$REQUEST/evidence" "" 80
