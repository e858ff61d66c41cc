# The tests' fake Ollama as the compose stack's `ollama` service (OLLAMA_IMAGE=<this tag>), for
# tests/test_ops_docker.py. Built on the gateway image (aiohttp, uvloop already there):
#   docker build -f tests/docker/fake-ollama.Dockerfile --build-arg GATEWAY_IMAGE=... tests
# (the context is tests/: the repository's .dockerignore keeps tests out of the gateway's).
ARG GATEWAY_IMAGE
FROM ${GATEWAY_IMAGE}
WORKDIR /opt/fake
COPY __init__.py fake_ollama*.py ./tests/
# `ollama list`, as the compose file's healthcheck runs it in the real image.
COPY docker/ollama-shim.py /opt/fake/ollama
USER root
RUN ln -s /opt/fake/ollama /usr/local/bin/ollama && chmod 0755 /opt/fake/ollama
USER 10001:10001
HEALTHCHECK NONE
# 60 chunks 0.1 s apart: a stream lasts about 6 s (num_predict makes it shorter).
ENTRYPOINT ["python3", "-m", "tests.fake_ollama", "--host", "0.0.0.0", "--port", "11434", "--no-host-check"]
CMD ["--chunks", "60", "--chunk-delay", "0.1"]
