"""synprobe: the command line of simulsyn (broker, punch, NAT lab, probes, captures)."""

from simulsyn_core import __version__

__all__ = ["__version__"]
