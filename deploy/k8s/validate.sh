#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: renders each overlay with kustomize, checks every
# object against the Kubernetes API schemas with `kubeconform -strict` (schemas of the oldest
# and newest version covered, bundled in PyPI's kubernetes-validate, rewritten to local files),
# then the project's own rules (deploy/k8s/check_manifests.py: env vars the services read,
# probe and container ports, hardening). Each checker first proves it rejects broken input.
# Then deploy/compose.yaml: the Compose schema and the same env and port rules.
#
# usage: deploy/k8s/validate.sh
#   env: SHOP_CACHE_DIR (tools and schemas are cached there), K8S_VERSIONS ("1.27.0 1.37.0":
#        1.27 is the first with GA gRPC probes)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/lib.sh"
here="$REPO/deploy/k8s"

KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-v0.8.0}"
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.5.0}"
K8S_VALIDATE_VERSION="${K8S_VALIDATE_VERSION:-1.37.0}"
read -r -a K8S_VERSIONS <<<"${K8S_VERSIONS:-1.27.0 1.37.0}"
venv="$SHOP_CACHE_DIR/k8s-venv"
schemas="$SHOP_CACHE_DIR/k8s-schemas/$K8S_VALIDATE_VERSION"

go_tool() { # go_tool NAME MODULE@VERSION
  [[ -x "$SHOP_CACHE_DIR/bin/$1" ]] && return 0
  command -v go >/dev/null || die "go is not on PATH (needed to build $1)"
  log "building $1 with go install $2 (first run only)"
  GOBIN="$SHOP_CACHE_DIR/bin" GOFLAGS=-buildvcs=false go install "$2" || die "go install $2 failed"
}

# kustomize: kubectl's built-in one when there is a kubectl, else the standalone binary.
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize_build() { kubectl kustomize "$1"; }
else
  go_tool kustomize "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  kustomize_build() { kustomize build "$1"; }
fi
go_tool kubeconform "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  log "installing kubernetes-validate $K8S_VALIDATE_VERSION (its bundled JSON schemas) into $venv"
  python3 -m venv "$venv" || die "python3 -m venv failed"
  "$venv/bin/pip" install -q "kubernetes-validate==$K8S_VALIDATE_VERSION" || die "pip install kubernetes-validate failed"
fi
bundled="$("$venv/bin/python" -c 'import kubernetes_validate, os; print(os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema"))')"
"$venv/bin/python" "$here/check_manifests.py" schemas "$bundled" "$schemas" "${K8S_VERSIONS[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# kubeconform_all FILE... — every object against every version's strict schemas.
kubeconform_all() {
  local v
  for v in "${K8S_VERSIONS[@]}"; do
    kubeconform -strict -summary -output text -kubernetes-version "$v" \
      -schema-location "$schemas/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
      "$@" || return 1
  done
}

log "self-test: kubeconform must reject known-bad objects"
cat >"$work/bad-probe.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: bad-probe}
spec:
  containers:
    - name: c
      image: x
      livenessProbe: {grpc: {service: ""}}
YAML
cat >"$work/bad-field.yaml" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad-field}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - {name: c, image: x, readinessProbes: {grpc: {port: 1}}}
YAML
cat >"$work/bad-version.yaml" <<'YAML'
apiVersion: policy/v1beta1
kind: PodDisruptionBudget
metadata: {name: bad-version}
spec: {minAvailable: 1, selector: {matchLabels: {a: b}}}
YAML
for bad in bad-probe bad-field bad-version; do
  if kubeconform_all "$work/$bad.yaml" >"$work/$bad.out" 2>&1; then
    cat "$work/$bad.out" >&2
    die "kubeconform accepted $bad.yaml; the schema check proves nothing"
  fi
  # The reason is at the end of kubeconform's line ("at '/spec/...': missing property 'port'").
  printf 'ok: kubeconform rejects %s: %s\n' "$bad" \
    "$(grep -m1 -E 'invalid|failed' "$work/$bad.out" | sed -E "s/.*(at '|failed validation: )/\1/" | cut -c1-160)"
done

status=0
rendered=()
for overlay in "$here"/overlays/*/; do
  name="$(basename "$overlay")"
  log "rendering overlay $name"
  kustomize_build "$overlay" >"$work/$name.yaml" || die "kustomize failed on $overlay"
  printf 'overlay %s: %s objects (%s)\n' "$name" "$(grep -c '^kind:' "$work/$name.yaml")" \
    "$(grep '^kind:' "$work/$name.yaml" | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $3; sep=", "}')"
  log "kubeconform -strict, Kubernetes ${K8S_VERSIONS[*]}: overlay $name"
  kubeconform_all "$work/$name.yaml" || status=1
  rendered+=("$work/$name.yaml")
done

log "self-test: the project's rules must reject known-bad renderings"
"$venv/bin/python" "$here/check_manifests.py" self-test "$REPO" "$work/local.yaml" || status=1
log "the project's rules: env vars read, ports, probes, hardening"
"$venv/bin/python" "$here/check_manifests.py" check "$REPO" "${rendered[@]}" || status=1

# deploy/compose.yaml: the Compose schema (docker-compose config, Debian's package), then the same
# env and port rules. Debian's podman-compose 1.0.3 has no `config` command.
if ! command -v docker-compose >/dev/null && ((EUID == 0)) && command -v apt-get >/dev/null; then
  log "installing docker-compose from Debian (to validate deploy/compose.yaml)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null || true
fi
if command -v docker-compose >/dev/null; then
  log "docker-compose config: deploy/compose.yaml"
  if docker-compose -f "$REPO/deploy/compose.yaml" config >"$work/compose.yaml"; then
    "$venv/bin/python" "$here/check_manifests.py" compose "$REPO" "$work/compose.yaml" || status=1
  else
    status=1
  fi
else
  printf '\nSKIPPED: deploy/compose.yaml validation: no docker-compose and no apt-get to install it\n\n' >&2
fi

((status == 0)) || die "manifest validation failed (see FAIL lines above)"
log "manifests valid: ${#rendered[@]} overlays and deploy/compose.yaml"
