// SPDX-License-Identifier: MIT
/*
 * sk_lookup.c - steer every configured TCP port to one listening socket.
 *
 * bpfproxy serves all the ports of a proxy config on ONE listening socket.
 * This sk_lookup program runs when the kernel looks for the socket that
 * should receive a new connection (a TCP SYN) in the network namespace it
 * is attached to, before the normal bind()-based lookup:
 *
 *   not TCP                         -> SK_PASS (normal lookup)
 *   destination port not steered    -> SK_PASS (normal lookup)
 *   steered, listener in sockmap    -> bpf_sk_assign() it, SK_PASS
 *   steered, listener missing       -> SK_DROP (counted)
 *   steered, wrong address family   -> SK_PASS (counted, see below)
 *   steered, any other assign error -> SK_DROP (counted)
 *
 * SK_PASS without a selection lets the kernel's normal bind()-based lookup
 * run. SK_DROP makes the socket lookup fail: TCP answers the SYN with a RST
 * (the client sees "connection refused") and no other socket gets it. A
 * socket selected by another sk_lookup program with SK_PASS still wins over
 * our SK_DROP (Documentation/bpf/prog_sk_lookup.rst).
 *
 * The accepted socket keeps the connection's real destination, so
 * getsockname() on it tells the proxy which configured port was dialled.
 *
 * The program is deliberately tiny (cf. cloudflare/tubular): no loops, no
 * strings, no per-application logic. The control plane (bpfproxy/dispatcher.py)
 * owns the maps and the BPF link, and is the only writer of the maps.
 *
 * IPv4 and IPv6: the listener is either an AF_INET6 dual-stack socket bound
 * to [::] with IPV6_V6ONLY=0, which takes both families, or an AF_INET
 * socket, which takes IPv4 only. bpf_sk_assign() refuses to give an IPv6
 * connection to an IPv4 (or a v6-only socket an IPv4 connection) with
 * -EAFNOSUPPORT. We then return SK_PASS: the listener does not serve that
 * family, so bpfproxy does not claim the port for it and the connection
 * gets the kernel's normal answer, exactly as if bpfproxy were not there:
 * a socket bound to that port in that family, or else a RST ("connection
 * refused", so a dual-stack client falls back to the other family at once).
 * These are counted as PASS_FAMILY_MISMATCH, not as drops.
 *
 * Compiled by bcc at run time; the BPF_* macros below are bcc's.
 */

#include <uapi/linux/in.h>              /* IPPROTO_TCP */
#include <uapi/asm-generic/errno.h>     /* EAFNOSUPPORT */

/* The only key of the sockmap: where the control plane puts the listener. */
#define LISTENER_KEY 0

/*
 * Indexes into the per-CPU counter array. Keep in sync with COUNTERS in
 * bpfproxy/dispatcher.py (it checks the array's size against its list).
 */
enum counter {
	DROP_NO_LISTENER     = 0,  /* port steered but no listener in the sockmap */
	DROP_ASSIGN_FAILED   = 1,  /* bpf_sk_assign() refused the listener */
	PASS_FAMILY_MISMATCH = 2,  /* e.g. IPv6 connection, IPv4-only listener */
	NR_COUNTERS          = 3,
};

/*
 * Steered ports. Key: destination port in host byte order, as in
 * ctx->local_port. Value: unused (always 1); the key's presence is what
 * counts. 65536 entries: every possible port fits.
 */
BPF_HASH(steered_ports, u16, u8, 65536);

/*
 * The listener, at LISTENER_KEY. A u64 value lets the control plane read
 * the socket's cookie back; updates take the socket's fd.
 */
BPF_TABLE("sockmap", u32, u64, listener, 1);

/* Per-CPU event counters, summed by the control plane. */
BPF_PERCPU_ARRAY(counters, u64, NR_COUNTERS);

static __always_inline void count(int which)
{
	u64 *value = counters.lookup(&which);

	/* Per-CPU slot: no other CPU writes it, a plain increment is enough. */
	if (value)
		*value += 1;
}

int steer(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	u16 port = ctx->local_port;
	if (!steered_ports.lookup(&port))
		return SK_PASS;

	u32 key = LISTENER_KEY;
	struct bpf_sock *sk = (struct bpf_sock *)listener.lookup(&key);
	if (!sk) {
		/*
		 * DROP: the port belongs to bpfproxy but its listener is gone
		 * (closed, or the proxy is restarting). Refuse the connection
		 * rather than let the normal lookup hand it to some other,
		 * possibly stale, socket bound to the port.
		 */
		count(DROP_NO_LISTENER);
		return SK_DROP;
	}

	long err = bpf_sk_assign(ctx, sk, 0);
	/* The lookup took a reference on the socket: always give it back. */
	bpf_sk_release(sk);

	if (err == -EAFNOSUPPORT) {
		/* Not a drop: this listener does not serve ctx->family (see top). */
		count(PASS_FAMILY_MISMATCH);
		return SK_PASS;
	}
	if (err) {
		/*
		 * DROP: the kernel refused the listener for this connection
		 * (-ESOCKTNOSUPPORT: not listening any more; -EEXIST: an
		 * earlier sk_lookup program already selected a socket, which
		 * then wins anyway). The port is configured for bpfproxy, so
		 * do not hand the connection to the normal lookup either.
		 */
		count(DROP_ASSIGN_FAILED);
		return SK_DROP;
	}
	return SK_PASS;
}
