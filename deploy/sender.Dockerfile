# deploy-sender, built from source: for hosts that can pull base images from a registry.
# (Hosts without one: deploy/build-images.sh, see sender.scratch.Dockerfile.)
#
#   docker build -f deploy/sender.Dockerfile -t deploy-sender .
#   docker run --rm deploy-sender doctor --to http://192.168.86.200:8001     # with DEPLOY_HMAC_SECRET
#   docker run -d --name deploy-sender -p 127.0.0.1:8000:8000 \
#     -v /var/run/docker.sock:/var/run/docker.sock --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v deploy-sender:/var/lib/deploy-sender --env-file /etc/deploy/sender.env deploy-sender serve

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p deploy-sender \
 && install -m 0755 target/release/deploy-sender /usr/local/bin/deploy-sender

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 deploy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin deploy \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/deploy-sender /var/lib/deploy-sender/packages /var/lib/deploy-sender/state
COPY --from=build /usr/local/bin/deploy-sender /usr/local/bin/deploy-sender
ENV SENDER_BIND=0.0.0.0:8000 \
    PACKAGE_DIR=/var/lib/deploy-sender/packages \
    SENDER_STATE_DIR=/var/lib/deploy-sender/state
# Stored packages and the event outbox.
VOLUME ["/var/lib/deploy-sender"]
EXPOSE 8000
USER 10001:10001
ENTRYPOINT ["deploy-sender"]
CMD ["serve"]
