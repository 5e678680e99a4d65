#!/usr/bin/env python3
"""Boot Debian's stock kernel under QEMU (TCG) with soft-RoCE and run a command inside.

The rig gives the RDMA carrier tests a real RDMA device (``rxe0`` over the guest's virtio NIC) on
machines that have no RDMA hardware and cannot load kernel modules themselves.

What it does, in order:

1. Installs what is missing (as root, with apt-get): ``qemu-system-x86``, ``busybox-static``,
   ``python3-pyverbs``, ``rdma-core``, ``ibverbs-providers``, ``iproute2`` (the ``rdma`` tool).
2. Downloads Debian's ``linux-image-amd64`` package (``apt-get download``; never installed into
   /boot), extracts the kernel and the modules it needs, and builds a busybox initramfs whose
   ``/init`` insmods the modules in dependency order (read from each module's ``.modinfo``), mounts
   the host root read-only over 9p, mounts a writable 9p share at the output directory, chroots into
   the host root and runs ``guest.sh``. Kernel and initramfs are cached per kernel version under the
   cache directory (``/var/cache/fedgate-rdma`` as root, else ``.test-venvs/rdma``).
3. Boots ``qemu-system-x86_64 -accel tcg``; inside, ``guest.sh`` brings up eth0, runs
   ``rdma link add rxe0 type rxe netdev eth0`` and then the given command with the system
   ``/usr/bin/python3`` reachable, the repository on ``PYTHONPATH``.

The command's output goes to ``<out>/console.log`` (the guest's serial console) and its exit code
to ``<out>/exit-code``; files the command writes under ``$FEDGATE_RIG_OUT`` appear in ``<out>``.

Exit status: the command's own exit code; 77 with a ``SKIP: <reason>`` line when QEMU, the kernel
package or the RDMA userspace cannot be installed; 70 when the guest did not finish (boot failure,
timeout). Only stdlib here: this script runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time

K_EXIT_SKIP = 77
K_EXIT_NO_RESULT = 70
K_APT_TIMEOUT = 900  # seconds
K_RIG_VERSION = "3"  # bump when the initramfs layout changes
# Modules /init loads; their dependencies are added from .modinfo. crc32_generic: rxe computes its
# ICRC through the crypto API, and without a crc32 provider `rdma link add` fails.
K_ROOT_MODULES = (
    "crc32_generic",
    "virtio_pci",
    "virtio_net",
    "9p",
    "9pnet_virtio",
    "rdma_rxe",
    "rdma_ucm",
    "ib_uverbs",
)
K_GUEST_ADDR = "10.0.2.15/24"
K_PACKAGES = {
    "qemu-system-x86": lambda: shutil.which("qemu-system-x86_64") is not None,
    "busybox-static": lambda: _dpkg_installed("busybox-static"),
    "rdma-core": lambda: _dpkg_installed("rdma-core"),
    "ibverbs-providers": lambda: _dpkg_installed("ibverbs-providers"),
    "python3-pyverbs": lambda: _dpkg_installed("python3-pyverbs"),
    "iproute2": lambda: os.path.exists("/usr/bin/rdma") or os.path.exists("/sbin/rdma"),
}


class Skip(Exception):
    """The rig cannot run on this machine; the message says why."""


def _log(msg: str) -> None:
    print(f"rdma-rig: {msg}", file=sys.stderr, flush=True)


def _dpkg_installed(pkg: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False)
    return res.returncode == 0 and "install ok installed" in res.stdout


def _apt(args: list[str], *, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        ["apt-get", "-q", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
        timeout=K_APT_TIMEOUT,
    )


def _apt_retry(args: list[str], *, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    res = _apt(args, cwd=cwd)
    if res.returncode != 0:
        _apt(["update"])
        res = _apt(args, cwd=cwd)
    return res


def ensure_packages() -> None:
    missing = [pkg for pkg, present in K_PACKAGES.items() if not present()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Skip(f"missing {' '.join(missing)} and cannot install them (need root and apt-get)")
    _log(f"installing {' '.join(missing)}")
    res = _apt_retry(["install", "-y", "--no-install-recommends", *missing])
    still = [pkg for pkg, present in K_PACKAGES.items() if not present()]
    if res.returncode != 0 or still:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise Skip(f"cannot install {' '.join(still or missing)}: {' / '.join(tail)}")


def default_cache_dir(repo: pathlib.Path) -> pathlib.Path:
    if os.geteuid() == 0:
        return pathlib.Path("/var/cache/fedgate-rdma")
    return repo / ".test-venvs" / "rdma"


def _kernel_package() -> str:
    res = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False)
    if res.returncode != 0 or "Depends:" not in res.stdout:
        _apt(["update"])
        res = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False)
    match = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*)", res.stdout)
    if not match:
        raise Skip("apt-cache knows no linux-image-amd64 (not a Debian archive?)")
    return match.group(1)


def _module_deps(data: bytes) -> list[str]:
    match = re.search(rb"(?:^|\0)depends=([^\0]*)", data)
    if not match or not match.group(1):
        return []
    return [d.decode() for d in match.group(1).split(b",") if d]


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _write_cpio(path: pathlib.Path, entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> None:
    """A newc cpio archive: (name, mode, data, (rdev major, rdev minor)) per entry."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", (0, 0))], start=1):
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name.encode() + b"\0")
        pad4()
        out.extend(data)
        pad4()
    path.write_bytes(bytes(out))


