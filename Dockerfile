# syntax=docker/dockerfile:1
#
# One image for every fabric process:
#   docker build -t fabric-agents .
#   docker run --rm fabric-agents                                  # the router (default CMD)
#   docker run --rm fabric-agents worker workers.demo:agent        # a worker of the demo agent
# Settings come from FABRIC_* environment variables (see configs/fabric.example.env) and the profile file
# /app/configs/<FABRIC_PROFILE>.yaml. compose.yaml wires the whole stack together.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------
# build: install the package and its dependencies into a self-contained virtualenv at /opt/venv.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, in their own layer, so editing the source does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install -r /tmp/requirements.txt

# Then the package itself: a regular (not editable) install, so the image does not need /src at run time.
COPY README.md ./
COPY fabric ./fabric
COPY workers ./workers
# Smoke test from outside /src, so it exercises the installed package and console script, not the sources.
RUN pip install --no-deps . \
 && cd / \
 && python -c "import fabric.cli, workers.demo" \
 && fabric --help > /dev/null

# ---------------------------------------------------------------------------------------------------------
# runtime: the virtualenv, the profile files, and nothing else. Same base image, so the venv's
# interpreter symlinks stay valid.
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="fabric-agents" \
      org.opencontainers.image.description="A reliable, observable worker fabric for AI agents over RabbitMQ" \
      org.opencontainers.image.licenses="Apache-2.0"

# FABRIC_HTTP__HOST: a container must listen on every interface for published ports and health checks.
# FABRIC_CONFIG_DIR: absolute, so another working directory (docker run -w) still finds the profiles.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FABRIC_HTTP__HOST=0.0.0.0 \
    FABRIC_CONFIG_DIR=/app/configs

# A fixed numeric uid/gid so orchestrators can enforce runAsNonRoot and volumes can be pre-chowned.
RUN groupadd --system --gid 10001 fabric \
 && useradd --system --uid 10001 --gid fabric --home-dir /app --no-create-home --shell /usr/sbin/nologin fabric

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Profiles stay root-owned (read-only to the process); /app itself belongs to the fabric user so the
# default store (sqlite:///fabric.db, relative to /app) can be created. Mount a volume on /app to keep it.
COPY configs/ /app/configs/
RUN chown fabric:fabric /app

USER 10001:10001

# Router HTTP API, health and metrics; workers use FABRIC_HTTP__PORT=8081 in compose.yaml.
EXPOSE 8080

ENTRYPOINT ["fabric"]
CMD ["router"]
