#!/usr/bin/env bash
# Outrigger on kind: a cluster whose workers stand for GPU pools on AWS and Azure
# (kind-config.yaml), the operator image built from the Dockerfile and loaded into
# kind, the chart installed into a `restricted` namespace, the simulated clouds
# reachable from the pods, the example pools and a ModelDeployment applied.
# `make kind-test` (hack/kind/test) runs it in CI.
#
# Everything is built on this machine (no image registry is needed):
#   hack/kind/node-image.sh   the kind node image and kind itself, from pinned sources
#   hack/operator-image build the operator image (the Dockerfile, binary built on the host)
#   hack/tools/install.sh     kubectl and helm
#
# Usage: hack/kind/up.sh         create (or reuse) the cluster and install
#        hack/kind/up.sh down    delete the cluster, its Docker network and the simulators
#        hack/kind/up.sh env     print the exports for kubectl, helm and kind
#
# Needs: root, a Docker engine (Debian: apt-get install docker.io; dockerd running),
# debootstrap, Go, cargo, python3.
#
# Environment (all optional):
#   OUTRIGGER_KIND_DIR        run folder: kubeconfig, simulator logs and pids
#                             (default $HOME/.cache/outrigger/kind-run)
#   OUTRIGGER_KIND_API_PORT   the API server's port on 127.0.0.1 (default 50443)
#   OUTRIGGER_KIND_SIM_PORT   first of the four simulator ports, on the kind network's
#                             gateway (default 50080: moto, EC2, Azure, control API)
#   OUTRIGGER_KIND_NETWORK    the Docker network of the nodes (default outrigger-kind)
#   OUTRIGGER_SIM_BIN         an outrigger-sim binary to run instead of building one
#
# The workers have no GPUs: each gets 8 fake nvidia.com/gpu (a status patch, as the
# Kubernetes docs do for extended resources), so the scheduler can place replicas.
# up.sh starts the simulators on the gateway address of the nodes' Docker network
# (the host's side of that bridge), and makes them a Service without selector,
# cloud-simulators in the operator's namespace, whose endpoints are that address.
# The chart points the operator at http://cloud-simulators.outrigger-system.svc:PORT
# (cloud.aws.endpointUrl, cloud.azure.endpointUrl): CoreDNS resolves it, kube-proxy
# takes it to the host.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=outrigger
NS=outrigger-system
RUN="${OUTRIGGER_KIND_DIR:-$HOME/.cache/outrigger/kind-run}"
API_PORT="${OUTRIGGER_KIND_API_PORT:-50443}"
SIM_PORT="${OUTRIGGER_KIND_SIM_PORT:-50080}"
MOTO_PORT="$SIM_PORT" EC2_PORT=$((SIM_PORT + 1)) AZURE_PORT=$((SIM_PORT + 2)) CONTROL_PORT=$((SIM_PORT + 3))
export KIND_EXPERIMENTAL_DOCKER_NETWORK="${OUTRIGGER_KIND_NETWORK:-outrigger-kind}"
NETWORK="$KIND_EXPERIMENTAL_DOCKER_NETWORK"
# The simulators take any credentials; the SDKs just need some to sign with.
SIM_CREDENTIALS=(AWS_ACCESS_KEY_ID=outrigger-local AWS_SECRET_ACCESS_KEY=outrigger-local
                 OUTRIGGER_AZURE_TOKEN=outrigger-local)

log() { printf '[kind] %s\n' "$*" >&2; }
die() { printf '[kind] error: %s\n' "$*" >&2; exit 1; }

TOOLS_BIN="$(hack/tools/install.sh --print-bin)"
KIND_BIN="$(hack/kind/node-image.sh --print-bin)"
export PATH="$KIND_BIN:$TOOLS_BIN:$PATH"
export KUBECONFIG="$RUN/kubeconfig"

# ---- simulators: moto and outrigger-sim (clouds only, no node registrar) ---------

