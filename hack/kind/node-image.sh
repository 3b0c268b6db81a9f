#!/usr/bin/env bash
# Builds, on this machine and from pinned sources only, everything `kind create
# cluster` needs, with no image pulled from any registry:
#
#   bin/   kind, containerd (+ shim, ctr), crictl, the CNI plugins, kubelet, kubeadm,
#          kube-proxy, CoreDNS (pinned Go modules under hack/tools, GO_MODULE_DIRS)
#          and pause (kubernetes' build/pause/linux/pause.c, compiled static)
#   images localhost/outrigger-kind/debian:bookworm-<base hash>  debootstrap --variant=minbase
#          localhost/outrigger-kind/base:<base hash>   + BASE_PACKAGES (apt-get)
#          localhost/outrigger-kind/<component>:<version>    one image per control-plane
#              binary (kube-apiserver, kube-controller-manager, kube-scheduler and etcd
#              from hack/tools/install.sh; kube-proxy, CoreDNS, pause from bin/); they
#              exist only while the node image is made
#          localhost/outrigger-kind/node:<kubernetes>-<node hash>  the kind node image
#              (hack/kind/node/Dockerfile), the component images preloaded in its
#              containerd
#
# The binaries go to $OUTRIGGER_CACHE/kind/<bin hash>/bin (default cache
# $HOME/.cache/outrigger); <bin hash> covers this script and the go.mod, go.sum and
# Go files of every module it builds from. A folder marked .complete is never
# changed again; one build per folder at a time (flock). The images live in
# Docker's store: the Debian ones tagged by BASE_PACKAGES and BASE_REVISION, the
# node image by the bin hash, the base, hack/kind/node/ and the pins of
# hack/tools/install.sh. A missing image is rebuilt from the cached binaries; node
# images of other pins that no container uses are removed.
#
# The last line of stdout is the node image; progress goes to stderr.
#
# Usage: hack/kind/node-image.sh               build what is missing, print the node image
#        hack/kind/node-image.sh --print-bin   print the bin folder, build nothing
#        hack/kind/node-image.sh --print-image print the node image name, build nothing
#        hack/kind/node-image.sh --base        build only the Debian images, print the base
#                                              (what hack/operator-image takes its CA bundle from)
#
# Needs: root (debootstrap, a privileged container for the preload), a Docker engine,
# debootstrap, Go >= 1.26, a C compiler with static glibc (pause).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TOOLS="$REPO/hack/tools"
CACHE_ROOT="${OUTRIGGER_CACHE:-$HOME/.cache/outrigger}"

log() { printf '[node-image] %s\n' "$*" >&2; }
die() { printf '[node-image] error: %s\n' "$*" >&2; exit 1; }

# The Go modules this script builds from (folders under hack/tools).
GO_MODULE_DIRS=(kind containerd cri-tools cni-plugins kubernetes-node coredns)
# Every binary bin/ must hold once complete.
BINARIES=(kind containerd containerd-shim-runc-v2 ctr crictl bridge host-local loopback portmap
          kubelet kubeadm kube-proxy coredns pause)
# Tags kubeadm v1.37 asks for (or that hack/kind/kind-config.yaml sets: etcd is
# hack/tools' 3.7.3, not kubeadm's default 3.7.0-0).
IMAGE_REPO=localhost/outrigger-kind
PAUSE_VERSION=3.10.2
COREDNS_VERSION=v1.14.6
ETCD_VERSION=3.7.3

# hash_files <path...>: one line per file (name and SHA-256), in a fixed order.
hash_files() {
    local f
    (cd "$REPO" && find "$@" -type f | LC_ALL=C sort | while read -r f; do
        printf '%s %s\n' "$f" "$(sha256sum <"$f" | cut -d' ' -f1)"
    done)
}

