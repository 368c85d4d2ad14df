#!/usr/bin/env python3
"""flsl-onboard's MAVLink stream, decoded by a decoder we did not write: pymavlink.

    mavlink_check.py --onboard BIN --bundle DIR --frames-cmd "CMD" --size WxH [--min-active N]
                     [--serial-capture FILE]

Binds a UDP socket on 127.0.0.1, runs `CMD | BIN --bundle DIR --input - --size WxH --frames all
--mavlink udpout:127.0.0.1:PORT --json J`, and decodes every datagram with pymavlink's MAVLink 2
parser (common dialect, robust_parsing off: a CRC or framing error raises). Fails unless

- every datagram is exactly one MAVLink 2 message (0xFD magic), unsigned, CRC-valid, from the
  bundle's system/component ids, with sequence numbers increasing by one;
- HEARTBEATs say MAV_TYPE_CAMERA, about once a second;
- the CAMERA_TRACKING_IMAGE_STATUS messages are, in order, the `"mavlink"` records of the JSON
  lines (same sequence number, status; the rectangle equal as float32, bit for bit); at
  least --min-active of them are ACTIVE;
- GIMBAL_MANAGER_SET_PITCHYAW (when the bundle has a gimbal) carries the logged angles.

With --serial-capture, flsl-onboard also writes its link wire frames to the slave side of a
pseudo-terminal (`--serial /dev/pts/N`) and the bytes read from the master side are saved to
FILE (scripts/link-loop.sh replays them into the firmware image).
"""
import argparse
import select
import math
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading

