#!/usr/bin/env bash
# The test command: brings the local services up (installing them on a fresh Debian machine),
# then runs every test of the workspace. No test is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --locked --no-fail-fast
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi
