#!/usr/bin/env bash
# Write .ci/api-baseline.txtpb: the API as released, the image `buf breaking`
# in .ci/run compares the protos against (a clean clone of main has no other
# branch to compare with). Run it on a checkout of what has landed, never in
# the change that alters the protos; the diff of the baseline shows in review.
#   bash scripts/api_baseline.sh [REV]   # default: HEAD
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.ci/.buf/node_modules/.bin/buf}
rev=${1:-HEAD}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git archive "$rev" buf.yaml protos | tar -x -C "$tree"
(cd "$tree" && "$OLDPWD/$BUF" build --exclude-source-info -o api.txtpb)
cp "$tree/api.txtpb" .ci/api-baseline.txtpb
echo "wrote .ci/api-baseline.txtpb from $(git rev-parse --short "$rev")"
