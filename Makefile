# migrated — live migration of Linux process trees with CRIU.
# `make help` lists the targets.

SHELL     := /bin/bash
GO        ?= go
GOFLAGS   ?=
BIN       := bin
PKG       := github.com/migrated/migrated
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X $(PKG)/internal/buildinfo.Version=$(VERSION)
FUZZTIME  ?= 60s
E2E_TIMEOUT ?= 60m

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## Install CRIU >= 4.2, system packages the tests use, protoc and Go modules (root, Debian 12).
	./scripts/setup.sh

.PHONY: build
build: ## Build bin/migrated and bin/migratectl.
	$(GO) build $(GOFLAGS) -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/migrated ./cmd/migratectl

.PHONY: test
test: build ## Run unit tests (with -race) and the e2e suite (root, real CRIU).
	$(GO) test $(GOFLAGS) -race -count=1 -timeout 30m $$($(GO) list ./... | grep -v /test/e2e)
	$(MAKE) e2e

.PHONY: unit
unit: ## Run unit tests only.
	$(GO) test $(GOFLAGS) -race -count=1 -timeout 30m $$($(GO) list ./... | grep -v /test/e2e)

.PHONY: e2e
e2e: build ## Run the two-host e2e suite (root, real CRIU, real namespaces).
	$(GO) test $(GOFLAGS) -count=1 -timeout $(E2E_TIMEOUT) -v ./test/e2e/...

.PHONY: proto
proto: ## Regenerate the committed protobuf/gRPC code.
	./scripts/genproto.sh

.PHONY: verify
verify: ## gofmt, go vet, stale generated code, go mod tidy.
	./scripts/verify.sh

.PHONY: fuzz
fuzz: ## Run every fuzz target for FUZZTIME (default 60s) each.
	./scripts/fuzz.sh $(FUZZTIME)

.PHONY: bench
bench: ## Go benchmarks: page protocol, hashing, page stream vs CRIU's page server.
	$(GO) test $(GOFLAGS) -run '^$$' -bench . -benchmem -count=5 ./pkg/...

.PHONY: bench-migrate
bench-migrate: build ## Migration benchmark against the alternatives (root, under 30 min); results in test/bench/results.
	$(GO) run ./test/bench $(ARGS)

.PHONY: bench-migrate-quick
bench-migrate-quick: build ## A subset of bench-migrate (root, under 5 min); results in test/bench/results/quick.
	$(GO) run ./test/bench --quick $(ARGS)

.PHONY: demo
demo: build ## Live-migrate a counting process between two local test hosts.
	$(GO) run ./test/demo

PREFIX    ?= /usr/local
DESTDIR   ?=
CERTS_DIR ?= certs
HOSTS     ?=

.PHONY: install
install: build ## Install binaries, systemd unit, example config (root; PREFIX, DESTDIR).
	install -D -m 0755 $(BIN)/migrated $(DESTDIR)$(PREFIX)/bin/migrated
	install -D -m 0755 $(BIN)/migratectl $(DESTDIR)$(PREFIX)/bin/migratectl
	install -d -m 0755 $(DESTDIR)/etc/systemd/system
	sed 's#/usr/local/#$(PREFIX)/#g' deploy/systemd/migrated.service > $(DESTDIR)/etc/systemd/system/migrated.service
	chmod 0644 $(DESTDIR)/etc/systemd/system/migrated.service
	install -D -m 0644 deploy/systemd/config.example $(DESTDIR)/etc/migrated/config.example
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/migrated/README.md
	install -d -m 0700 $(DESTDIR)/etc/migrated/tls
	@if [ -z "$(DESTDIR)" ] && ! getent group migrated >/dev/null; then groupadd --system migrated; fi
	@echo "installed; next: /etc/migrated/config (from config.example), certificates (make certs), then"
	@echo "  systemctl daemon-reload && systemctl enable --now migrated"

.PHONY: certs
certs: build ## CA and host certificates in CERTS_DIR (default certs/) for HOSTS="host1=10.0.0.1 host2=10.0.0.2".
	@test -n "$(HOSTS)" || { echo 'usage: make certs HOSTS="host1=10.0.0.1 host2=10.0.0.2" [CERTS_DIR=certs]'; exit 2; }
	$(BIN)/migratectl certs init $(CERTS_DIR) $(foreach h,$(HOSTS),--host $(h))

.PHONY: clean
clean: ## Remove build output.
	rm -rf $(BIN)
