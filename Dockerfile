# Multi-stage: build a wheel with the toolchain, run it slim and non-root.
FROM python:3.11-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY engine ./engine
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin tradeengine
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY migrations /app/migrations
ENV MIGRATIONS_DIR=/app/migrations LOG_FORMAT=json HTTP_HOST=0.0.0.0 HTTP_PORT=8080 PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001
EXPOSE 8080
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
ENTRYPOINT ["tradeengine"]
CMD ["worker"]
