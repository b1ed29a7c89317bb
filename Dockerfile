# syntax=docker/dockerfile:1
# api-relay container image: a release build in a Rust image, copied into a small Debian
# runtime with CA certificates. Configured only by environment variables; no secrets inside.

FROM rust:1.95-bookworm AS build
WORKDIR /src

# Build the dependencies first, from the manifests alone, so this layer is reused until
# Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY protocol/Cargo.toml protocol/
COPY actors/Cargo.toml actors/
RUN mkdir -p src protocol/src actors/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs protocol/src/lib.rs actors/src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src protocol/src actors/src

COPY src src
COPY protocol/src protocol/src
COPY actors/src actors/src
RUN touch src/main.rs src/lib.rs protocol/src/lib.rs actors/src/lib.rs \
    && cargo build --release --locked --bin api-relay

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /src/target/release/api-relay /usr/local/bin/api-relay
USER 10001
ENV PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/api/mte-echo/healthcheck" > /dev/null || exit 1
ENTRYPOINT ["api-relay"]