K_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "rdma-rig: insmod $m failed"; done
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
OUT=$(arg fedgate.out)
R=/mnt/root
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot $R; then
  mount -t proc proc $R/proc
  mount -t sysfs sys $R/sys
  mount -t devtmpfs dev $R/dev
  mount -t tmpfs run $R/run
  mount -t tmpfs shm $R/dev/shm 2>/dev/null
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out $R$OUT
  chroot $R /bin/sh $OUT/guest.sh
  echo "rdma-rig: guest.sh exited $?"
else
  echo "rdma-rig: cannot mount the host root"
fi
sync
poweroff -f
"""


def build_boot_files(cache: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(vmlinuz, initramfs) for the archive's current kernel, built once per kernel version."""
    if shutil.which("apt-get") is None:
        raise Skip("no apt-get: cannot fetch Debian's kernel package")
    pkg = _kernel_package()
    init_hash = hashlib.sha256((K_INIT + K_RIG_VERSION + ",".join(K_ROOT_MODULES)).encode()).hexdigest()[:12]
    kdir = cache / f"{pkg}-{init_hash}"
    vmlinuz, initrd = kdir / "vmlinuz", kdir / "initramfs.cpio"
    if vmlinuz.exists() and initrd.exists():
        return vmlinuz, initrd
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _log(f"downloading {pkg}")
        res = _apt_retry(["download", pkg], cwd=tmp)
        debs = list(pathlib.Path(tmp).glob(f"{pkg}_*.deb"))
        if res.returncode != 0 or not debs:
            raise Skip(f"cannot download {pkg}: {(res.stderr or res.stdout).strip()[-200:]}")
        tar_proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE)
        assert tar_proc.stdout is not None
        kernel_image = b""
        modules: dict[str, bytes] = {}
        with tarfile.open(fileobj=tar_proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if re.search(r"boot/vmlinuz-", name) or name.endswith(".ko"):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    if name.endswith(".ko"):
                        modules[_norm(pathlib.PurePath(name).stem)] = fh.read()
                    else:
                        kernel_image = fh.read()
        tar_proc.wait()
        if not kernel_image:
            raise Skip(f"{pkg} has no boot/vmlinuz")
        if "rdma_rxe" not in modules:
            raise Skip(f"{pkg} ships no rdma_rxe module")
        order: list[str] = []

        def visit(mod: str, stack: tuple[str, ...]) -> None:
            if mod in order or mod in stack:
                return
            if mod not in modules:
                return  # built into the kernel
            for dep in _module_deps(modules[mod]):
                visit(_norm(dep), (*stack, mod))
            order.append(mod)

        for root in K_ROOT_MODULES:
            visit(root, ())
        busybox = pathlib.Path("/bin/busybox").read_bytes()
        entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
            (d, stat.S_IFDIR | 0o755, b"", (0, 0)) for d in ("bin", "dev", "proc", "sys", "mnt", "mnt/root", "modules")
        ]
        entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox, (0, 0)))
        entries.append(("init", stat.S_IFREG | 0o755, K_INIT.encode(), (0, 0)))
        for mod in order:
            entries.append((f"modules/{mod}.ko", stat.S_IFREG | 0o644, modules[mod], (0, 0)))
        entries.append(("modules/order", stat.S_IFREG | 0o644, "".join(f"{m}.ko\n" for m in order).encode(), (0, 0)))
        staging = pathlib.Path(tmp) / "boot"
        staging.mkdir()
        (staging / "vmlinuz").write_bytes(kernel_image)
        _write_cpio(staging / "initramfs.cpio", entries)
        _log(f"built initramfs with modules: {' '.join(order)}")
        if kdir.exists():
            shutil.rmtree(kdir)
        staging.rename(kdir)
    return vmlinuz, initrd


