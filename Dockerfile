# Two images from one Dockerfile, both Debian 12 with the same venv:
#
#   tcpproxy (the default target): one listener per port; no bcc; runs as the
#            unprivileged user "tcpproxy" (uid 10001).
#   bpfproxy: adds Debian's bcc (python3-bpfcc, with LLVM) to compile and load
#            the sk_lookup program; runs as root with the capabilities it is given.
#
#   make build-in-container                    # builds both, checks them in containers
#   docker build --target tcpproxy -t tcpproxy .
#   docker build --target bpfproxy -t bpfproxy .
#
# The config is read from /etc/tcpproxy/config.json: mount a *directory* there
# (a single-file bind mount never sees a reload). Targets on the host's loopback
# need --network host:
#
#   docker run --rm --network host -v "$PWD/conf:/etc/tcpproxy:ro" tcpproxy
#   docker run --rm --network host --cap-add BPF --cap-add NET_ADMIN \
#     -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#     -v "$PWD/conf:/etc/tcpproxy:ro" bpfproxy -p 8000
#
# (Docker before Engine 23 knows no CAP_BPF: --cap-add SYS_ADMIN instead.)
# On a network that intercepts TLS, give pip its CA certificates (PEM text):
#   --build-arg CA_CERTS="$(cat company-ca.pem)"
FROM debian:12-slim AS base

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 tcpproxy \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tcpproxy \
    && mkdir -p /etc/tcpproxy
COPY config.json /etc/tcpproxy/config.json
ENV PATH=/opt/tcpproxy/venv/bin:$PATH


FROM base AS build
ARG CA_CERTS=""

# gcc and python3-dev: pip compiles the hot path with mypyc (setup.py); the images get
# the compiled modules, not the compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv gcc python3-dev \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY bpf ./bpf
COPY bpfproxy ./bpfproxy
COPY tcpproxy ./tcpproxy
# --system-site-packages: the bpfproxy image's bcc is Debian's (the PyPI "bcc" is
# unrelated). pip and setuptools are only needed here.
RUN if [ -n "$CA_CERTS" ]; then printf '%s\n' "$CA_CERTS" >/tmp/ca.pem; export PIP_CERT=/tmp/ca.pem; fi \
    && python3 -m venv --system-site-packages /opt/tcpproxy/venv \
    && /opt/tcpproxy/venv/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/tcpproxy/venv/bin/pip uninstall --yes --quiet pip setuptools \
    && rm -f /tmp/ca.pem


FROM base AS bpfproxy

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-bpfcc \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/tcpproxy/venv /opt/tcpproxy/venv
# No USER: the capabilities `docker run --cap-add` grants are root's.
ENTRYPOINT ["bpfproxy"]
CMD ["-p", "8000", "--config", "/etc/tcpproxy/config.json"]


FROM base AS tcpproxy

COPY --from=build /opt/tcpproxy/venv /opt/tcpproxy/venv
USER 10001:10001
ENTRYPOINT ["tcpproxy"]
CMD ["--config", "/etc/tcpproxy/config.json"]
