# deploy-sender from a locally built binary: no base image, nothing pulled.
# Built by deploy/build-images.sh (context: its staging directory, see receiver.scratch.Dockerfile).
# No system CA store: plain http:// receivers work as they are; for https:// receivers (a TLS proxy
# in front) mount the proxy's CA certificate and point DEPLOY_CA_CERT at it, e.g.
#   -v /etc/deploy/ca.crt:/etc/deploy/ca.crt:ro -e DEPLOY_CA_CERT=/etc/deploy/ca.crt
# (docs/OPERATIONS.md, "TLS in front").
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /var/lib/deploy-sender/
COPY deploy-sender /deploy-sender
ENV SENDER_BIND=0.0.0.0:8000 \
    PACKAGE_DIR=/var/lib/deploy-sender/packages \
    SENDER_STATE_DIR=/var/lib/deploy-sender/state \
    TMPDIR=/tmp
# Stored packages and the event outbox.
VOLUME ["/var/lib/deploy-sender"]
EXPOSE 8000
USER 10001:10001
ENTRYPOINT ["/deploy-sender"]
CMD ["serve"]
