# Sourced by the walkthroughs (needs $root, $work and $python; api and field also $api_port and
# $KEY): background processes stopped on exit, their logs under $work/logs, and curl calls shown
# as a client makes them.
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
qforget() { "$python" -m service.cli "$@"; }
mkdir -p "$work/logs"
pids=()
start() { local name="$1"; shift; "$@" >"$work/logs/$name.log" 2>&1 & pids+=($!); }
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
wait_until_ready() { until curl -sf "http://127.0.0.1:$api_port/ready" >/dev/null; do sleep 0.5; done; }

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
