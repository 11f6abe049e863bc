# taipan: build in a full Rust image, run in a slim Debian one as an unprivileged user.
# The model is never baked in: mount it (a volume at /models) or let an init step fetch it
# (the Helm chart under deploy/helm/taipan does either).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p taipan \
    && strip target/release/taipan

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin taipan \
    && mkdir /models && chown taipan /models
COPY --from=build /src/target/release/taipan /usr/local/bin/taipan
USER 10001
ENV TAIPAN_HOST=0.0.0.0 \
    TAIPAN_PORT=8080 \
    TAIPAN_MODEL=/models/model.gguf
EXPOSE 8080
VOLUME ["/models"]
ENTRYPOINT ["/usr/local/bin/taipan", "serve"]
