# Owns: extracting the uncompressed ELF kernel from a bzImage (as the kernel tree's
# scripts/extract-vmlinux does), so that QEMU boots it through PVH without decompressing
# it under TCG. Does not: boot anything or pick the kernel.
#
# Usage: python3 extract-vmlinux.py BZIMAGE OUT
import gzip, lzma, sys, zlib

data = open(sys.argv[1], "rb").read()
candidates = [
    (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(b)),
    (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)),
    (b"\x28\xb5\x2f\xfd", None),  # zstd: python's stdlib cannot read it, the zstd tool can
]
for magic, fn in candidates:
    pos = data.find(magic)
    while pos != -1:
        chunk = data[pos:]
        try:
            if fn is None:
                import subprocess
                out = subprocess.run(["zstd", "-dc"], input=chunk, capture_output=True).stdout
            else:
                out = fn(chunk)
        except Exception:
            out = b""
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
        pos = data.find(magic, pos + 1)
sys.exit("no ELF kernel found in " + sys.argv[1])
