# espline's container image: the `espline` command on Python 3.11, with iproute2 for looking
# at what the data plane set up (`kubectl exec ... -- ip route`, `ip link show espl0`).
#   docker build -t registry.example.com/espline:0.1.0 .
# The image runs as the non-root user espline by default (admin commands need nothing more);
# the Kubernetes DaemonSet runs the daemon as root with only NET_ADMIN and NET_RAW
# (k8s/README.md, "Security choices").

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controller controller
COPY pipeline pipeline
COPY workers workers
COPY bench bench
# Every dependency ships wheels for CPython 3.11 on x86_64 and aarch64: no compiler needed.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels espline \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin espline
# Unbuffered logs; no .pyc files written at run time (the root filesystem is read-only).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
ENTRYPOINT ["espline"]
CMD ["--help"]
