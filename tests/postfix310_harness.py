"""A throw-away Postfix 3.10 for integration tests, run from a Debian 13 (trixie) root.

The host is Debian 12, whose Postfix 3.7 has neither TLSRPT nor the MTA-STS attributes of
`smtp_tls_policy_maps` answers. `scripts/trixie-root` builds (once, then cached) a minimal
trixie root with Postfix 3.10 linked against libtlsrpt; this module runs that Postfix next to
the host's, exactly like `postfix_harness.PostfixInstance` runs the host's (same main.cf,
master.cf, log file, submission and outcome helpers), with three differences:

- every Postfix command runs `chroot`ed into the root, inside a private mount namespace
  (`unshare -m`): the instance's work directory is bind-mounted into the root at its own path,
  so every path in main.cf, and the TLSRPT socket, means the same file inside and outside;
  the lab's `resolv.conf` (with `options trust-ad`) is bind-mounted over the root's
  /etc/resolv.conf, and /proc is mounted. Nothing of this is visible outside the namespace,
  and the namespace goes away with the instance's last process. Later commands (`postfix
  stop`, `postsuper`, `postqueue`) enter the master's namespace with `nsenter`;
- the network is the host's (no network namespace): Postfix listens on, and connects from,
  the lab's loopback addresses like any other lab client;
- TLSRPT is on: `smtp_tlsrpt_enable = yes` and `smtp_tlsrpt_socket_name` = the datagram
  socket given (it must lie inside the work directory, where both sides see it; the
  receiver must let the root's `postfix` group write to it: see `postfix_gid`).

The root's `postfix` user has other ids than the host's (the root's /etc/passwd decides what
the chrooted daemons are): `postfix_ids()` reads them from the root.

Use:

    root = trixie_root()                     # or pytest.skip(skip_reason())
    with Postfix310Instance(root, workdir, address=…, resolver=…, ca_file=…,
                            tlsrpt_socket=workdir / "tlsrpt.sock",
                            tls_policy_maps="socketmap:inet:…:postfix") as pf:
        submission, outcome = pf.deliver("postmaster@sts-enforce.test")

Installs nothing but what `scripts/trixie-root` installs (debootstrap on the host, the root
itself); `skip_reason()` says why the tests cannot run (not root, no unshare/nsenter/chroot,
the root could not be built: no mirror, no network).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from postfix_harness import COMMAND_TIMEOUT, PostfixError, PostfixInstance

REPO = Path(__file__).resolve().parent.parent
TRIXIE_ROOT_SCRIPT = REPO / "scripts" / "trixie-root"
BUILD_TIMEOUT = 240.0  # a cold build took 30-35 s here; under pytest-timeout's 300 s
ROOT_POSTFIX = "/usr/sbin/postfix"  # inside the root
ROOT_POSTSUPER = "/usr/sbin/postsuper"
ROOT_POSTQUEUE = "/usr/sbin/postqueue"


@cache
def _build() -> tuple[Path | None, str | None]:
    """(the root, None) or (None, why not); builds at most once per test session."""
    if os.geteuid() != 0:
        return None, "needs root: chroot, mount namespaces and Postfix's master need it"
    for tool in ("unshare", "nsenter", "chroot", "mount"):
        if shutil.which(tool) is None:
            return None, f"needs {tool}(8) (util-linux / coreutils)"
    try:
        done = subprocess.run(
            ["bash", str(TRIXIE_ROOT_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"scripts/trixie-root did not finish within {BUILD_TIMEOUT:.0f} s"
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        return None, f"scripts/trixie-root could not build the Postfix 3.10 root: {tail}"
    root = Path(done.stdout.strip().splitlines()[-1])
    if not (root / ROOT_POSTFIX.lstrip("/")).exists():
        return None, f"scripts/trixie-root printed {root}, which has no {ROOT_POSTFIX}"
    return root, None


def skip_reason() -> str | None:
    """Why Postfix 3.10 cannot run here (building the root first if needed), or None."""
    return _build()[1]


def trixie_root() -> Path:
    """The cached trixie root (built now if needed); PostfixError when it cannot be had."""
    root, why = _build()
    if root is None:
        raise PostfixError(why or "no trixie root")
    return root


def postfix_ids(root: Path) -> tuple[int, int]:
    """(uid, gid) of the root's `postfix` user: who Postfix's unprivileged daemons run as."""
    for line in (root / "etc" / "passwd").read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == "postfix":
            return int(fields[2]), int(fields[3])
    raise PostfixError(f"{root}/etc/passwd has no postfix user")


def postfix_gid(root: Path) -> int:
    """The root's `postfix` group: give it write access to the TLSRPT socket."""
    return postfix_ids(root)[1]


