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
 *   steered, not the bind address   -> SK_PASS (counted, see below)
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
 * Holding SYNs while bpfproxy restarts: since SK_DROP means a RST, a SYN
 * must be dropped before the socket lookup for its client to retransmit
 * (after 1 s, then 3 s, ...) instead of failing. That is the second program
 * here, hold(), attached at tc ingress (tcx) of the namespace's interfaces
 * when the state is pinned: a TCP SYN to a steered port and the bind
 * address, while bind_addr's hold flag is set and no listener is in the
 * sockmap (the process died, or is restarting), is dropped (counted as
 * HELD). Everything else goes on untouched. The serving process sets the
 * flag once it serves and clears it on a clean stop, so a stopping proxy
 * refuses at once, as before.
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
 * The bind address: bpfproxy --bind ADDRESS must not serve the app ports on
 * other addresses of the host (an external interface, say). The control plane
 * writes the listener's bound address into bind_addr; a connection to a
 * steered port but another destination address gets SK_PASS, i.e. the kernel's
 * normal answer, as if bpfproxy were not there (usually a RST), counted as
 * PASS_NOT_BIND_ADDRESS. A wildcard bind ([::] or 0.0.0.0) matches every
 * address; a specific one matches that address only, and no address of the
 * other family.
 *
 * Compiled by bcc at run time; the BPF_* macros below are bcc's.
 */

#include <linux/socket.h>               /* AF_INET */
#include <uapi/linux/in.h>              /* IPPROTO_TCP */
#include <uapi/asm-generic/errno.h>     /* EAFNOSUPPORT */
#include <uapi/linux/if_ether.h>        /* struct ethhdr, ETH_P_IP, ETH_P_IPV6 */
#include <uapi/linux/ip.h>              /* struct iphdr */
#include <uapi/linux/ipv6.h>            /* struct ipv6hdr */
#include <uapi/linux/tcp.h>             /* struct tcphdr */
#include <uapi/linux/pkt_cls.h>         /* TC_ACT_OK, TC_ACT_SHOT */

/* The only key of the sockmap: where the control plane puts the listener. */
#define LISTENER_KEY 0

/*
 * Indexes into the per-CPU counter array. Keep in sync with COUNTERS in
 * bpfproxy/dispatcher.py (it checks the array's size against its list).
 */
enum counter {
	DROP_NO_LISTENER      = 0,  /* port steered but no listener in the sockmap */
	DROP_ASSIGN_FAILED    = 1,  /* bpf_sk_assign() refused the listener */
	PASS_FAMILY_MISMATCH  = 2,  /* e.g. IPv6 connection, IPv4-only listener */
	PASS_NOT_BIND_ADDRESS = 3,  /* destination is not the bind address */
	HELD                  = 4,  /* SYN dropped by hold(): no listener, restarting */
	NR_COUNTERS           = 5,
};

/* How bind_addr matches the destination address, per family. */
enum match {
	MATCH_NONE = 0,  /* no address of this family (a zeroed map steers nothing) */
	MATCH_ANY  = 1,  /* every address of this family (wildcard bind) */
	MATCH_ADDR = 2,  /* exactly the address in the entry */
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

/*
 * The bind address, at key 0 (24 bytes; dispatcher.py packs it). Addresses
 * are in network byte order, as ctx->local_ip4 and ctx->local_ip6 are.
 */
struct bind_addr {
	u8  match4;     /* enum match for IPv4 connections */
	u8  match6;     /* enum match for IPv6 connections */
	u8  hold;       /* 1: hold() drops steered SYNs while no listener is there */
	u8  pad;
	u32 ip4;        /* when match4 == MATCH_ADDR */
	u32 ip6[4];     /* when match6 == MATCH_ADDR */
};
BPF_ARRAY(bind_addr, struct bind_addr, 1);

/* Per-CPU event counters, summed by the control plane. */
BPF_PERCPU_ARRAY(counters, u64, NR_COUNTERS);

static __always_inline void count(int which)
{
	u64 *value = counters.lookup(&which);

	/* Per-CPU slot: no other CPU writes it, a plain increment is enough. */
	if (value)
		*value += 1;
}

/* Whether a destination address (network byte order) is the bind address. */
static __always_inline bool is_bind_address(struct bind_addr *bind, u32 family,
					    u32 ip4, const u32 *ip6)
{
	if (family == AF_INET) {
		if (bind->match4 == MATCH_ANY)
			return true;
		return bind->match4 == MATCH_ADDR && ip4 == bind->ip4;
	}
	if (bind->match6 == MATCH_ANY)
		return true;
	return bind->match6 == MATCH_ADDR &&
	       ip6[0] == bind->ip6[0] && ip6[1] == bind->ip6[1] &&
	       ip6[2] == bind->ip6[2] && ip6[3] == bind->ip6[3];
}

/* Whether the connection's destination address is the bind address. */
static __always_inline bool to_bind_address(struct bpf_sk_lookup *ctx)
{
	u32 key = 0;
	struct bind_addr *bind = bind_addr.lookup(&key);

	if (!bind)
		return false;
	return is_bind_address(bind, ctx->family, ctx->local_ip4, ctx->local_ip6);
}

int steer(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	u16 port = ctx->local_port;
	if (!steered_ports.lookup(&port))
		return SK_PASS;

	if (!to_bind_address(ctx)) {
		/* Not a drop: bpfproxy does not serve this address (see top). */
		count(PASS_NOT_BIND_ADDRESS);
		return SK_PASS;
	}

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

/*
 * hold: tc ingress (tcx) of every interface, while the state is pinned (see
 * top). Parses Ethernet (also loopback's), IPv4 or IPv6 without extension
 * headers, and TCP; anything else, or a header not in the linear data,
 * passes untouched (the worst case is today's behaviour: a RST).
 */
int hold(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tcphdr *tcp;
	u32 family, ip4 = 0, ip6[4] = {};

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
			return TC_ACT_OK;
		family = AF_INET;
		ip4 = ip->daddr;
		tcp = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->nexthdr != IPPROTO_TCP)
			return TC_ACT_OK;
		family = AF_INET6;
		__builtin_memcpy(ip6, ip->daddr.in6_u.u6_addr32, sizeof(ip6));
		tcp = (void *)(ip + 1);
	} else {
		return TC_ACT_OK;
	}
	if ((void *)(tcp + 1) > data_end || !tcp->syn || tcp->ack)
		return TC_ACT_OK;

	u16 port = bpf_ntohs(tcp->dest);
	if (!steered_ports.lookup(&port))
		return TC_ACT_OK;
	u32 key = 0;
	struct bind_addr *bind = bind_addr.lookup(&key);
	if (!bind || !bind->hold || !is_bind_address(bind, family, ip4, ip6))
		return TC_ACT_OK;

	key = LISTENER_KEY;
	struct bpf_sock *sk = (struct bpf_sock *)listener.lookup(&key);
	if (sk) {
		bpf_sk_release(sk);
		return TC_ACT_OK;
	}
	/*
	 * DROP: the port is bpfproxy's, its state is pinned, and no process
	 * serves it right now (crashed, or restarting). The client retransmits
	 * the SYN and reaches the next process, instead of a RST from steer().
	 */
	count(HELD);
	return TC_ACT_SHOT;
}
