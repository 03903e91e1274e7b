"""The status page's files: HTML, script and style, served by tcpproxy.statusserver."""
