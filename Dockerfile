# syntax=docker/dockerfile:1
# api-relay container image: a profile-guided release build (deploy/build-pgo.sh) in a Rust
# image, copied into a small Debian runtime with CA certificates. Configured only by
# environment variables; no secrets inside.

FROM rust:1.95-bookworm AS build
WORKDIR /src

# The profile-guided build trains an instrumented relay under wrk load, in memory mode and in
# Redis mode, and merges the profiles with llvm-profdata.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl openssl redis-server wrk \
    && rm -rf /var/lib/apt/lists/* \
    && rustup component add llvm-tools

COPY Cargo.toml Cargo.lock ./
COPY protocol/Cargo.toml protocol/
COPY protocol/src protocol/src
COPY actors/Cargo.toml actors/
COPY actors/src actors/src
COPY src src
COPY deploy/build-pgo.sh deploy/
# Two release builds (instrumented, then optimised with the profile) and about a minute and a
# half of training between them. The crates download once into the cache mount.
# NOTE: under emulation (buildx for another platform) the training runs many times slower and
# may hit the script's 20 s start-up waits; build on a builder of the target platform.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    bash deploy/build-pgo.sh /src/api-relay

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /src/api-relay /usr/local/bin/api-relay
USER 10001
ENV PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/api/mte-echo/healthcheck" > /dev/null || exit 1
ENTRYPOINT ["api-relay"]
