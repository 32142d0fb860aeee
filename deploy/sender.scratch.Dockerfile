# deploy-sender from a locally built static binary: no base image, nothing pulled.
# Built by deploy/build-images.sh (context: its staging directory, see receiver.scratch.Dockerfile).
# No CA certificates: this build of the sender speaks plain HTTP only (see docs/OPERATIONS.md).
FROM scratch
COPY rootfs/etc/ /etc/
COPY rootfs/tmp/ /tmp/
COPY --chown=10001:10001 rootfs/var/lib/deploy-sender/ /var/lib/deploy-sender/
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
