#!/usr/bin/env bash
# Regenerates, from proto/, everything generated that the repository commits:
#   clients/python/shop/   Python messages and gRPC stubs (grpcio-tools)
#   clients/go/shop/       Go messages and gRPC stubs (protoc-gen-go, protoc-gen-go-grpc)
#   order/openapi.json     the OpenAPI (v2) description of the order service's REST shim,
#                          from the google.api.http annotations (protoc-gen-openapiv2), with
#                          clients/openapi.yaml saying what the annotations cannot (201, SSE)
# Only shop/ is generated; google/api and google/protobuf come from each language's
# own packages (googleapis-common-protos and protobuf for Python, genproto and
# google.golang.org/protobuf for Go). The generators are pinned in clients/tools.sh, one
# protoc (grpcio-tools') drives them all, so the output is byte-stable.
#
# usage: clients/generate.sh [ROOT]   writes under ROOT (default: this repository);
#                                     clients/check.sh passes a temporary folder
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=tools.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tools.sh"
clients_tools

root="${1:-$REPO}"
# The protos set no go_package: the import paths are given here (what buf's managed
# mode does), so that the contracts carry no language's packaging.
GO_MODULE=shop.example/clients/go

cd "$REPO/proto"
mapfile -t protos < <(find shop -name '*.proto' | LC_ALL=C sort)
py="$CLIENTS_VENV/bin/python"
wkt="$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
protoc() {
  "$py" -m grpc_tools.protoc -I. -I"$wkt" "$@"
}

log "Python stubs -> $root/clients/python"
rm -rf "$root/clients/python/shop"
mkdir -p "$root/clients/python"
protoc --python_out="$root/clients/python" --pyi_out="$root/clients/python" \
  --grpc_python_out="$root/clients/python" "${protos[@]}"

log "Go stubs -> $root/clients/go"
rm -rf "$root/clients/go/shop"
mkdir -p "$root/clients/go"
go_map=""
for p in "${protos[@]}"; do
  dir="$(dirname "$p")"                                 # shop/order/v1
  name="${dir#shop/}"                                   # order/v1
  go_map+=",M$p=$GO_MODULE/$dir;${name%%/*}${name##*/}" # ...;orderv1
done
go_map="${go_map#,}"
protoc --go_out="$root/clients/go" --go_opt="module=$GO_MODULE,$go_map" \
  --go-grpc_out="$root/clients/go" --go-grpc_opt="module=$GO_MODULE,$go_map" "${protos[@]}"

log "OpenAPI description of the REST shim -> $root/order/openapi.json"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
protoc --openapiv2_out="$tmp" \
  --openapiv2_opt=allow_merge=true,merge_file_name=order,openapi_naming_strategy=simple \
  --openapiv2_opt=openapi_configuration="$REPO/clients/openapi.yaml" --openapiv2_opt="$go_map" \
  shop/order/v1/order.proto
mkdir -p "$root/order"
"$py" "$REPO/clients/openapi_fixup.py" "$tmp/order.swagger.json" "$root/order/openapi.json"