# What the Debian images are made of; bump BASE_REVISION when their making changes.
BASE_REVISION=1
BASE_PACKAGES="ca-certificates iptables conntrack iproute2"
BASE_HASH="$(printf 'bookworm minbase %s %s\n' "$BASE_REVISION" "$BASE_PACKAGES" | sha256sum | cut -c1-16)"

# The binaries: this script and the Go modules they are built from.
bin_hash() {
    local d mods=()
    for d in "${GO_MODULE_DIRS[@]}"; do mods+=("hack/tools/$d"); done
    hash_files hack/kind/node-image.sh "${mods[@]}" | grep -E '(\.sh|go\.mod|go\.sum|\.go) ' | sha256sum | cut -c1-16
}

# The node image: the binaries, hack/kind/node/, the base, and the control-plane
# tools of hack/tools/install.sh (their bin folder is named by their pin hash).
node_hash() {
    { echo "bin $BIN_HASH base $BASE_HASH tools $("$TOOLS/install.sh" --print-bin)"; hash_files hack/kind/node; } \
        | sha256sum | cut -c1-16
}

BIN_HASH="$(bin_hash)"
HASH="$(node_hash)"
PREFIX="$CACHE_ROOT/kind/$BIN_HASH"
BIN="$PREFIX/bin"
STAMP="$PREFIX/.complete"
KUBERNETES_VERSION="$(GOWORK=off GOFLAGS=-mod=readonly "${GO:-/usr/local/go/bin/go}" list -C "$TOOLS/kubernetes-node" -m -f '{{.Version}}' k8s.io/kubernetes 2>/dev/null || echo unknown)"
NODE_IMAGE="$IMAGE_REPO/node:$KUBERNETES_VERSION-$HASH"

case "${1:-}" in
    "") ;;
    --print-bin) echo "$BIN"; exit 0 ;;
    --print-image) echo "$NODE_IMAGE"; exit 0 ;;
    --base) ;;
    -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
esac

# docker_cli: a Docker CLI that builds with BuildKit (the Dockerfiles skip the stages
# a build does not use): one with buildx, or a CLI older than 23 (BuildKit built in,
# DOCKER_BUILDKIT=1). Debian bookworm's docker.io is 20.10.
docker_cli() {
    local c v
    for c in "${DOCKER:-}" docker /usr/bin/docker; do
        if [[ -z "$c" ]] || ! command -v "$c" >/dev/null; then continue; fi
        if "$c" buildx version >/dev/null 2>&1; then echo "$c"; return 0; fi
        v="$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)"
        if [[ "$v" =~ ^([0-9]+)\. ]] && (( BASH_REMATCH[1] < 23 )); then echo "$c"; return 0; fi
    done
    return 1
}

step_start=0
step() { step_start=$SECONDS; log "$*"; }
step_done() { log "  done in $((SECONDS - step_start)) s"; }

# ---- binaries -------------------------------------------------------------------

