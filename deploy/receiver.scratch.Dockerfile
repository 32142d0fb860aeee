# deploy-receiver from a locally built binary: no base image, nothing pulled.
# Built by deploy/build-images.sh, whose staging directory is the context:
#   deploy-receiver        the binary of `cargo build --release` (debug info stripped)
#   rootfs/                /etc/passwd, /etc/group, /etc/nsswitch.conf, /tmp (1777), and the
#                          shared libraries the binary links with their loader (none if static)
#   data/                  packages/ and state/, owned by the deploy user
# No CA certificates: the receiver makes no outgoing TLS connections.
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /var/lib/deploy-receiver/
COPY deploy-receiver /deploy-receiver
ENV RECEIVER_BIND=0.0.0.0:8001 \
    PACKAGE_DIR=/var/lib/deploy-receiver/packages \
    STATE_DIR=/var/lib/deploy-receiver/state \
    TMPDIR=/tmp \
    LOG_FORMAT=json
# Packages, the deployment journal and the event outbox: keep them across container upgrades.
# A new named volume starts as a copy of this directory, owned by the deploy user.
VOLUME ["/var/lib/deploy-receiver"]
EXPOSE 8001
# Non-root; Docker access through the socket's group, added at run time:
#   --group-add "$(stat -c %g /var/run/docker.sock)"   (compose: group_add)
USER 10001:10001
# There is no curl in this image: the binary probes itself. Exit 0 only on 200 + "healthy".
HEALTHCHECK --interval=15s --timeout=6s --start-period=5s --retries=3 \
  CMD ["/deploy-receiver", "--probe", "http://127.0.0.1:8001/health"]
ENTRYPOINT ["/deploy-receiver"]
