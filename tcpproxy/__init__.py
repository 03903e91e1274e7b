"""A Linux TCP proxy: the shared splice core and the per-port-listener binary."""

__version__ = "0.1.0"