# stop_pid <name>: stop a simulator this run folder started, if it still runs
# (the pid's command line must name the run folder, so a reused pid is left alone).
stop_pid() {
    local file="$RUN/pids/$1.pid" pid i
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$RUN"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -d "/proc/$pid" ]] || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

if [[ "${1:-}" == down ]]; then
    stop_pid outrigger-sim
    stop_pid moto
    if command -v kind >/dev/null && kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        kind delete cluster --name "$CLUSTER"
    fi
    # kind leaves its network behind; it is ours when nothing else is attached
    # (the endpoints of just-deleted nodes take a moment to go).
    if docker network inspect "$NETWORK" >/dev/null 2>&1; then
        attached="?"
        for ((i = 0; i < 50; i++)); do
            attached="$(docker network inspect -f '{{range .Containers}}{{.Name}} {{end}}' "$NETWORK")"
            [[ -z "$attached" ]] && break
            sleep 0.2
        done
        if [[ -z "$attached" ]]; then
            docker network rm "$NETWORK" >/dev/null
            log "removed Docker network $NETWORK"
        else
            log "Docker network $NETWORK still has containers ($attached); left in place"
        fi
    fi
    rm -rf "$RUN"
    exit 0
fi
if [[ "${1:-}" == env ]]; then
    # shellcheck disable=SC2016 # $PATH is for the shell that evaluates this
    printf 'export KUBECONFIG=%q\nexport PATH=%q:%q:"$PATH"\n' "$KUBECONFIG" "$KIND_BIN" "$TOOLS_BIN"
    exit 0
fi
[[ -z "${1:-}" || "${1:-}" == up ]] || die "unknown command: $1 (up, down, env)"

command -v docker >/dev/null || die "docker is not on PATH"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (start dockerd)"
t_start=$SECONDS
t0=$SECONDS
NODE_IMAGE="$(hack/kind/node-image.sh | tail -n1)"
hack/tools/install.sh >/dev/null
log "node image $NODE_IMAGE ($((SECONDS - t0)) s)"

mkdir -p "$RUN/pids" "$RUN/logs"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    t0=$SECONDS
    log "creating kind cluster $CLUSTER (network $NETWORK, API on 127.0.0.1:$API_PORT)"
    sed "s/^  apiServerPort: .*/  apiServerPort: $API_PORT/" hack/kind/kind-config.yaml >"$RUN/kind-config.yaml"
    kind create cluster --image "$NODE_IMAGE" --config "$RUN/kind-config.yaml" \
        --kubeconfig "$KUBECONFIG" --retain >&2 || {
        log "kind create failed; the control plane's kubelet and containerd logs:"
        docker exec "$CLUSTER-control-plane" journalctl -u kubelet -u containerd --no-pager 2>/dev/null | tail -n 40 >&2 || true
        die "kind create cluster failed (hack/kind/up.sh down cleans up)"
    }
    log "  cluster created in $((SECONDS - t0)) s"
else
    kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
fi

# ---- pod network: bridge + host-local on each node, routes between nodes ---------

t0=$SECONDS
log "pod network: a bridge CNI config per node, routes to the other nodes' pod CIDRs"
declare -A NODE_IP NODE_CIDR
for node in $(kubectl get nodes -o name); do
    node="${node#node/}"
    NODE_IP[$node]="$(kubectl get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"
    NODE_CIDR[$node]="$(kubectl get node "$node" -o jsonpath='{.spec.podCIDR}')"
    [[ -n "${NODE_CIDR[$node]}" ]] || die "node $node has no pod CIDR (the controller-manager allocates them)"
done
for node in "${!NODE_IP[@]}"; do
    docker exec -i "$node" sh -c 'cat >/etc/cni/net.d/10-outrigger-kind.conflist' <<EOF
{
  "cniVersion": "1.0.0",
  "name": "outrigger-kind",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "${NODE_CIDR[$node]}"}]], "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    for other in "${!NODE_IP[@]}"; do
        [[ "$other" == "$node" ]] && continue
        docker exec "$node" ip route replace "${NODE_CIDR[$other]}" via "${NODE_IP[$other]}"
    done
