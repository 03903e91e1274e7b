"""Fleet mode: many proxies follow one configuration kept in etcd.

`url` parses ``etcd://`` targets, `client` speaks etcd's v3 JSON gateway,
`ctl` is the ``tcpproxyctl`` command that writes and inspects the fleet's keys.
"""
