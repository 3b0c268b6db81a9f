# The Outrigger operator image: a static binary on an empty base, run as a
# non-root user. Build it yourself:
#
#   docker build -t outrigger:0.1.0 .
#
# and point the chart at it (image.repository, image.tag). That builds the binary
# from source in Rust's Alpine image (stages `binary-source` and `build`).
#
# Where that image cannot be pulled (this repository's CI, which builds every
# image on its own machine), `hack/operator-image build` builds the binary on the
# host instead (glibc, linked statically with crt-static) and passes it in with
#
#   docker build --build-arg BINARY=host --build-arg HOST_BASE=<an image with
#       /etc/ssl/certs/ca-certificates.crt> -f Dockerfile <a folder holding ./outrigger>
#
# The runtime stage (the last one) is the same either way. Needs BuildKit (the
# default builder since Docker 23; DOCKER_BUILDKIT=1 before), which builds only the
# stages the image uses.
ARG BINARY=source
ARG HOST_BASE=scratch

# ---- build: Rust on Alpine links against musl, so the binary is static ----------
FROM rust:1.95-alpine AS build
# aws-lc-rs (rustls' crypto provider) builds its C code with cmake, perl and clang.
RUN apk add --no-cache musl-dev cmake make perl clang ca-certificates
WORKDIR /src
COPY . .
# Rust's musl targets link statically (crt-static) by default.
RUN cargo build --locked --release -p outrigger \
 && cp target/release/outrigger /outrigger
FROM build AS binary-source

# ---- or: the binary built on the host, the CA bundle from HOST_BASE --------------
FROM ${HOST_BASE} AS binary-host
COPY outrigger /outrigger

FROM binary-${BINARY} AS binary

# ---- run: nothing but the binary and the CA bundle -------------------------------
FROM scratch
COPY --from=binary /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=binary /outrigger /outrigger
# The chart's pod securityContext runs as 65532 too; no shell, no package manager.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/outrigger"]
CMD ["run", "--metrics-addr=0.0.0.0:8080", "--log-format=json"]
