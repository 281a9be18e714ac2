# syntax=docker/dockerfile:1

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The whole crate: Cargo.toml declares a test target (tests/it/main.rs) and
# src/migrate.rs embeds sql/ with include_str!, so both must be present.
COPY . .

# Cache mounts keep the registry and target dir between builds (BuildKit);
# the binary is copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin outbox-relay \
 && install -D -m 0755 target/release/outbox-relay /out/outbox-relay

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid outbox --home-dir /app --create-home \
      --shell /usr/sbin/nologin outbox

COPY --from=builder /out/outbox-relay /usr/local/bin/outbox-relay

WORKDIR /app
USER 10001:10001

# The CLI defaults to 127.0.0.1:8080, which is unreachable from outside a
# container; listen on all interfaces instead (override with -e HTTP_ADDR=...).
ENV HTTP_ADDR=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080

ENTRYPOINT ["outbox-relay"]
CMD ["serve"]