def mail_version(root: Path) -> str:
    """`postconf -h mail_version` of the root's Postfix: "3.10.13"."""
    done = subprocess.run(
        ["chroot", str(root), "/usr/sbin/postconf", "-h", "mail_version"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    )
    return done.stdout.strip()


class Postfix310Instance(PostfixInstance):
    """A `PostfixInstance` whose Postfix is the trixie root's 3.10, with TLSRPT on."""

    def __init__(
        self,
        root: Path,
        workdir: Path | None = None,
        *,
        address: str,
        resolver: str,
        ca_file: Path,
        tlsrpt_socket: Path | None = None,
        tls_policy_maps: str | None = None,
        security_level: str = "dane",
        hostname: str = "client310.mxguard.test",
        extra_main_cf: Mapping[str, str] | None = None,
    ) -> None:
        workdir = Path(workdir or tempfile.mkdtemp(prefix="mxguard-postfix310-"))
        super().__init__(
            workdir,
            address=address,
            resolver=resolver,
            ca_file=ca_file,
            tls_policy_maps=tls_policy_maps,
            security_level=security_level,
            hostname=hostname,
            extra_main_cf=extra_main_cf,
        )
        self._own_workdir = True  # removed on stop, like the base class's own folders
        self.root = root
        self.mail_owner = postfix_ids(root)[0]
        self.tlsrpt_socket = tlsrpt_socket
        if tlsrpt_socket is not None and not tlsrpt_socket.is_relative_to(self.workdir):
            raise PostfixError(
                f"the TLSRPT socket {tlsrpt_socket} must be inside the work directory "
                f"{self.workdir}, the only host folder the chrooted Postfix sees"
            )
        # Where the work directory appears inside the root (the same path as outside).
        self._mountpoint = root / self.workdir.relative_to("/")
        self._created: list[Path] = []

    def main_cf(self) -> dict[str, str]:
        settings = super().main_cf()
        settings["compatibility_level"] = "3.10"
        if self.tlsrpt_socket is not None:
            settings["smtp_tlsrpt_enable"] = "yes"
            settings["smtp_tlsrpt_socket_name"] = str(self.tlsrpt_socket)
        settings.update(self.extra_main_cf)
        return settings

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> Postfix310Instance:
        self.write_config()
        self._make_mountpoint()
        root = shlex.quote(str(self.root))
        config = shlex.quote(str(self.config_dir))
        script = " && ".join(
            [
                f"mount --bind {shlex.quote(str(self.workdir))} "
                f"{shlex.quote(str(self._mountpoint))}",
                f"mount --bind {shlex.quote(str(self.resolv_conf))} {root}/etc/resolv.conf",
                f"mount -t proc proc {root}/proc",
                f"chroot {root} {ROOT_POSTFIX} -c {config} check",
                f"exec chroot {root} {ROOT_POSTFIX} -c {config} start",
            ]
        )
        self._run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], "start")
        self._master_pid = self._read_master_pid()
        self._wait_listening()
        return self

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            # Empty on the host's side (the bind mount lived in the namespace, now gone).
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    break
            self._created.clear()

    def check(self) -> None:
        """`postfix check`, run inside the root (by `start`, where the mounts are made)."""
        self._postfix("check")

    def _make_mountpoint(self) -> None:
        missing = []
        d = self._mountpoint
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            self._created.append(d)

    def _in_root(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in the root, in the running master's mount namespace."""
        if self._master_pid is None:
            raise PostfixError("the Postfix 3.10 instance is not running")
        return [
            "nsenter",
            "-t",
            str(self._master_pid),
            "-m",
            "chroot",
            str(self.root),
            *argv,
        ]

    def _postfix(self, *args: str) -> None:
        self._run(self._in_root([ROOT_POSTFIX, "-c", str(self.config_dir), *args]), " ".join(args))

    def delete(self, queue_id: str) -> None:
        self._run(
            self._in_root([ROOT_POSTSUPER, "-c", str(self.config_dir), "-d", queue_id]),
            "postsuper -d",
        )

    def queue(self) -> str:
        return self._run(
            self._in_root([ROOT_POSTQUEUE, "-c", str(self.config_dir), "-p"]), "postqueue -p"
        )
