#!/usr/bin/env bash
# The smoke test of `make image`: the browser suite's deploy and smoke tests on what the
# image holds (its /sse-notify and /site, taken out with `create` + `export`), then the image
# itself started, if this machine can start containers, and asked for /healthz.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${CONTAINER:-$(command -v podman || command -v docker)}
image=localhost/sse-notify
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

id=$("$engine" create "$image")
"$engine" export "$id" | tar -x -C "$root"
"$engine" rm "$id" >/dev/null
(cd end2end && SSE_NOTIFY_BIN="$root/sse-notify" SSE_NOTIFY_SITE_ROOT="$root/site" \
  npx playwright test deploy smoke)

port=$((20000 + RANDOM % 10000))
secret=$(head -c 24 /dev/urandom | base64)
if ! name=$("$engine" run -d --rm -p "127.0.0.1:$port:3000" -e SSE_JWT_SECRET="$secret" "$image" 2>"$root/run.err"); then
  echo "image-smoke: the image's files pass; this machine cannot start a container:" >&2
  cat "$root/run.err" >&2
  exit 0
fi
trap '"$engine" stop -t 5 "$name" >/dev/null; rm -rf "$root"' EXIT
for _ in $(seq 50); do
  if curl -fsS "http://127.0.0.1:$port/healthz"; then echo; echo "image-smoke: the container serves"; exit 0; fi
  sleep 0.2
done
echo "image-smoke: the container did not answer /healthz within 10 s" >&2
"$engine" logs "$name" >&2 || true
exit 1