bin_complete() {
    local b
    [[ -f "$STAMP" ]] || return 1
    for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

module_version() { "$GO_BIN" list -C "$TOOLS/$1" -m -f '{{.Version}}' "$2"; }

go_build() {
    # go_build <module dir> <package> <binary> [go build flags...]
    local dir="$1" pkg="$2" name="$3" t0=$SECONDS
    shift 3
    [[ -x "$BIN/$name" ]] && return 0
    # OUTRIGGER_GO_JOBS=1 builds one package at a time, on a machine shared with others.
    if ! nice -n 10 "$GO_BIN" build -C "$TOOLS/$dir" -p "${OUTRIGGER_GO_JOBS:-$(nproc)}" -trimpath "$@" \
        -o "$BIN/.$name.partial" "$pkg" >"$PREFIX/logs/$name.log" 2>&1; then
        tail -n 30 "$PREFIX/logs/$name.log" >&2
        die "$name: go build $pkg (hack/tools/$dir) failed; log $PREFIX/logs/$name.log"
    fi
    mv -f "$BIN/.$name.partial" "$BIN/$name"
    log "  $name: $((SECONDS - t0)) s"
}

build_binaries() {
    GO_BIN="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
    [[ -x "$GO_BIN" ]] || die "no Go toolchain (set GO=/path/to/go)"
    export GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
    mkdir -p "$BIN" "$PREFIX/logs"

    local kv kmajor kminor rest v kflags="" cv tv
    kv="$(module_version kubernetes-node k8s.io/kubernetes)"
    kmajor="${kv#v}"; kmajor="${kmajor%%.*}"; rest="${kv#v*.}"; kminor="${rest%%.*}"
    # The version stamp of upstream's hack/lib/version.sh (as hack/tools/install.sh).
    for v in "gitVersion=$kv" "gitMajor=$kmajor" "gitMinor=$kminor" "gitTreeState=clean"; do
        kflags+=" -X k8s.io/component-base/version.$v -X k8s.io/client-go/pkg/version.$v"
    done
    cv="$(module_version containerd github.com/containerd/containerd/v2)"
    tv="$(module_version cri-tools sigs.k8s.io/cri-tools)"

    step "binaries into $BIN (Go modules under hack/tools; logs in $PREFIX/logs)"
    go_build kind sigs.k8s.io/kind kind -ldflags="-s -w"
    local p
    for p in main/bridge ipam/host-local main/loopback meta/portmap; do
        go_build cni-plugins "github.com/containernetworking/plugins/plugins/$p" "${p#*/}" -ldflags="-s -w"
    done
    go_build cri-tools sigs.k8s.io/cri-tools/cmd/crictl crictl \
        -ldflags="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$tv"
    # No cgo: containerd without the btrfs/devmapper/zfs snapshotters, which need it.
    local ctags="no_btrfs no_devmapper no_zfs no_aufs" cld="-s -w -X github.com/containerd/containerd/v2/version.Version=$cv"
    go_build containerd github.com/containerd/containerd/v2/cmd/containerd containerd -tags "$ctags" -ldflags="$cld"
    go_build containerd github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 containerd-shim-runc-v2 -tags "$ctags" -ldflags="$cld"
    go_build containerd github.com/containerd/containerd/v2/cmd/ctr ctr -tags "$ctags" -ldflags="$cld"
    go_build kubernetes-node k8s.io/kubernetes/cmd/kubelet kubelet -ldflags="-s -w $kflags"
    go_build kubernetes-node k8s.io/kubernetes/cmd/kubeadm kubeadm -ldflags="-s -w $kflags"
    go_build kubernetes-node k8s.io/kubernetes/cmd/kube-proxy kube-proxy -ldflags="-s -w $kflags"
    go_build coredns outrigger.dev/hack/tools/coredns coredns -ldflags="-s -w"

    if [[ ! -x "$BIN/pause" ]]; then
        local src cc="${CC:-cc}"
        src="$("$GO_BIN" list -C "$TOOLS/kubernetes-node" -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
        [[ -f "$src" ]] || die "pause: $src not found in the k8s.io/kubernetes module"
        command -v "$cc" >/dev/null || die "pause: no C compiler ($cc)"
        "$cc" -Os -static -Wall -DVERSION="v$PAUSE_VERSION" -o "$BIN/.pause.partial" "$src"
        mv -f "$BIN/.pause.partial" "$BIN/pause"
        log "  pause: compiled static from k8s.io/kubernetes@$kv build/pause/linux/pause.c"
    fi
    step_done
    date -u +%Y-%m-%dT%H:%M:%SZ >"$STAMP"
}

# ---- images ---------------------------------------------------------------------

have_image() { "$DOCKER_BIN" image inspect "$1" >/dev/null 2>&1; }

build_debian() {
    local image="$IMAGE_REPO/debian:bookworm-$BASE_HASH" mirror rootfs
    have_image "$image" && return 0
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    # The machine's own Debian mirror, so that the image gets what apt here gets.
    mirror="${OUTRIGGER_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}"
    [[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources (set OUTRIGGER_DEBIAN_MIRROR)"
    step "$image: debootstrap --variant=minbase bookworm"
    rootfs="$WORK/rootfs"
    if ! nice -n 10 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$PREFIX/logs/debootstrap.log" 2>&1; then
        tail -n 20 "$PREFIX/logs/debootstrap.log" >&2
        die "debootstrap failed; log $PREFIX/logs/debootstrap.log"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER_BIN" import - "$image" >/dev/null
    rm -rf "$rootfs"
    step_done
}

docker_build() {
    # docker_build <tag> <context> [docker build args...]
    local tag="$1" ctx="$2" name
    shift 2
    name="$(basename "${tag%%:*}")"
    if ! DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER_BIN" build --progress=plain -t "$tag" "$@" "$ctx" \
        >"$PREFIX/logs/image-$name.log" 2>&1; then
        tail -n 30 "$PREFIX/logs/image-$name.log" >&2
        die "docker build $tag failed; log $PREFIX/logs/image-$name.log"
    fi
}

build_base() {
    local image="$IMAGE_REPO/base:$BASE_HASH"
    have_image "$image" && return 0
    step "$image: + ca-certificates, iptables, conntrack, iproute2 (apt-get)"
    mkdir -p "$WORK/base"
    cat >"$WORK/base/Dockerfile" <<EOF
FROM $IMAGE_REPO/debian:bookworm-$BASE_HASH
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      $BASE_PACKAGES \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
EOF
    docker_build "$image" "$WORK/base"
    step_done
}

# component_image <name> <version> <binary path> [entrypoint]: the binary alone on an
# empty base (kube-proxy: on base, for iptables); kubeadm's manifests give the
# command, so only CoreDNS and pause need an entrypoint.
component_image() {
    local name="$1" version="$2" binary="$3" entrypoint="${4:-}" from=scratch ctx
    local image="$IMAGE_REPO/$name:$version"
    [[ "$name" == kube-proxy ]] && from="$IMAGE_REPO/base:$BASE_HASH"
    ctx="$WORK/image-$name"
    mkdir -p "$ctx"
    cp "$binary" "$ctx/$name"
    {
        echo "FROM $from"
        echo "COPY $name /usr/local/bin/$name"
        echo "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
        [[ -z "$entrypoint" ]] || echo "ENTRYPOINT [\"/usr/local/bin/$name\"]"
    } >"$ctx/Dockerfile"
    docker_build "$image" "$ctx" --label "outrigger.dev/kind-hash=$HASH"
    COMPONENT_IMAGES+=("$image")
}

build_node() {
    have_image "$NODE_IMAGE" && return 0
    local tools_bin ctx pre container
    tools_bin="$("$TOOLS/install.sh" | tail -n1)"

    step "component images ($IMAGE_REPO/<name>:<version>)"
    COMPONENT_IMAGES=()
    local c
    for c in kube-apiserver kube-controller-manager kube-scheduler; do
        component_image "$c" "$KUBERNETES_VERSION" "$tools_bin/$c"
    done
    component_image kube-proxy "$KUBERNETES_VERSION" "$BIN/kube-proxy"
    component_image etcd "$ETCD_VERSION" "$tools_bin/etcd"
    component_image coredns "$COREDNS_VERSION" "$BIN/coredns" entrypoint
    component_image pause "$PAUSE_VERSION" "$BIN/pause" entrypoint
    step_done

    step "$NODE_IMAGE: hack/kind/node/Dockerfile"
    ctx="$WORK/node"
    mkdir -p "$ctx/bin" "$ctx/cni"
    cp -r "$HERE/node/files" "$HERE/node/Dockerfile" "$ctx/"
    cp "$BIN"/{containerd,containerd-shim-runc-v2,ctr,crictl,kubelet,kubeadm} "$ctx/bin/"
    cp "$tools_bin/kubectl" "$ctx/bin/kubectl"
    cp "$BIN"/{bridge,host-local,loopback,portmap} "$ctx/cni/"
    pre="$NODE_IMAGE-unloaded"
    docker_build "$pre" "$ctx" --build-arg "BASE=$IMAGE_REPO/base:$BASE_HASH" \
        --build-arg "KUBERNETES_VERSION=$KUBERNETES_VERSION"
    step_done

    # The component images go into the node's containerd content store now, so that
    # a node never pulls: run containerd alone in a container of the image, import
    # (without unpacking: the snapshots are made on the node, on its /var volume),
    # and commit the container as the node image.
    step "preloading ${#COMPONENT_IMAGES[@]} images into the node's containerd"
    container="outrigger-kind-preload-$HASH"
    "$DOCKER_BIN" rm -f "$container" >/dev/null 2>&1 || true
    "$DOCKER_BIN" run -d --name "$container" --privileged --entrypoint /usr/local/bin/containerd "$pre" >/dev/null
    local i ok=""
    for ((i = 0; i < 60; i++)); do
        if "$DOCKER_BIN" exec "$container" ctr version >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.5
    done
    [[ -n "$ok" ]] || { "$DOCKER_BIN" logs "$container" 2>&1 | tail -n 20 >&2; "$DOCKER_BIN" rm -f "$container" >/dev/null; die "containerd did not start in $container"; }
    if ! "$DOCKER_BIN" save "${COMPONENT_IMAGES[@]}" \
        | "$DOCKER_BIN" exec -i "$container" ctr --namespace=k8s.io images import --no-unpack - >"$PREFIX/logs/preload.log" 2>&1; then
        tail -n 20 "$PREFIX/logs/preload.log" >&2
        "$DOCKER_BIN" rm -f "$container" >/dev/null
        die "importing the component images failed; log $PREFIX/logs/preload.log"
    fi
    "$DOCKER_BIN" exec "$container" ctr --namespace=k8s.io images list -q >>"$PREFIX/logs/preload.log"
    "$DOCKER_BIN" stop -t 10 "$container" >/dev/null
    "$DOCKER_BIN" commit \
        --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' --change 'CMD []' \
        "$container" "$NODE_IMAGE" >/dev/null
    "$DOCKER_BIN" rm -f "$container" >/dev/null
    "$DOCKER_BIN" rmi "$pre" "${COMPONENT_IMAGES[@]}" >/dev/null
    # Each build context held the binaries (hundreds of MB): drop the build cache
    # that no image uses any more.
    "$DOCKER_BIN" builder prune -f >/dev/null 2>&1 || true
    step_done
}

t_start=$SECONDS
DOCKER_BIN="$(docker_cli)" || die "no Docker CLI that builds with BuildKit (buildx, or Debian's docker.io at /usr/bin/docker)"
"$DOCKER_BIN" info >/dev/null 2>&1 || die "the Docker engine does not answer (is dockerd running?)"
mkdir -p "$CACHE_ROOT/kind"
exec 9>"$CACHE_ROOT/kind/$BIN_HASH.lock"
if ! flock -n 9; then
    log "another build of $HASH is running; waiting for it"
    flock 9
fi
mkdir -p "$PREFIX/logs"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [[ "${1:-}" == --base ]]; then
    build_debian
    build_base
    flock -u 9
    echo "$IMAGE_REPO/base:$BASE_HASH"
    exit 0
fi
bin_complete || build_binaries
if ! have_image "$NODE_IMAGE"; then
    build_debian
    build_base
    build_node
    log "node image built in $((SECONDS - t_start)) s"
fi
# Node images of other pins are stale: remove those no container uses.
for old in $("$DOCKER_BIN" images --format '{{.Repository}}:{{.Tag}}' "$IMAGE_REPO/node"); do
    [[ "$old" == "$NODE_IMAGE" ]] && continue
    if "$DOCKER_BIN" rmi "$old" >/dev/null 2>&1; then log "removed the stale $old"; fi
done
flock -u 9
echo "$NODE_IMAGE"