done
kubectl wait --for=condition=Ready nodes --all --timeout=180s >/dev/null
log "  all $(kubectl get nodes --no-headers | wc -l) nodes Ready ($((SECONDS - t0)) s)"

log "fake GPUs: 8 nvidia.com/gpu on each pool worker"
for node in $(kubectl get nodes -l outrigger.dev/pool -o name); do
    kubectl patch "$node" --subresource=status --type=json \
        -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"8"}]' >/dev/null
done

# ---- simulators on the network's gateway -----------------------------------------

GATEWAY="$(docker network inspect "$NETWORK" -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' \
    | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' | head -n1)"
[[ -n "$GATEWAY" ]] || die "no IPv4 gateway on Docker network $NETWORK"
echo "$GATEWAY" >"$RUN/gateway"

sim_binary() {
    if [[ -n "${OUTRIGGER_SIM_BIN:-}" ]]; then echo "$OUTRIGGER_SIM_BIN"; return 0; fi
    local out exe
    # The same invocation as hack/cluster.d/50-sim.sh: no other feature unification.
    out="$(cargo build --locked -p outrigger -p outrigger-tests --bins \
             --message-format=json-render-diagnostics 2>"$RUN/logs/outrigger-sim-build.log")" \
        || { tail -n 30 "$RUN/logs/outrigger-sim-build.log" >&2; die "outrigger-sim: the build failed"; }
    exe="$(grep -o '"executable":"[^"]*/outrigger-sim"' <<<"$out" | tail -n1 | cut -d'"' -f4)"
    [[ -n "$exe" ]] || die "cargo built no outrigger-sim executable"
    echo "$exe"
}

# wait_http <seconds> <url>: until the URL answers 2xx.
wait_http() {
    local deadline=$((SECONDS + $1))
    until curl -fsS -o /dev/null "$2" 2>/dev/null; do
        (( SECONDS < deadline )) || return 1
        sleep 0.3
    done
}

t0=$SECONDS
SIM_BIN="$(sim_binary)"
echo "$SIM_BIN" >"$RUN/outrigger-sim.bin"
if ! curl -fsS -o /dev/null "http://$GATEWAY:$CONTROL_PORT/healthz" 2>/dev/null; then
    log "simulators on $GATEWAY: moto :$MOTO_PORT, EC2 :$EC2_PORT, Azure :$AZURE_PORT, control :$CONTROL_PORT"
    moto_bin="$(hack/tools/install-moto.sh | tail -n1)"
    # The run folder on the command line is how `down` knows these processes.
    setsid "$moto_bin/python" -X "pycache_prefix=$RUN/moto-pycache" -m moto.server \
        -H "$GATEWAY" -p "$MOTO_PORT" >"$RUN/logs/moto.log" 2>&1 </dev/null &
    echo $! >"$RUN/pids/moto.pid"
    wait_http 60 "http://$GATEWAY:$MOTO_PORT/moto-api/" || die "moto did not answer (log $RUN/logs/moto.log)"
    # The Azure endpoint serves HTTPS, with a certificate from kind's own cluster CA
    # for the name the operator dials (cloud-simulators.<namespace>.svc).
    mkdir -p "$RUN/pki"
    docker cp "$CLUSTER-control-plane:/etc/kubernetes/pki/ca.crt" "$RUN/pki/ca.crt" >/dev/null
    docker cp "$CLUSTER-control-plane:/etc/kubernetes/pki/ca.key" "$RUN/pki/ca.key" >/dev/null
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" "subjectAltName=DNS:cloud-simulators.$NS.svc,IP:$GATEWAY" >"$RUN/pki/azure.ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=outrigger-sim-azure" \
        -keyout "$RUN/pki/azure.key" -out "$RUN/pki/azure.csr" 2>/dev/null
    openssl x509 -req -in "$RUN/pki/azure.csr" -CA "$RUN/pki/ca.crt" -CAkey "$RUN/pki/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 30 -sha256 -extfile "$RUN/pki/azure.ext" \
        -out "$RUN/pki/azure.crt" 2>/dev/null
    rm -f "$RUN/pki/ca.key" "$RUN/pki/azure.csr"
    setsid "$SIM_BIN" serve --instance "$RUN" --no-registrar \
        --moto-url "http://$GATEWAY:$MOTO_PORT" --ec2-listen "$GATEWAY:$EC2_PORT" \
        --azure-listen "$GATEWAY:$AZURE_PORT" --control-listen "$GATEWAY:$CONTROL_PORT" \
        --azure-tls-cert "$RUN/pki/azure.crt" --azure-tls-key "$RUN/pki/azure.key" \
        >"$RUN/logs/outrigger-sim.log" 2>&1 </dev/null &
    echo $! >"$RUN/pids/outrigger-sim.pid"
    wait_http 30 "http://$GATEWAY:$CONTROL_PORT/healthz" || die "outrigger-sim did not answer (log $RUN/logs/outrigger-sim.log)"
fi
env OUTRIGGER_SIM_URL="http://$GATEWAY:$CONTROL_PORT" AWS_ENDPOINT_URL_EC2="http://$GATEWAY:$EC2_PORT" \
    "${SIM_CREDENTIALS[@]}" "$SIM_BIN" clouds examples/pools-aws.yaml examples/pools-azure.yaml >&2
log "  simulators up in $((SECONDS - t0)) s"

# ---- the operator ----------------------------------------------------------------

t0=$SECONDS
IMAGE="$(hack/operator-image build | tail -n1)"
log "loading $IMAGE into kind ($((SECONDS - t0)) s to build)"
kind load docker-image "$IMAGE" --name "$CLUSTER" >&2

log "installing the chart into $NS (restricted Pod Security)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
# The simulators by name: a Service without selector whose endpoints are the
# gateway, so the operator resolves cloud-simulators.<namespace>.svc (CoreDNS) and
# kube-proxy takes it to the simulators' ports on the host.
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: cloud-simulators, namespace: $NS}
spec:
  ports:
  - {name: ec2, port: $EC2_PORT, targetPort: $EC2_PORT}
  - {name: azure, port: $AZURE_PORT, targetPort: $AZURE_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cloud-simulators-gateway
  namespace: $NS
  labels: {kubernetes.io/service-name: cloud-simulators}
addressType: IPv4
ports:
- {name: ec2, port: $EC2_PORT, protocol: TCP}
- {name: azure, port: $AZURE_PORT, protocol: TCP}
endpoints:
- addresses: ["$GATEWAY"]
EOF
secret_args=()
for kv in "${SIM_CREDENTIALS[@]}"; do secret_args+=(--from-literal="$kv"); done
kubectl -n "$NS" create secret generic outrigger-sim-credentials "${secret_args[@]}" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
helm upgrade --install outrigger charts/outrigger --namespace "$NS" \
    --set image.repository="${IMAGE%:*}" --set "image.tag=${IMAGE##*:}" --set image.pullPolicy=Never \
    --set "cloud.aws.endpointUrl=http://cloud-simulators.$NS.svc:$EC2_PORT" \
    --set "cloud.azure.endpointUrl=https://cloud-simulators.$NS.svc:$AZURE_PORT" \
    --set-file "cloud.azure.caBundle=$RUN/pki/ca.crt" \
    --set cloud.credentialsSecret=outrigger-sim-credentials \
    --wait --timeout 180s >&2
log "  operator Ready in $((SECONDS - t0)) s"

log "example pools and a ModelDeployment (hack/kind/model.yaml)"
kubectl apply -f examples/pools-aws.yaml -f examples/pools-azure.yaml -f hack/kind/model.yaml >&2
log "up in $((SECONDS - t_start)) s: eval \"\$(hack/kind/up.sh env)\"; kubectl get md,gnp; hack/kind/up.sh down"
