"""A hostile FUSE server (root: mount): mounts a file system with one file in a private mount
namespace, opens its root and the file, then never answers another request (an fstat(2) or
close(2) of those descriptors by anyone waits; close's FLUSH even uninterruptibly).
Prints "ready PID DIRFD FILEFD SOCKFD SOCKINODE"; on stdin's EOF closes the device first (aborting
the connection: every waiting request fails) and exits."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
import tempfile
import threading

CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x20000, 0x4000, 0x40000
OPCODES = {"LOOKUP": 1, "GETATTR": 3, "OPEN": 14, "INIT": 26, "OPENDIR": 27}
HDR = struct.Struct("=IIQQIIII")  # fuse_in_header
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr


def attr(node: int) -> bytes:
    mode = 0o40755 if node == 1 else 0o100644
    return ATTR.pack(node, 0, 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 0, 0)


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "private mount namespace")
    mnt = tempfile.mkdtemp(prefix="btns-fuse-")
    dev = os.open("/dev/fuse", os.O_RDWR)
    opts = f"fd={dev},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"btns-hostile", mnt.encode(), b"fuse", 0, opts) != 0:
        raise OSError(ctypes.get_errno(), "mount fuse")

    def reply(unique: int, payload: bytes = b"", error: int = 0) -> None:
        os.write(dev, struct.pack("=IiQ", 16 + len(payload), error, unique) + payload)

    def serve(until: int) -> None:
        """Answer requests until the one with opcode ``until`` was answered."""
        while True:
            buf = os.read(dev, 1 << 20)
            _len, opcode, unique, node, *_ = HDR.unpack_from(buf)
            if opcode == OPCODES["INIT"]:
                readahead = struct.unpack_from("=III", buf, HDR.size)[2]
                reply(unique, struct.pack("=IIIIHHIIHHI7I", 7, 31, readahead, 0, 16, 12, 4096, 1, 1, 0, 0, *[0] * 7))
            elif opcode in (OPCODES["OPENDIR"], OPCODES["OPEN"]):
                reply(unique, struct.pack("=QII", 1, 0, 0))
            elif opcode == OPCODES["LOOKUP"]:
                reply(unique, struct.pack("=QQQQII", 2, 0, 0, 0, 0, 0) + attr(2))
            elif opcode == OPCODES["GETATTR"]:
                reply(unique, struct.pack("=QII", 0, 0, 0) + attr(node))
            else:
                reply(unique, error=-38)  # ENOSYS
            if opcode == until:
                return

    opened: dict[str, int] = {}

    def opener() -> None:
        opened["dir"] = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        opened["file"] = os.open(os.path.join(mnt, "f"), os.O_RDONLY)

    th = threading.Thread(target=opener)
    th.start()
    serve(OPCODES["OPENDIR"])
    serve(OPCODES["OPEN"])
    th.join()
    sock = socket.socket()
    ino = os.fstat(sock.fileno()).st_ino
    print("ready", os.getpid(), opened["dir"], opened["file"], sock.fileno(), ino, flush=True)
    sys.stdin.read()  # never answers again
    os.close(dev)  # the connection aborted: every request still waiting fails, ours at exit too
    libc.umount2(mnt.encode(), 2)  # MNT_DETACH: the mount point is an empty directory of the shared /tmp
    try:
        os.rmdir(mnt)
    except OSError:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
