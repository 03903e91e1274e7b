"""A Linux TCP proxy: the shared splice core and the per-port-listener binary."""

from tcpproxy.build_info import interpret, interpreted_requested

__version__ = "0.1.0"

if interpreted_requested():  # before any compiled module is imported (build_info, rule 2)
    interpret()
