# syntax=docker/dockerfile:1
# Keyward: a multi-stage build into a minimal, non-root runtime image.
# Runs with a read-only root filesystem; the only writable place it needs is
# /var/lib/keyward (for SQLite), which should be a mounted volume.

FROM rust:1.85-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY openapi ./openapi
RUN cargo build --release --locked --bin keyward \
 && install -D -m 0755 target/release/keyward /out/keyward

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyward /usr/local/bin/keyward
# No secret is baked in: KEYWARD_MASTER_KEY and KEYWARD_DATABASE_URL come from the
# orchestrator's secret store at run time.
ENV KEYWARD_LISTEN=0.0.0.0:8480 \
    KEYWARD_LOG_FORMAT=json
USER nonroot:nonroot
WORKDIR /var/lib/keyward
VOLUME ["/var/lib/keyward"]
EXPOSE 8480
ENTRYPOINT ["/usr/local/bin/keyward"]
CMD ["serve"]
