# syntax=docker/dockerfile:1
# canaryd controller image: `canaryd run` by default (see manifests/base/deployment.yaml).
#   docker build -t ghcr.io/canaryd/canaryd:0.1.0 .
# tests/test_manifests.py runs this file's install steps (no Docker engine in CI) and
# hadolint lints it in `make test`.

# One pinned base for both stages (exact tag; pin by digest in your registry mirror).
ARG BASE=python:3.11.14-slim-bookworm

# -- build: wheels of the project and of its locked runtime dependencies ---------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY analysis/ analysis/
COPY canaryd/ canaryd/
COPY simulator/ simulator/
COPY kubedouble/ kubedouble/
# runtime dependencies only, each at the version requirements.lock pins
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint requirements.lock .

# -- runtime: a virtualenv of those wheels (no pip, no compiler), as a non-root user ---
FROM ${BASE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 canaryd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin canaryd
# the wheels are mounted, not copied: they do not stay in the image
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-index --find-links /wheels /wheels/canaryd-*.whl \
 && canaryd --version
# numeric, so Kubernetes can verify runAsNonRoot
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["canaryd"]
CMD ["run"]
