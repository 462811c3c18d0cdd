"""The NAT lab: two hosts behind real Linux NATs in network namespaces.

* ``profiles``: the NAT profiles and the lab's addresses (pure data);
* ``netns``: the namespace builder (``Lab``: up, down, run a command in a node; ``sweep``);
* ``harness``: the project's own commands in a lab (a broker, a pair of punches);
* ``delay``: the user-space delay element put on a link (``LinkDelays``);
* ``cli``: ``synprobe lab`` (up, down, profiles, demo).

The names most callers need are re-exported here.
"""

from __future__ import annotations

from .harness import SYNPROBE, PeerRun, punch_pair, start_broker, wait_for_listen
from .netns import (
    PREFIX,
    Lab,
    LinkDelays,
    check_lab_id,
    lab_namespaces,
    require_root,
    require_tools,
    sweep,
)
from .profiles import (
    BROKER_IPS,
    BROKER_IPS6,
    BROKER_PORT,
    NODES,
    PROFILES,
    PROFILES6,
    PUNCH_PROFILES,
    Profile,
    Profile6,
    SideAddresses,
    SideAddresses6,
    side_addresses,
    side_addresses6,
)

__all__ = [
    "BROKER_IPS", "BROKER_IPS6", "BROKER_PORT", "NODES", "PREFIX", "PROFILES", "PROFILES6",
    "PUNCH_PROFILES",
    "SYNPROBE", "Lab", "LinkDelays", "PeerRun", "Profile", "Profile6", "SideAddresses",
    "SideAddresses6", "side_addresses6", "check_lab_id", "lab_namespaces", "punch_pair",
    "require_root", "require_tools", "side_addresses", "start_broker", "sweep",
    "wait_for_listen",
]
