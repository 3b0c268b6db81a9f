# shellcheck shell=bash
# The simulated clouds of the local cluster (sourced by hack/cluster):
#
#   moto           the EC2 API behind the simulator (PyPI moto, pinned in
#                  hack/tools/moto-requirements.txt, installed by hack/tools/install-moto.sh)
#   outrigger-sim  the EC2 endpoint (a proxy in front of moto), the Azure Resource
#                  Manager endpoint (HTTPS, with a certificate from the cluster's CA,
#                  $RUN/pki/ca.crt; a CA of its own when it runs without a
#                  cluster), the control API, and the node registrar that
#                  turns running instances and scale-set VMs into kwok Nodes
#                  (tests/src; built with cargo on `up` when its sources changed)
#
# Environment (all optional):
#   OUTRIGGER_SIM_MOTO_PORT      moto                         (default 18080)
#   OUTRIGGER_SIM_EC2_PORT       EC2 endpoint                 (default 18081)
#   OUTRIGGER_SIM_AZURE_PORT     Azure Resource Manager       (default 18082)
#   OUTRIGGER_SIM_CONTROL_PORT   control API                  (default 18083)
#   OUTRIGGER_SIM_BOOT_DELAY     seconds from a machine running to its Node (default 2)
#   OUTRIGGER_SIM_CAPACITY       capacity limits at start, comma-separated
#                                PROVIDER/INSTANCE_TYPE/REGION[/ZONE]=N
#   OUTRIGGER_SIM_BIN            an outrigger-sim binary to run instead of building one
#   OUTRIGGER_SIM_CLUSTERS       named clusters for the node registrar, space-separated
#                                NAME=KUBECONFIG (hack/peers); default: this cluster
#   OUTRIGGER_SIM_LINKS          peer links, space-separated FROM:TO=LISTEN=TARGET (hack/peers)
#   OUTRIGGER_SIM_CLUSTER_SCRIPT the script behind the control API's /clusters/NAME/down|up
#
# `hack/cluster fault ...` drives the control API (see `hack/cluster fault --help`);
# `hack/cluster clouds FILE...` makes what the GpuNodePools in FILEs need.

SIM_MOTO_PORT="${OUTRIGGER_SIM_MOTO_PORT:-18080}"
SIM_EC2_PORT="${OUTRIGGER_SIM_EC2_PORT:-18081}"
SIM_AZURE_PORT="${OUTRIGGER_SIM_AZURE_PORT:-18082}"
SIM_CONTROL_PORT="${OUTRIGGER_SIM_CONTROL_PORT:-18083}"

register_component moto
register_component outrigger-sim
EXTRA_PORTS+=("moto:$SIM_MOTO_PORT" "outrigger-sim-ec2:$SIM_EC2_PORT"
              "outrigger-sim-azure:$SIM_AZURE_PORT" "outrigger-sim-control:$SIM_CONTROL_PORT")

start_moto() {
    local bin
    bin="$("$REPO/hack/tools/install-moto.sh" | tail -n1)"
    mkdir -p "$RUN/moto"
    # pycache_prefix keeps bytecode out of the shared venv, and puts $RUN on the
    # command line, which is how `down` knows the process as ours.
    spawn moto "$bin/python" -X "pycache_prefix=$RUN/moto/pycache" -m moto.server \
        -H "$HOST" -p "$SIM_MOTO_PORT"
}
ready_moto() {
    http_ok "http://$HOST:$SIM_MOTO_PORT/moto-api/"
}

