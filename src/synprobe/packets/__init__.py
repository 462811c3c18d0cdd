"""The packet layer, once: pure code for capture files and frames, and the one live capture.

- ``decode``: a frame in, the TCP segment or quoted ICMP error out (TCP flag constants,
  link types, ICMP names);
- ``reader``: pcap and pcapng files in, frames out (``read_capture``: a whole file decoded);
- ``writer``: classic pcap and pcapng (with per-packet comments) out;
- ``seen``: nat-check's ``Seen`` view of a decoded packet;
- ``live``: an AF_PACKET socket with optional BPF and a reader thread (nat-check's
  ``Capture``; ``punch --pcap`` builds on it in ``synprobe.punch_pcap``).

No scapy anywhere here: the punch imports this and must start fast.
"""
