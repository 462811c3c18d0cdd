"""simulsyn_core: TCP simultaneous open through NATs with plain sockets.

Nothing in this package imports scapy: the broker and the punch must start fast
and run as an ordinary user.
"""

__version__ = "0.1.0"
