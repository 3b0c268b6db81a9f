# The Outrigger operator image: a static (musl) binary on an empty base, run as a
# non-root user. Not built by this repository's CI (there is no Docker engine where
# it runs); build it yourself:
#
#   docker build -t outrigger:0.1.0 .
#
# and point the chart at it (image.repository, image.tag).

# ---- build: Rust on Alpine links against musl, so the binary is static ----------
FROM rust:1.95-alpine AS build
# aws-lc-rs (rustls' crypto provider) builds its C code with cmake, perl and clang.
RUN apk add --no-cache musl-dev cmake make perl clang ca-certificates
WORKDIR /src
COPY . .
# Rust's musl targets link statically (crt-static) by default.
RUN cargo build --locked --release -p outrigger \
 && cp target/release/outrigger /outrigger

# ---- run: nothing but the binary and the CA bundle -------------------------------
FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /outrigger /outrigger
# The chart's pod securityContext runs as 65532 too; no shell, no package manager.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/outrigger"]
CMD ["run", "--metrics-addr=0.0.0.0:8080", "--log-format=json"]
