#!/usr/bin/env bash
# Runs schemathesis (from PyPI, in a venv under target/) against a live controller: the
# quickstart's (a PKI, a controller on SQLite, three enrolled agents), with its operator
# certificate, over every operation of the document it serves at /v1/openapi.json. Fails on
# any server error and on any response whose status, content type or body the document does
# not allow.   bash tests/api/schemathesis.sh [PATH-TO-fieldhand-controller]
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/debug/fieldhand-controller}
venv=target/schemathesis-venv
# A venv knows its own path: one moved with its checkout no longer runs, and is made again.
if ! "$venv/bin/schemathesis" --version >/dev/null 2>&1; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "schemathesis>=4,<5"
fi
dir=target/schemathesis-quickstart
rm -rf "$dir"
"$bin" quickstart --dir "$dir" > "$dir.log" 2>&1 &
qs=$!
trap 'kill $qs 2>/dev/null || true; wait $qs 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    grep -q "^  URL=" "$dir.log" 2>/dev/null && break
    kill -0 $qs 2>/dev/null || { cat "$dir.log" >&2; exit 1; }
    sleep 0.2
done
url=$(sed -n 's/^  URL=//p' "$dir.log" | head -n 1)
[ -n "$url" ] || { cat "$dir.log" >&2; echo "the quickstart printed no URL" >&2; exit 1; }
pki="$dir/pki"
op=(--cacert "$pki/ca.pem" --cert "$pki/operators/quickstart-operator.pem"
    --key "$pki/operators/quickstart-operator-key.pem")
curl -fsS "${op[@]}" "$url/v1/openapi.json" -o target/openapi.json
"$venv/bin/schemathesis" run target/openapi.json --url "$url" \
    --tls-verify "$pki/ca.pem" \
    --request-cert "$pki/operators/quickstart-operator.pem" \
    --request-cert-key "$pki/operators/quickstart-operator-key.pem" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-examples "${SCHEMATHESIS_EXAMPLES:-50}" --generation-deterministic