def write_guest_script(out: pathlib.Path, repo: pathlib.Path, command: list[str]) -> None:
    script = f"""#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME={shlex.quote(str(out))} TMPDIR={shlex.quote(str(out))} FEDGATE_RIG_OUT={shlex.quote(str(out))}
export PYTHONPATH={shlex.quote(str(repo))} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
cd {shlex.quote(str(repo))}
ip link set lo up
ip link set eth0 up
ip addr add {K_GUEST_ADDR} dev eth0
if ! rdma link add rxe0 type rxe netdev eth0; then
  echo "rdma-rig: rdma link add failed"
  echo 70 > "$FEDGATE_RIG_OUT/exit-code"
  exit 70
fi
{shlex.join(command)}
rc=$?
echo $rc > "$FEDGATE_RIG_OUT/exit-code"
echo "rdma-rig: command exited $rc"
"""
    (out / "guest.sh").write_text(script)


def run_guest(
    vmlinuz: pathlib.Path, initrd: pathlib.Path, out: pathlib.Path, *, memory_mib: int, cpus: int, timeout: float
) -> int:
    console = out / "console.log"
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
        "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{console}",
        "-kernel", str(vmlinuz), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 quiet loglevel=3 fedgate.out={out}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={out},mount_tag=out,security_model=none,multidevs=remap",
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    _log(f"booting the guest (timeout {timeout:.0f} s)")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        qemu_out, _ = proc.communicate()
        _log(f"guest did not finish in {timeout:.0f} s; killed")
    _log(f"guest ran {time.monotonic() - start:.1f} s")
    if qemu_out.strip():
        _log("qemu: " + qemu_out.decode(errors="replace").strip()[-2000:])
    code_file = out / "exit-code"
    if not code_file.exists():
        return K_EXIT_NO_RESULT
    text = code_file.read_text().strip()
    return int(text) if text.isdigit() else K_EXIT_NO_RESULT


def main(argv: list[str]) -> int:
    repo = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog="rdma-qemu-rig", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=pathlib.Path, help="kernel/initramfs cache directory")
    parser.add_argument("--out", type=pathlib.Path, help="output directory (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the guest is killed")
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs (TCG threads)")
    parser.add_argument("--prepare-only", action="store_true", help="install and build; do not boot")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run in the guest (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.prepare_only:
        command = [
            "sh",
            "-c",
            "ibv_devices && /usr/bin/python3 -c 'import pyverbs.device as d; print(d.get_device_list())'",
        ]
    try:
        ensure_packages()
        vmlinuz, initrd = build_boot_files(args.cache or default_cache_dir(repo))
    except Skip as exc:
        print(f"SKIP: {exc}", flush=True)
        return K_EXIT_SKIP
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"SKIP: rig preparation failed: {exc}", flush=True)
        return K_EXIT_SKIP
    if args.prepare_only:
        return 0
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="fedgate-rdma-rig-"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "exit-code").unlink(missing_ok=True)
    write_guest_script(out, repo, command)
    rc = run_guest(vmlinuz, initrd, out, memory_mib=args.memory, cpus=args.cpus, timeout=args.timeout)
    console = out / "console.log"
    if console.exists():
        sys.stdout.write(console.read_text(errors="replace"))
    _log(f"exit {rc}; output in {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
