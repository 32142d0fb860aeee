# deploy-receiver, built from source: for hosts that can pull base images from a registry.
# (Hosts without one: deploy/build-images.sh packages a locally built static binary instead,
# see receiver.scratch.Dockerfile.)
#
#   docker build -f deploy/receiver.Dockerfile -t deploy-receiver .
#   docker run -d --name deploy-receiver -p 127.0.0.1:8001:8001 \
#     -v /var/run/docker.sock:/var/run/docker.sock --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v deploy-receiver:/var/lib/deploy-receiver --env-file /etc/deploy/receiver.env deploy-receiver

FROM rust:1-bookworm AS build
WORKDIR /src
# librdkafka (vendored by rdkafka-sys) builds with the image's cc/make; nothing else to install.
COPY . .
RUN cargo build --release --locked -p deploy-receiver \
 && install -m 0755 target/release/deploy-receiver /usr/local/bin/deploy-receiver

FROM debian:bookworm-slim
# No CA certificates needed: the receiver makes no outgoing TLS connections (TLS is terminated
# by a reverse proxy in front of it, see docs/OPERATIONS.md).
RUN groupadd --system --gid 10001 deploy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin deploy \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/deploy-receiver /var/lib/deploy-receiver/packages /var/lib/deploy-receiver/state
COPY --from=build /usr/local/bin/deploy-receiver /usr/local/bin/deploy-receiver
ENV RECEIVER_BIND=0.0.0.0:8001 \
    PACKAGE_DIR=/var/lib/deploy-receiver/packages \
    STATE_DIR=/var/lib/deploy-receiver/state \
    LOG_FORMAT=json
# Packages, the deployment journal and the event outbox: keep them across container upgrades.
VOLUME ["/var/lib/deploy-receiver"]
EXPOSE 8001
# Runs as a non-root user; Docker access comes from the socket's group, added at run time
# (--group-add / compose group_add), because its gid differs from host to host.
USER 10001:10001
# The probe exits 0 only on 200 with status "healthy" (i.e. Docker reachable). If you change
# RECEIVER_BIND's port, override the health check too.
HEALTHCHECK --interval=15s --timeout=6s --start-period=5s --retries=3 \
  CMD ["deploy-receiver", "--probe", "http://127.0.0.1:8001/health"]
ENTRYPOINT ["deploy-receiver"]
