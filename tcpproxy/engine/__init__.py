"""The epoll engine: every proxied connection's I/O, driven from one trio task.

A connection is a `flow.Flow` (what to do, pure) plus a `conn.Conn` (its
sockets and buffers), served by one loop over a private, level-triggered
epoll: many events per wake-up, no task, nursery, cancel scope or timeout
object per connection. The package is split into rooms, one job each, each
importing only rooms below it (callbacks given at construction carry what
goes up):

  timers    the timer heap (named kinds, lazy invalidation, sweep)
  loop      the epoll set, fd table, clock, trio bridge (`run`, `wake`, `drain`)
  conn      a connection's data (`Conn`, `Way`)
  accept    listeners: accept, pause at the slot limit, EMFILE backoff
  check     the self-check (TCPPROXY_ENGINE_CHECKS=1, tests)
  preamble  before relaying: PROXY header in, first byte, PROXY header out
  dial      resolve, happy eyeballs, the connect timeout
  relay     copy/splice both ways, flush, interest while relaying
  core      `Engine`: composes them, feeds the flow, carries out its actions,
            and the one teardown (`finish`)

This module is the face: `Engine`, nothing else.
"""

from tcpproxy.engine.core import Engine

__all__ = ["Engine"]
