#!/usr/bin/env bash
# Outrigger on kind, for people with Docker: a cluster whose workers stand for GPU
# pools on AWS and Azure (kind-config.yaml), the operator image built from the
# Dockerfile and loaded into kind, the chart installed, the example pools applied.
#
# NOT exercised by CI: this repository's CI has no Docker engine. The path that CI
# does run is the local cluster (hack/cluster, docs/local-cluster.md).
#
# Needs: docker, kind, kubectl, helm on PATH.
# Usage: hack/kind/up.sh            create (or reuse) the cluster and install
#        hack/kind/up.sh down       delete the cluster
#
# The workers have no GPUs: each gets 8 fake nvidia.com/gpu (a status patch, as the
# Kubernetes docs do for extended resources), so the scheduler can place replicas.
# The example pools keep their `scaling` sections; with the simulators reachable
# from the cluster (OUTRIGGER_AWS_ENDPOINT, OUTRIGGER_AZURE_ENDPOINT), the chart
# points the operator at them.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=outrigger
NS=outrigger-system
TAG="$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/outrigger/Chart.yaml)"
IMAGE="outrigger:$TAG"

log() { printf '[kind] %s\n' "$*" >&2; }

if [[ "${1:-}" == down ]]; then
    kind delete cluster --name "$CLUSTER"
    exit 0
fi
for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || { log "$tool is not on PATH"; exit 1; }
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
    log "creating kind cluster $CLUSTER"
    kind create cluster --config hack/kind/kind-config.yaml
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "fake GPUs: 8 nvidia.com/gpu on each pool worker"
for node in $(kubectl get nodes -l outrigger.dev/pool -o name); do
    kubectl patch "$node" --subresource=status --type=json \
        -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"8"}]' >/dev/null
done

log "building $IMAGE from the Dockerfile and loading it into kind"
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "installing the chart into $NS (restricted Pod Security)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
set_args=(--set image.repository=outrigger --set "image.tag=$TAG" --set image.pullPolicy=Never)
if [[ -n "${OUTRIGGER_AWS_ENDPOINT:-}" ]]; then
    set_args+=(--set "cloud.aws.endpointUrl=$OUTRIGGER_AWS_ENDPOINT")
fi
if [[ -n "${OUTRIGGER_AZURE_ENDPOINT:-}" ]]; then
    set_args+=(--set "cloud.azure.endpointUrl=$OUTRIGGER_AZURE_ENDPOINT")
fi
helm upgrade --install outrigger charts/outrigger --namespace "$NS" "${set_args[@]}" --wait --timeout 180s

log "example pools and a ModelDeployment"
kubectl apply -f examples/pools-aws.yaml -f examples/pools-azure.yaml
kubectl apply -f examples/small-model.yaml
log "done: kubectl get md,gnp; kubectl -n $NS logs deploy/outrigger; hack/kind/up.sh down"
