"""`synprobe analyze`: every TCP connection attempt in a capture file, how it opened, and
its ladder diagram. ``command`` (the click command, text and JSON forms), ``tcp`` (pure:
segments to attempts, both sides' states), ``ladder`` (pure: an attempt to its drawing).
Capture files are read by ``synprobe.packets.reader``."""
