"""simulsyn_core's internals: the broker, the punch and its strategies, the wire
protocol, the PAKE and the records. Not part of the public API (docs/api.md): any of it
may change in any release. synprobe, shipped alongside, builds on them."""
