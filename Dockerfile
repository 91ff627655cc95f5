# Multi-stage: build the wheel with the toolchain, run it slim, non-root, read-only.
# Base image pinned by digest: python:3.11-slim-bookworm (Python 3.11.16) as Docker's
# docker-library/repo-info recorded it; check it with `docker buildx imagetools inspect
# python:3.11-slim-bookworm` where Docker Hub is reachable, and move it with the locks.
ARG BASE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

FROM ${BASE} AS build
WORKDIR /src
COPY requirements-build.lock ./
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${BASE}
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin tradeengine
COPY requirements.lock /tmp/requirements.lock
# Every dependency from the hashed lock, wheels only; then our own wheel, built above.
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
# The image writes nothing outside /tmp: run it with a read-only root filesystem
# (k8s readOnlyRootFilesystem, compose read_only) and a tmpfs on /tmp.
ENV LOG_FORMAT=json HTTP_HOST=0.0.0.0 HTTP_PORT=8080 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001
EXPOSE 8080
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
ENTRYPOINT ["tradeengine"]
CMD ["worker"]
