# syntax=docker/dockerfile:1
# Keyward: a multi-stage build into a minimal, non-root runtime image.
# Runs with a read-only root filesystem; the only writable place it needs is
# /var/lib/keyward (for SQLite), which should be a mounted volume.

FROM rust:1.95-bookworm AS build
# tpm2-tss for the `tpm` master-key provider (tss-esapi links it).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtss2-dev=3.2.1-3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
COPY openapi ./openapi
RUN cargo build --release --locked --bin keyward \
 && install -D -m 0755 target/release/keyward /out/keyward \
 && mkdir -p /out/lib \
 && cp -a /usr/lib/"$(gcc -dumpmachine)"/libtss2-*.so.* /out/lib/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyward /usr/local/bin/keyward
# The tpm2-tss libraries the binary links, and the TCTIs it loads at run time
# (device, swtpm, mssim); OpenSSL's libcrypto, which they need, is in
# the distroless base. /usr/lib is on the loader's default path.
COPY --from=build /out/lib/ /usr/lib/
# No secret and no certificate is baked in. Supply at run time:
# - KEYWARD_MASTER_KEY and KEYWARD_DATABASE_URL, from the orchestrator's secret store;
# - transport, one of:
#   - TLS (the normal case): mount the server certificate and key read-only,
#     e.g. at /etc/keyward/tls, and set KEYWARD_TLS_CERT=/etc/keyward/tls/tls.crt and
#     KEYWARD_TLS_KEY=/etc/keyward/tls/tls.key; add KEYWARD_TLS_CLIENT_CA (and
#     optionally KEYWARD_TLS_CLIENT_CRL) for mutual TLS. Send SIGHUP to reload them.
#   - KEYWARD_ALLOW_PLAINTEXT=true, only behind a proxy or mesh that terminates TLS.
# With neither, `serve` refuses to start: plain HTTP is served on loopback only.
# 8443 is the API (HTTPS). 8481 serves only /healthz and /readyz, over plain HTTP
# and without a client certificate, for probes; it carries no secrets.
# The binary tunes its allocator itself (src/allocator.rs); nothing to set here.
ENV KEYWARD_LISTEN=0.0.0.0:8443 \
    KEYWARD_OPS_LISTEN=0.0.0.0:8481 \
    KEYWARD_LOG_FORMAT=json
# 65532 is distroless's `nonroot` user and group, numeric so that the runtime
# can check runAsNonRoot without resolving a name.
USER 65532:65532
WORKDIR /var/lib/keyward
VOLUME ["/var/lib/keyward"]
EXPOSE 8443 8481
# The image has no shell or curl: the binary checks its own ops listener.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/keyward", "healthcheck", "--url", "http://127.0.0.1:8481"]
ENTRYPOINT ["/usr/local/bin/keyward"]
CMD ["serve"]
