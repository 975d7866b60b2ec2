#!/usr/bin/env bash
# make verify: formatting, vet, generated code and go.mod are all clean.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0

unformatted=$(gofmt -l $(git ls-files '*.go' | grep -v '\.pb\.go$') 2>/dev/null || true)
if [ -n "$unformatted" ]; then
	echo "verify: gofmt needed on:"; echo "$unformatted"; fail=1
fi

go vet ./... || fail=1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp go.mod go.sum "$tmp/"
go mod tidy
if ! diff -q go.mod "$tmp/go.mod" >/dev/null || ! diff -q go.sum "$tmp/go.sum" >/dev/null; then
	echo "verify: go.mod/go.sum not tidy (go mod tidy changed them; review and commit)"; fail=1
fi

before=$(git status --porcelain -- '*.pb.go')
./scripts/genproto.sh
after=$(git status --porcelain -- '*.pb.go')
if [ -n "$(git diff --name-only -- '*.pb.go')" ] || [ "$before" != "$after" ]; then
	echo "verify: generated protobuf code is stale (run make proto and commit):"
	git diff --stat -- '*.pb.go'; fail=1
fi

[ "$fail" = 0 ] && echo "verify: clean"
exit "$fail"
