"""bpfproxy: every configured port on one socket, steered by an sk_lookup program."""
