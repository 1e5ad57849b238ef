# canaryd controller image: `canaryd run` by default (see manifests/deployment.yaml).
#   docker build -t ghcr.io/canaryd/canaryd:0.1.0 .

# -- build: the project and its pinned dependencies into a virtualenv ------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY analysis/ analysis/
COPY canaryd/ canaryd/
COPY simulator/ simulator/
COPY kubedouble/ kubedouble/
RUN pip install -c requirements.lock .

# -- runtime: the virtualenv only, as a non-root user ------------------------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 canaryd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin canaryd
COPY --from=build /opt/venv /opt/venv
# numeric, so Kubernetes can verify runAsNonRoot
USER 10001:10001
ENTRYPOINT ["canaryd"]
CMD ["run"]
