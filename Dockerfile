# tcpproxy and bpfproxy on Debian 12, with Debian's bcc (python3-bpfcc).
#
#   docker build -t tcpproxy .
#   docker run --rm -p 6300:6300 -v "$PWD/config.json:/etc/tcpproxy/config.json:ro" tcpproxy
#
# tcpproxy runs as the unprivileged user "proxy". bpfproxy needs root in the
# container with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_RESOURCE, the host's network
# namespace (sk_lookup steers a namespace's ports), and what bcc reads to compile:
#
#   docker run --rm --network host --user root \
#     --cap-add BPF --cap-add NET_ADMIN --cap-add SYS_RESOURCE \
#     -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#     -v /sys/fs/bpf:/sys/fs/bpf -v "$PWD/config.json:/etc/tcpproxy/config.json:ro" \
#     --entrypoint bpfproxy tcpproxy -p 8000 --config /etc/tcpproxy/config.json
FROM debian:12-slim

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc iproute2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tcpproxy
COPY pyproject.toml README.md ./
COPY bpf ./bpf
COPY bpfproxy ./bpfproxy
COPY tcpproxy ./tcpproxy
RUN python3 -m venv --system-site-packages /opt/tcpproxy/venv \
    && /opt/tcpproxy/venv/bin/pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin proxy \
    && mkdir -p /etc/tcpproxy
COPY config.json /etc/tcpproxy/config.json

ENV PATH=/opt/tcpproxy/venv/bin:$PATH
USER 10001
ENTRYPOINT ["tcpproxy"]
CMD ["--config", "/etc/tcpproxy/config.json"]
