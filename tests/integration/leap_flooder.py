"""A flooder of the leap-of-faith port (run as its own process): garbage, HELLOs, bogus KEYREQs."""

import os
import socket
import sys
import time

from btns_vici.leap import wire

src, dst, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
pps = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0  # 0: as fast as possible
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
target = (dst, port)
junk = [
    wire.hello(os.urandom(16)),
    os.urandom(200),
    b"BTKL\x01\x03" + bytes(250),
    wire.keyreq(os.urandom(16), os.urandom(16), os.urandom(32), os.urandom(64)),
]
sent, start = 0, time.monotonic()
end = start + seconds
while time.monotonic() < end:
    if pps and sent > (time.monotonic() - start) * pps:
        time.sleep(0.001)
        continue
    for j in junk * 16:
        try:
            s.sendto(j, target)
            sent += 1
        except OSError:
            pass
print(sent, flush=True)
