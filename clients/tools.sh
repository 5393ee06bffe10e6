#!/usr/bin/env bash
# The code generators and client runtimes for clients/, pinned so that the
# generated files are byte-stable: a Python virtualenv (grpcio-tools, whose
# bundled protoc compiles for every language here; grpcio and protobuf for the
# example; schemathesis for the REST fuzz), the Go protoc plugins built with
# `go install`, and buf from its npm package. Everything lands under
# $SHOP_CACHE_DIR (outside the clone, reused by later runs); a tool already at
# its pinned version is not installed again.
#
# usage: source clients/tools.sh   (sets CLIENTS_VENV, puts the tools on PATH)
#        clients/tools.sh          (installs, prints the versions)

# shellcheck source-path=SCRIPTDIR source=../deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../deploy/local/lib.sh"

GRPCIO_TOOLS_VERSION=1.85.1 # its protoc compiles for every language; also pins grpcio
PYTHON_PROTOBUF_VERSION=7.36.2
SCHEMATHESIS_VERSION=4.32.5
GOOGLEAPIS_COMMON_PROTOS_VERSION=1.76.0 # google.api.annotations, which order_pb2 imports
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2
GRPC_GATEWAY_VERSION=v2.33.0 # protoc-gen-openapiv2
BUF_VERSION=1.75.0

CLIENTS_VENV="$SHOP_CACHE_DIR/clients-venv"
CLIENTS_TOOLS="$SHOP_CACHE_DIR/clients-tools"
export CLIENTS_VENV CLIENTS_TOOLS

_clients_python() {
  local stamp="$CLIENTS_VENV/.pins"
  local want="grpcio-tools==$GRPCIO_TOOLS_VERSION grpcio==$GRPCIO_TOOLS_VERSION protobuf==$PYTHON_PROTOBUF_VERSION googleapis-common-protos==$GOOGLEAPIS_COMMON_PROTOS_VERSION schemathesis==$SCHEMATHESIS_VERSION"
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return 0
  command -v python3 >/dev/null || die "python3 is not on PATH (needed for grpcio-tools)"
  log "installing into $CLIENTS_VENV: $want"
  python3 -m venv "$CLIENTS_VENV" || die "python3 -m venv failed"
  # shellcheck disable=SC2086 # $want is a list of requirements
  "$CLIENTS_VENV/bin/pip" install -q --disable-pip-version-check $want || die "pip install failed"
  printf '%s' "$want" >"$stamp"
}

# _clients_go NAME MODULE@VERSION — one protoc plugin, per version in its own folder.
_clients_go() {
  local name="$1" pkg="$2" dir="$CLIENTS_TOOLS/go/${2##*@}"
  if [[ ! -x "$dir/$name" ]]; then
    command -v go >/dev/null || die "go is not on PATH (needed to build $name)"
    log "building $name with go install $pkg (first run only)"
    GOBIN="$dir" GOFLAGS=-buildvcs=false go install "$pkg" || die "go install $pkg failed"
  fi
  ln -sf "$dir/$name" "$CLIENTS_TOOLS/bin/$name"
}

_clients_buf() {
  local dir="$CLIENTS_TOOLS/buf-$BUF_VERSION"
  if [[ ! -x "$dir/node_modules/.bin/buf" ]]; then
    command -v npm >/dev/null || die "npm is not on PATH (needed for buf)"
    log "installing buf $BUF_VERSION from npm (first run only)"
    mkdir -p "$dir"
    npm install --silent --no-audit --no-fund --prefix "$dir" "@bufbuild/buf@$BUF_VERSION" >/dev/null ||
      die "npm install @bufbuild/buf failed"
  fi
  ln -sf "$dir/node_modules/.bin/buf" "$CLIENTS_TOOLS/bin/buf"
}

clients_tools() {
  mkdir -p "$CLIENTS_TOOLS/bin"
  _clients_python
  _clients_go protoc-gen-go "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
  _clients_go protoc-gen-go-grpc "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
  _clients_go protoc-gen-openapiv2 \
    "github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-openapiv2@$GRPC_GATEWAY_VERSION"
  _clients_buf
  case ":$PATH:" in
    *":$CLIENTS_TOOLS/bin:"*) ;;
    *) PATH="$CLIENTS_TOOLS/bin:$PATH" ;;
  esac
  export PATH
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  clients_tools
  "$CLIENTS_VENV/bin/python" -m grpc_tools.protoc --version
  protoc-gen-go --version
  protoc-gen-go-grpc --version
  buf --version
fi