# sim_binary: the outrigger-sim to run: OUTRIGGER_SIM_BIN, else cargo's build of
# it (a no-op when nothing changed). The build is the one invocation that hack/e2e
# and hack/demo make too: another package set would unify other features and
# compile the AWS SDK a second time.
sim_binary() {
    if [[ -n "${OUTRIGGER_SIM_BIN:-}" ]]; then
        echo "$OUTRIGGER_SIM_BIN"
        return 0
    fi
    command -v cargo >/dev/null || die "outrigger-sim: cargo is needed to build it (or set OUTRIGGER_SIM_BIN)"
    local out exe
    mkdir -p "$LOGS"
    log "outrigger-sim: cargo build --locked -p outrigger -p outrigger-tests --bins (log $LOGS/outrigger-sim-build.log)"
    if ! out="$(cd "$REPO" && cargo build --locked -p outrigger -p outrigger-tests --bins \
                 --message-format=json-render-diagnostics 2>"$LOGS/outrigger-sim-build.log")"; then
        tail -n 30 "$LOGS/outrigger-sim-build.log" >&2
        die "outrigger-sim: the build failed (log $LOGS/outrigger-sim-build.log)"
    fi
    exe="$(grep -o '"executable":"[^"]*/outrigger-sim"' <<<"$out" | tail -n1 | cut -d'"' -f4)"
    [[ -n "$exe" ]] || die "outrigger-sim: cargo built no outrigger-sim executable"
    echo "$exe"
}

# sim_certificate: the Azure endpoint's certificate, issued once from the cluster's
# CA (made here when the simulators run alone, as under hack/peers).
sim_certificate() {
    [[ -f "$PKI/outrigger-sim-azure.crt" ]] && return 0
    mkdir -p "$PKI"
    chmod 700 "$PKI"
    [[ -f "$PKI/ca.crt" ]] || ca ca outrigger-local-ca
    cert outrigger-sim-azure "/CN=outrigger-sim-azure" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$HOST,DNS:localhost"
}

start_outrigger_sim() {
    local exe
    exe="$(sim_binary)" || return 1
    sim_certificate
    # `hack/cluster fault` runs the same binary.
    echo "$exe" >"$RUN/outrigger-sim.bin"
    # outrigger-sim reads OUTRIGGER_SIM_CAPACITY itself; set but empty means none.
    [[ -n "${OUTRIGGER_SIM_CAPACITY:-}" ]] || unset OUTRIGGER_SIM_CAPACITY
    local targets=() c l
    if [[ -n "${OUTRIGGER_SIM_CLUSTERS:-}" ]]; then
        for c in $OUTRIGGER_SIM_CLUSTERS; do targets+=(--cluster "$c"); done
    else
        targets=(--kubeconfig "$KUBECONFIG_ADMIN")
    fi
    for l in ${OUTRIGGER_SIM_LINKS:-}; do targets+=(--link "$l"); done
    [[ -z "${OUTRIGGER_SIM_CLUSTER_SCRIPT:-}" ]] || targets+=(--cluster-script "$OUTRIGGER_SIM_CLUSTER_SCRIPT")
    # --instance names the run folder, which is how `down` knows the process as ours.
    spawn outrigger-sim "$exe" serve \
        --instance "$RUN" \
        --moto-url "http://$HOST:$SIM_MOTO_PORT" \
        --ec2-listen "$HOST:$SIM_EC2_PORT" \
        --azure-listen "$HOST:$SIM_AZURE_PORT" \
        --azure-tls-cert "$PKI/outrigger-sim-azure.crt" --azure-tls-key "$PKI/outrigger-sim-azure.key" \
        --control-listen "$HOST:$SIM_CONTROL_PORT" \
        --boot-delay "${OUTRIGGER_SIM_BOOT_DELAY:-2}" \
        "${targets[@]}"
}
ready_outrigger_sim() {
    http_ok "http://$HOST:$SIM_CONTROL_PORT/healthz"
}

# env_outrigger_sim: the exports `hack/cluster env` adds for the simulators. The
# simulators take any credentials; the SDKs just need some to sign with.
env_outrigger_sim() {
    printf 'export AWS_ENDPOINT_URL_EC2=%q\n' "http://$HOST:$SIM_EC2_PORT"
    printf 'export AWS_ACCESS_KEY_ID=outrigger-local AWS_SECRET_ACCESS_KEY=outrigger-local\n'
    printf 'export AZURE_ENDPOINT_URL=%q\n' "https://$HOST:$SIM_AZURE_PORT"
    # What the operator's --azure-ca-file reads, and the tests' Azure clients trust.
    printf 'export OUTRIGGER_AZURE_CA_FILE=%q\n' "$PKI/ca.crt"
    printf 'export OUTRIGGER_SIM_URL=%q\n' "http://$HOST:$SIM_CONTROL_PORT"
}

# sim_cli: the outrigger-sim binary the running simulator was started from.
sim_cli() {
    if [[ -n "${OUTRIGGER_SIM_BIN:-}" ]]; then
        echo "$OUTRIGGER_SIM_BIN"
    elif [[ -x "$(cat "$RUN/outrigger-sim.bin" 2>/dev/null)" ]]; then
        cat "$RUN/outrigger-sim.bin"
    else
        sim_binary
    fi
}

# cmd_fault ARGS...: `hack/cluster fault ...`, the simulator's fault CLI
# (`outrigger-sim fault`) against this cluster's control API.
cmd_fault() {
    local exe
    exe="$(sim_cli)" || return 1
    OUTRIGGER_SIM_URL="http://$HOST:$SIM_CONTROL_PORT" exec "$exe" fault "$@"
}

# cmd_clouds [--cluster NAME] FILE...: `hack/cluster clouds`, the launch templates
# and scale sets the GpuNodePools in FILEs name, made in this cluster's simulators.
cmd_clouds() {
    local exe
    exe="$(sim_cli)" || return 1
    OUTRIGGER_SIM_URL="http://$HOST:$SIM_CONTROL_PORT" \
    AWS_ENDPOINT_URL_EC2="http://$HOST:$SIM_EC2_PORT" \
        exec "$exe" clouds "$@"
}