os.environ["MAVLINK20"] = "1"
from pymavlink.dialects.v20 import common as mav  # noqa: E402


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onboard", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--frames-cmd", required=True, help="shell command writing raw RGB24 frames to stdout")
    p.add_argument("--size", required=True)
    p.add_argument("--min-active", type=int, default=1)
    p.add_argument("--system", type=int, default=1)
    p.add_argument("--component", type=int, default=100)
    p.add_argument("--serial-capture", help="also send wire frames into a pty and save what arrives here")
    a = p.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    port = sock.getsockname()[1]
    datagrams = []
    done = threading.Event()

    def receive():
        while not done.is_set():
            try:
                datagrams.append(sock.recv(65536))
            except socket.timeout:
                pass

    rx = threading.Thread(target=receive)
    rx.start()
    serial_args = ""
    captured = bytearray()
    if a.serial_capture:
        master, slave = os.openpty()
        serial_args = f" --serial {os.ttyname(slave)} --baud 115200"

        def capture():
            while True:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    captured.extend(os.read(master, 65536))
                elif done.is_set():
                    return

        cap = threading.Thread(target=capture)
        cap.start()
    with tempfile.TemporaryDirectory() as tmp:
        jpath = os.path.join(tmp, "onboard.jsonl")
        cmd = (
            f"{a.frames_cmd} | {shlex.quote(a.onboard)} --bundle {shlex.quote(a.bundle)} --input - --size {a.size}"
            f" --frames all --mavlink udpout:127.0.0.1:{port} --json {shlex.quote(jpath)} --stats-every 0{serial_args}"
        )
        print(f"mavlink_check: {cmd}", flush=True)
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd])
        done.set()
        rx.join()
        if a.serial_capture:
            cap.join()
            with open(a.serial_capture, "wb") as f:
                f.write(captured)
            frames = sum(1 for c in bytes(captured).split(b"\0") if c)
            print(f"mavlink_check: serial: {len(captured)} bytes ({frames} wire frames) read from the pty master into {a.serial_capture}")
        if r.returncode != 0:
            sys.exit(f"FAIL: the pipeline exited with {r.returncode}")
        with open(jpath) as f:
            records = [json.loads(line) for line in f if line.strip()]
    # Datagrams still in the socket buffer after the receiver stopped.
    sock.setblocking(False)
    while True:
        try:
            datagrams.append(sock.recv(65536))
        except BlockingIOError:
            break

    problems = []
    parser = mav.MAVLink(None)
    parser.robust_parsing = False
    heartbeats, statuses, gimbals = [], [], []
    last_seq = None
    for i, d in enumerate(datagrams):
        if d[0] != 0xFD:
            problems.append(f"datagram {i}: magic 0x{d[0]:02x}, not MAVLink 2")
            continue
        try:
            msgs = parser.parse_buffer(d) or []
        except mav.MAVError as e:
            problems.append(f"datagram {i}: {e}")
            continue
        if len(msgs) != 1:
            problems.append(f"datagram {i}: {len(msgs)} messages")
            continue
        m = msgs[0]
        h = m.get_header()
        if m.get_signed() or d[2] & 0x01:
            problems.append(f"datagram {i}: signed")
        if (h.srcSystem, h.srcComponent) != (a.system, a.component):
            problems.append(f"datagram {i}: ids {h.srcSystem}/{h.srcComponent}")
        if last_seq is not None and h.seq != (last_seq + 1) % 256:
            problems.append(f"datagram {i}: sequence {h.seq} after {last_seq}")
        last_seq = h.seq
        t = m.get_type()
        if t == "HEARTBEAT":
            if m.type != mav.MAV_TYPE_CAMERA:
                problems.append(f"heartbeat type {m.type}")
            heartbeats.append(m)
        elif t == "CAMERA_TRACKING_IMAGE_STATUS":
            statuses.append((h.seq, m))
        elif t == "GIMBAL_MANAGER_SET_PITCHYAW":
            gimbals.append(m)
        else:
            problems.append(f"datagram {i}: unexpected {t}")

    logged = [r["mavlink"] for r in records if "mavlink" in r]
    if len(logged) != len(statuses):
        problems.append(f"{len(logged)} tracking reports logged, {len(statuses)} CAMERA_TRACKING_IMAGE_STATUS received")
    active = 0
    for k, (rep, (seq, m)) in enumerate(zip(logged, statuses)):
        if rep["seq"] != seq:
            problems.append(f"status {k}: logged seq {rep['seq']}, received {seq}")
        if rep["status"] == "active":
            active += 1
            if m.tracking_status != mav.CAMERA_TRACKING_STATUS_FLAGS_ACTIVE or m.tracking_mode != mav.CAMERA_TRACKING_MODE_RECTANGLE:
                problems.append(f"status {k}: logged active, received status {m.tracking_status} mode {m.tracking_mode}")
            got = [m.rec_top_x, m.rec_top_y, m.rec_bottom_x, m.rec_bottom_y]
            want = [f32(v) for v in rep["rect"]]
            if got != want:
                problems.append(f"status {k}: rectangle {got} received, {want} logged")
        elif m.tracking_status != mav.CAMERA_TRACKING_STATUS_FLAGS_IDLE:
            problems.append(f"status {k}: logged idle, received status {m.tracking_status}")
        if "gimbal_deg" in rep:
            if k >= len(gimbals):
                problems.append(f"status {k}: no gimbal set-point received")
            else:
                g = gimbals[k]
                pitch, yaw = rep["gimbal_deg"]


                if abs(g.pitch - math.radians(pitch)) > 1e-5 or abs(g.yaw - math.radians(yaw)) > 1e-5:
                    problems.append(f"gimbal {k}: ({g.pitch}, {g.yaw}) rad received, ({pitch}, {yaw}) deg logged")
    if active < a.min_active:
        problems.append(f"{active} ACTIVE tracking reports, expected at least {a.min_active}")
    if not heartbeats:
        problems.append("no HEARTBEAT")
    print(
        f"mavlink_check: {len(datagrams)} datagrams decoded by pymavlink: {len(heartbeats)} HEARTBEAT, "
        f"{len(statuses)} CAMERA_TRACKING_IMAGE_STATUS ({active} active), {len(gimbals)} GIMBAL_MANAGER_SET_PITCHYAW; "
        f"{len(records)} frames logged"
    )
    if problems:
        for q in problems[:20]:
            print(f"  {q}")
        sys.exit(f"FAIL: {len(problems)} problem(s)")
    print("ok: every message CRC-valid MAVLink 2, rectangles equal to the logged ones bit for bit")


if __name__ == "__main__":
    main()
