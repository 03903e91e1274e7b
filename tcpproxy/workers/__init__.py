"""Worker processes: one supervisor, N workers, both binaries (`--workers N`).

Python runs one event loop per process on one core; workers use the others.
The supervisor is the process the user starts. It reads and validates the
config once, starts the workers, watches the file (and SIGHUP), and sends
each validated config to every worker; it forwards SIGTERM/SIGINT and exits
0 once every worker has drained. Workers accept and proxy; how they share
ports is the binary's business (its `Plan`: tcpproxy's SO_REUSEPORT
listeners, bpfproxy's one reuseport group steered by BPF).

Rooms (import them from their modules; this package hands no names on):
- `link`: a worker's end of its socket pair, and the messages both ends speak.
- `plan`: what differs between the binaries' workers (the `Plan` protocol).
- `pool`: the worker processes: start, respawn, stop; their answers.
- `fanout`: a reload across every worker, all or nothing.
- `portlock`: a supervisor's exclusive claim on its ports (a second one is refused).
- `supervisor`: the above composed with the config file, signals and metrics.
"""
