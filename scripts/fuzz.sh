#!/usr/bin/env bash
# make fuzz: run every native fuzz target in the module for the given time.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${1:-60s}
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	targets=$(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' || true)
	for t in $targets; do
		echo "fuzz: $pkg $t for $fuzztime"
		go test -run '^$' -fuzz "^$t\$" -fuzztime "$fuzztime" "$pkg"
	done
done
