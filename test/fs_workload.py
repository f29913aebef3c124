#!/usr/bin/env python3
"""The file-system tier's workload and its checker (test/fs_tier.sh runs both).

`run MOUNT MANIFEST TAG SEED` loops until killed: creates, appends, renames and
unlinks files in a few directories, each made durable with fsync of the file and of
its directory, plus large writes that fill the cache (fdatasync'd, never checked). Every
durable operation is logged to MANIFEST (a file outside the file system under test,
so it survives the kill of pcache): a `P` line before the operation starts and a
`D` line only after every fsync it needs returned. The invariant checked later: a
name whose last line is `D` is exactly in that state after a crash (present with
that SHA-256, or absent); a name with an operation still pending may be in either
state (the kill came in the middle of it).

`verify MOUNT MANIFEST` checks that invariant on the replayed file system, resolves
the pending names to what it found (appending `D` lines), and prints
`verified N absent M pending K`; it exits 1 and names every mismatch otherwise.
"""
import hashlib
import os
import random
import sys


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(manifest):
    """name -> ("present", sha) | ("absent", None) | ("pending", None)"""
    state = {}
    if not os.path.exists(manifest):
        return state
    with open(manifest) as f:
        for line in f:
            p = line.split()
            if len(p) < 3:
                continue  # a line cut short by the kill of the workload
            kind, op = p[0], p[1]
            if kind == "P":
                for n in p[2:4] if op == "rename" else p[2:3]:
                    state[n] = ("pending", None)
            elif op in ("create", "append", "seen") and len(p) == 4:
                state[p[2]] = ("present", p[3])
            elif op == "rename" and len(p) == 5:
                state[p[2]] = ("absent", None)
                state[p[3]] = ("present", p[4])
            elif op in ("unlink", "gone"):
                state[p[2]] = ("absent", None)
    return state


def run(mnt, manifest, tag, seed):
    rnd = random.Random(seed)
    out = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(line):
        os.write(out, (line + "\n").encode())

    alive = [n for n, (s, _) in load(manifest).items() if s == "present"]
    dirs = [f"d{i}" for i in range(6)]
    for d in dirs:
        os.makedirs(os.path.join(mnt, d), exist_ok=True)
    fsync_dir(mnt)
    # Bulk files of earlier runs too, oldest first, so their total stays bounded
    # across cycles (the file system is only a few hundred MiB).
    junk = sorted(
        (os.path.join(mnt, f) for f in os.listdir(mnt) if f.startswith("junk-")),
        key=os.path.getmtime,
    )
    n = 0
    while True:
        n += 1
        r = rnd.random()
        if r < 0.35 or not alive:
            name = f"{rnd.choice(dirs)}/{tag}-{n}"
            path = os.path.join(mnt, name)
            data = rnd.randbytes(rnd.randint(1, 64) * 4096 - rnd.randint(0, 4095))
            log(f"P create {name}")
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(os.path.dirname(path))
            log(f"D create {name} {hashlib.sha256(data).hexdigest()}")
            alive.append(name)
        elif r < 0.55:
            name = rnd.choice(alive)
            path = os.path.join(mnt, name)
            log(f"P append {name}")
            with open(path, "ab") as f:
                f.write(rnd.randbytes(rnd.randint(1, 16) * 1024))
                f.flush()
                os.fsync(f.fileno())
            log(f"D append {name} {sha(path)}")
        elif r < 0.70:
            old = rnd.choice(alive)
            new = f"{rnd.choice(dirs)}/{tag}-{n}r"
            h = sha(os.path.join(mnt, old))
            log(f"P rename {old} {new}")
            os.rename(os.path.join(mnt, old), os.path.join(mnt, new))
            fsync_dir(os.path.dirname(os.path.join(mnt, new)))
            fsync_dir(os.path.dirname(os.path.join(mnt, old)))
            log(f"D rename {old} {new} {h}")
            alive[alive.index(old)] = new
        elif r < 0.80 or len(alive) > 400:
            # Unlinks, and whenever many files live (bounded space across cycles).
            name = alive.pop(rnd.randrange(len(alive)))
            log(f"P unlink {name}")
            os.unlink(os.path.join(mnt, name))
            fsync_dir(os.path.dirname(os.path.join(mnt, name)))
            log(f"D unlink {name}")
        else:
            # Bulk data nobody syncs: fills the cache so writeback, GC and a full
            # cache happen under the metadata traffic above.
            path = os.path.join(mnt, f"junk-{tag}-{n}")
            with open(path, "wb") as f:
                for _ in range(rnd.randint(1, 4)):
                    f.write(rnd.randbytes(1 << 20))
                # Pushed to pcache now rather than when the page cache decides (the
                # content is still never checked): the cache fills faster.
                os.fdatasync(f.fileno())
            junk.append(path)
            while len(junk) > 24:
                os.unlink(junk.pop(0))


def verify(mnt, manifest):
    state = load(manifest)
    bad, verified, absent, pending = [], 0, 0, 0
    resolve = []
    for name, (s, h) in sorted(state.items()):
        path = os.path.join(mnt, name)
        exists = os.path.isfile(path)
        if s == "present":
            if not exists:
                bad.append(f"{name}: fsynced, missing after replay")
            elif sha(path) != h:
                bad.append(f"{name}: fsynced, checksum differs after replay")
            else:
                verified += 1
        elif s == "absent":
            if exists:
                bad.append(f"{name}: unlinked or renamed away (dir fsynced), present after replay")
            else:
                absent += 1
        else:
            pending += 1
            resolve.append(f"D seen {name} {sha(path)}" if exists else f"D gone {name}")
    if not bad:
        with open(manifest, "a") as f:
            f.write("".join(x + "\n" for x in resolve))
    for b in bad:
        print(f"MISMATCH {b}")
    print(f"verified {verified} absent {absent} pending {pending}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(verify(sys.argv[2], sys.argv[3]))
