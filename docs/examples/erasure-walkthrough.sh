#!/usr/bin/env bash
# One subject's erasure across two models, through the API, as a client sees it with curl: two
# digits models bootstrapped on the embedded default (SQLite, filesystem broker), the API, a worker
# and the scheduler started, a data owner's webhook endpoint (webhook-receiver.py); the request, its
# parts, the evidence per model, the erasure and its acknowledgement, the audit entries (pseudonyms
# only), the webhook deliveries, and the service's files searched for the erased samples. The
# erasure window is 0 here (its default is 24 hours). About two minutes on two cores.
#
#   docs/examples/erasure-walkthrough.sh [FOLDER]    (a fresh folder; default: a new temporary one)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
python="$("$root/bin/ensure-venv")/bin/python"
source "$root/docs/examples/walkthrough-common.sh"
api_port="$(free_port)" hook_port="$(free_port)"

export PYTHONPATH="$root" QFORGET_DATA_DIR="$work/var" QFORGET_DATABASE_URL="" QFORGET_BROKER_URL="" \
    QFORGET_MODEL_STORE="$work/var/models" QFORGET_API_PORT="$api_port" QFORGET_TORCH_THREADS=1 \
    QFORGET_SCHEDULER_INTERVAL_SECONDS=1 QFORGET_BATCH_MIN_SAMPLES=1 QFORGET_ERASURE_WINDOW_HOURS=0 \
    QFORGET_WEBHOOK_URL="http://127.0.0.1:$hook_port/qforget" \
    QFORGET_WEBHOOK_SECRET="whsec_$("$python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"

echo "# bootstrap two models on the same data set (the digits)"
qforget bootstrap --model digits-a --epochs 3 2>/dev/null | tail -1
qforget bootstrap --model digits-b --epochs 3 2>/dev/null | tail -1
KEY="$(qforget keys create --role admin --name walkthrough 2>/dev/null | tail -1)"
start receiver "$python" "$root/docs/examples/webhook-receiver.py" "$hook_port" "$work/owner-events.jsonl"
start api "$python" -m service.cli api
start worker "$python" -m service.cli worker
start scheduler "$python" -m service.cli scheduler
wait_until_ready


api GET /subjects/subject-0001 "" 40
api POST /forget-requests '{"subject_id": "subject-0001"}' | tee "$work/filed.json"
REQUEST="$(grep -m1 '"id":' "$work/filed.json" | cut -d'"' -f4)"

echo; echo "# waiting for both models' runs and the erasure (the scheduler sends them to the worker)"
for second in $(seq 600); do
    [ "$(field "/forget-requests/$REQUEST" "['erasure_acknowledged_at'] is not None")" = True ] && break
    [ "$second" = 600 ] && { echo "not erased after 10 minutes; logs in $work/logs" >&2; exit 1; }
    sleep 1
done
api GET "/forget-requests/$REQUEST"
for model in digits-a digits-b; do
    api GET "/forget-requests/$REQUEST/evidence?model=$model" "" 45
    for key in integer_export frozen_at; do
        echo "    its $key (after the samples): $(field "/forget-requests/$REQUEST/evidence?model=$model" "['$key']")"
    done
done
api GET /subjects/subject-0001 "" 20
api GET "/audit/log?object_type=forget_request&object_id=$REQUEST"
api GET /audit/subjects/subject-0001 "" 30
api GET "/webhooks/deliveries?request_id=$REQUEST"

echo; echo "# what the data owner's endpoint received and verified"
"$python" -m json.tool --json-lines "$work/owner-events.jsonl"

echo; echo "# the service's files and logs searched for the erased samples (their pixels as the workers hold them) and the subject id"
"$python" - "$work/var" "$work/logs" <<'PY'
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from workers.engine import load_dataset

var = Path(sys.argv[1])
engine = create_engine(f"sqlite:///{var / 'qforget.db'}")
with engine.connect() as connection:
    indices = connection.execute(text("SELECT dataset_index FROM samples WHERE erased_at IS NOT NULL")).scalars().all()
train = load_dataset("digits", seed=0).train
needles = [train.x[i].numpy().tobytes() for i in indices] + [b"subject-0001"]
files = [path for folder in sys.argv[1:] for path in Path(folder).rglob("*") if path.is_file()]
hits = [str(path) for path in files for needle in needles if needle in path.read_bytes()]
print(f"{len(indices)} erased samples and the subject id searched in {len(files)} files under "
      f"{' and '.join(sys.argv[1:])}: {len(hits)} found {hits}")
PY
