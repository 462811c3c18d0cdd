"""`synprobe nat-check`: measure what a NAT does to TCP and recommend how to punch it.

Nothing in this package imports scapy at module level: the broker's rendezvous path
loads ``server`` for its verbs, and scapy is imported only when a packet is crafted.
"""
