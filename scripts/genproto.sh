#!/usr/bin/env bash
# make proto: regenerate every committed *.pb.go from its .proto with the
# generator versions pinned in go.mod's tool block and Debian's protoc.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "genproto: protoc missing (make setup installs protobuf-compiler)" >&2; exit 1; }
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/" google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc
for proto in $(git ls-files --cached --others --exclude-standard '*.proto'); do
	PATH="$bin:$PATH" protoc -I . \
		--go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative \
		"$proto"
done
