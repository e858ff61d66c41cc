# Prometheus from Debian's package, for hosts that reach no image registry; the compose file's
# prometheus service runs it like the official image (PROMETHEUS_IMAGE=<this tag>):
#   docker build -f deploy/offline/prometheus.Dockerfile \
#       --build-arg TOOLS_IMAGE=$(deploy/offline/base-image.sh tools) -t ollama-gateway-prometheus deploy/offline
# The same tools image serves as REDIS_IMAGE as it is (redis-server from Debian).
ARG TOOLS_IMAGE
FROM ${TOOLS_IMAGE}
RUN mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
