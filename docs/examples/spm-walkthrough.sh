#!/usr/bin/env bash
# One erasure on a semi-parametric model (SPM), through the API, as a client sees it with curl: a
# digits SPM bootstrapped on the embedded default (SQLite, filesystem broker), the API, a worker and
# the scheduler started; the request takes instant effect (its samples leave the datastore: a new
# version, encoder unchanged), then the batch unlearns the encoder and completes it; a retrain
# reference is asked for, and the evidence shows both stages. An edge device that holds the first
# artifact fetches only the datastore delta. A few minutes on two cores.
#
#   docs/examples/spm-walkthrough.sh [FOLDER]    (a fresh folder; default: a new temporary one)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
python="$("$root/bin/ensure-venv")/bin/python"
api_port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

export PYTHONPATH="$root" QFORGET_DATA_DIR="$work/var" QFORGET_DATABASE_URL="" QFORGET_BROKER_URL="" \
    QFORGET_MODEL_STORE="$work/var/models" QFORGET_API_PORT="$api_port" QFORGET_TORCH_THREADS=1 \
    QFORGET_SCHEDULER_INTERVAL_SECONDS=1 QFORGET_BATCH_MIN_SAMPLES=1 QFORGET_DEFAULT_MODEL=digits-spm
qforget() { "$python" -m service.cli "$@"; }
mkdir -p "$work/logs"
pids=()
start() { local name="$1"; shift; "$@" >"$work/logs/$name.log" 2>&1 & pids+=($!); }
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

echo "# bootstrap a semi-parametric digits model (quantized encoder, datastore of the training samples)"
qforget bootstrap --model digits-spm --semi-parametric 2>/dev/null | tail -1
KEY="$(qforget keys create --role admin --name spm-walkthrough 2>/dev/null | tail -1)"
start api "$python" -m service.cli api
start worker "$python" -m service.cli worker
start scheduler "$python" -m service.cli scheduler
until curl -sf "http://127.0.0.1:$api_port/ready" >/dev/null; do sleep 0.5; done

api() {  # api METHOD PATH [JSON [LINES]]: the curl command, then its answer (its first LINES lines)
    local method="$1" path="$2" body="${3:-}" lines="${4:-10000}" answer
    echo
    echo "\$ curl -s -X $method http://127.0.0.1:\$PORT$path -H 'Authorization: Bearer \$KEY'${body:+ -d '$body'}"
    answer="$(curl -s -X "$method" "http://127.0.0.1:$api_port$path" -H "Authorization: Bearer $KEY" \
        ${body:+-H 'Content-Type: application/json' -d "$body"} | "$python" -m json.tool)"
    sed -n "1,${lines}p" <<<"$answer"
    [ "$(wc -l <<<"$answer")" -le "$lines" ] || echo "    ... ($(wc -l <<<"$answer") lines in all)"
}
field() { curl -s "http://127.0.0.1:$api_port$1" -H "Authorization: Bearer $KEY" | "$python" -c "import json, sys; print(json.load(sys.stdin)$2)"; }
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
echo; echo "# a second subject's request, to the worker that is warm now"
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
