#!/usr/bin/env bash
# The test command: brings the local services up (installing them on a fresh Debian machine),
# then runs every test of the workspace. No test is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# Every test but the chaos suite, in parallel; then the chaos suite (it restarts RabbitMQ and
# Redis, flushes Redis and lowers the broker's consumer timeout) alone, one test at a time.
# Both always run; the script fails if either did.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi
status=0
# The Kubernetes manifests: rendered, validated offline, consistent with the binary.
"${SLUICE_TOOLS_VENV:-$HOME/.cache/sluice/k8s-tools}/bin/python" scripts/check-kubernetes.py || status=1
cargo nextest run --workspace --all-features --locked --no-fail-fast -E 'not binary(chaos_suite)' || status=1
cargo nextest run --workspace --all-features --locked --no-fail-fast -E 'binary(chaos_suite)' --test-threads 1 || status=1
exit $status
