"""Interop with the original example, through real NATs in the lab.

* two clients written to the original's protocol meet through `synprobe broker`;
* `synprobe punch --seed-broker` works against a broker that speaks only the list;
* `synprobe punch` chats with a peer that uses the original framing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synprobe import lab as labmod
from tests import schemas

ORIGINAL = [sys.executable, str(Path(__file__).with_name("original_example.py"))]
BROKER = f"{labmod.BROKER_IPS[0]}:{labmod.BROKER_PORT}"


def _original_client(lab: labmod.Lab, node: str, message: str) -> subprocess.Popen[bytes]:
    return lab.popen(node, [*ORIGINAL, "client", "--master", BROKER, "--message", message,
                            "--poll", "0.3", "--timeout", "15"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _seed_punch(lab: labmod.Lab, node: str, message: str) -> subprocess.Popen[bytes]:
    proc = lab.popen(node, [*labmod.SYNPROBE, "punch", "--seed-broker", BROKER, "--json",
                            "--timeout", "15", "-v"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(message.encode())  # small: fits the pipe; read once connected
    proc.stdin.close()
    proc.stdin = None  # communicate() must not touch it again
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.lab
def test_two_original_clients_meet_through_synprobe_broker(make_lab) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab)
    a = _original_client(lab, "ha", "hi from original A")
    time.sleep(0.2)
    b = _original_client(lab, "hb", "hi from original B")
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = _finish(a), _finish(b)
    assert (rc_a, rc_b) == (0, 0), (out_a, err_a, out_b, err_b)
    # the original example client's own JSON (not synprobe's: no schema)
    assert json.loads(out_a.splitlines()[0])["peer"].startswith(lab.side("b").public + ":")
    assert out_a.splitlines()[1] == "hi from original B"
    assert out_b.splitlines()[1] == "hi from original A"


@pytest.mark.lab
def test_seed_broker_mode_against_a_list_only_broker(make_lab) -> None:
    lab = make_lab("home", "firewall")
    lab.popen("br", [*ORIGINAL, "broker", "--bind", BROKER], stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    labmod.wait_for_listen(lab, "br", labmod.BROKER_IPS[0], labmod.BROKER_PORT, 5)
    a = _seed_punch(lab, "ha", "from A\n")
    time.sleep(0.2)
    b = _seed_punch(lab, "hb", "from B\n")
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = _finish(a), _finish(b)
    assert (rc_a, rc_b) == (0, 0), (out_a, err_a, out_b, err_b)
    rep_a, rep_b = (schemas.loads("punch", out.splitlines()[0]) for out in (out_a, out_b))
    assert rep_a["mode"] == "seed-broker" and rep_a["established"]
    assert rep_a["peer"] == rep_b["public"] and rep_b["peer"] == rep_a["public"]
    assert rep_b["public"].startswith(lab.side("b").host + ":")  # firewall: no NAT
    assert out_a.splitlines()[1:] == ["from B"] and out_b.splitlines()[1:] == ["from A"]
    assert "list broker sees us as" in err_a


@pytest.mark.lab
def test_punch_chats_with_an_original_client(make_lab) -> None:
    lab = make_lab("home", "home")
    labmod.start_broker(lab)
    orig = _original_client(lab, "ha", "hello in the original framing")
    time.sleep(0.2)
    ours = _seed_punch(lab, "hb", "héllo from synprobe\n")
    (rc_o, out_o, err_o), (rc_s, out_s, err_s) = _finish(orig), _finish(ours)
    assert (rc_o, rc_s) == (0, 0), (out_o, err_o, out_s, err_s)
    assert out_o.splitlines()[1] == "héllo from synprobe"
    assert out_s.splitlines()[1:] == ["hello in the original framing"]


@pytest.mark.lab
def test_direct_mode_without_a_broker(make_lab) -> None:
    """--peer/--local-port, the original's --remote: both sides know the other's endpoint
    in advance (the home NAT keeps the local port as the external port)."""
    lab = make_lab("home", "home")
    a_pub, b_pub = lab.side("a").public, lab.side("b").public
    procs = []
    for node, port, peer, msg in (("ha", 41001, f"{b_pub}:41002", "direct from A\n"),
                                  ("hb", 41002, f"{a_pub}:41001", "direct from B\n")):
        proc = lab.popen(node, [*labmod.SYNPROBE, "punch", "--peer", peer, "--local-port",
                                str(port), "--json", "--timeout", "10", "-v"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(msg.encode())
        proc.stdin.close()
        proc.stdin = None
        procs.append(proc)
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = _finish(procs[0]), _finish(procs[1])
    assert (rc_a, rc_b) == (0, 0), (out_a, err_a, out_b, err_b)
    rep_a = schemas.loads("punch", out_a.splitlines()[0])
    assert rep_a["mode"] == "direct" and rep_a["public"] is None
    assert rep_a["local"] == f"{lab.side('a').host}:41001"
    assert out_a.splitlines()[1:] == ["direct from B"]
    assert out_b.splitlines()[1:] == ["direct from A"]
