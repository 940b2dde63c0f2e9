#!/usr/bin/env bash
# Build and start the compose deployment, send a /predict, check /metrics and Prometheus' view of
# the target, tear down. Needs a Docker engine (../shared/tools/docker-base-images.sh makes one
# here), curl and python3 (its standard library only: no project install); the bundles and the
# example digit ship in the repository. Not part of CI; run by hand from a clone:
# tests/docker/compose_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
COMPOSE=${COMPOSE:-$(command -v docker-compose >/dev/null && echo docker-compose || echo "docker compose")}
PY=${PY:-python3}
for tool in docker curl "$PY"; do command -v "$tool" >/dev/null || { echo "compose smoke needs $tool" >&2; exit 2; }; done
export COMPOSE_PROJECT_NAME=ocdsmoke

# torch: the PyTorch CPU index, or a local CPU wheel copied into the build context
if ! curl -sf -m 5 -o /dev/null https://download.pytorch.org/whl/cpu/; then
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
  [ -n "$wheel" ] && cp -n "$wheel" docker/wheels/
fi
ls models/*/*/manifest.json >/dev/null

cleanup() { $COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
$COMPOSE build
$COMPOSE up -d

echo "waiting for the service to be healthy..."
cid=$($COMPOSE ps -q ocd)
for _ in $(seq 90); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] && break
  [ "$(docker inspect -f '{{.State.Status}}' "$cid")" = running ] || break
  sleep 2
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] || { $COMPOSE logs ocd; exit 1; }

expected=7  # examples/digits/<label>/: MNIST digits as PNG files
answer=$($PY -c 'import base64, json, sys; print(json.dumps({"model": "mnist", "ensemble": 5, "seed": 1,
  "input": base64.b64encode(open(sys.argv[1], "rb").read()).decode()}))' examples/digits/7/00.png \
  | curl -sf localhost:8000/predict -H 'content-type: application/json' -d @-)
echo "predict: $answer"
label=$(echo "$answer" | $PY -c 'import json,sys; print(json.load(sys.stdin)["label"])')
[ "$label" = "$expected" ] || { echo "expected label $expected, got $label"; exit 1; }

curl -sf localhost:8000/metrics | grep '^ocd_requests_total{' | grep 'endpoint="/predict"' | grep 'code="200"' \
  | grep -E '\} [1-9]'
prom_wait() {  # $1: URL-encoded PromQL, $2: pattern the answer must match; retries while Prometheus scrapes
  local ans=""
  for _ in $(seq 30); do
    ans=$(curl -sf "localhost:9090/api/v1/query?query=$1" || true)
    echo "$ans" | grep -q "$2" && { echo "$ans"; return 0; }
    sleep 2
  done
  echo "$ans"; return 1
}
echo "waiting for Prometheus to scrape the service..."
up=$(prom_wait 'up%7Bjob%3D%22ocd%22%7D' '"value":\[[0-9.]*,"1"\]')  # set -e: a failed wait ends the script
echo "prometheus up: $up"
count=$(prom_wait 'sum(ocd_requests_total%7Bendpoint%3D%22%2Fpredict%22%7D)' '"value":\[[0-9.]*,"[1-9]')
echo "prometheus ocd_requests_total: $count"
echo "compose smoke: OK"
