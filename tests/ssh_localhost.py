"""A private sshd on 127.0.0.1 for DeepSpeed's default multi-node launch (`deepspeed --hostfile`: pdsh
starts one launcher per host over ssh), with keys made for the test.

Everything lives in one folder: a host key and a user key (ed25519, no passphrase), authorized_keys
and known_hosts holding just those, an sshd_config (127.0.0.1 only, a free port, public keys only),
an ssh_config that reaches the sshd as `localhost` and as `127.0.0.1`, and `bin/ssh`, which runs the
real ssh with that config. Putting `bin/` first on PATH is all a client needs: DeepSpeed's reachability
check and pdsh both run `ssh` from PATH. Nothing is written to ~/.ssh or /etc/ssh; as root, sshd
wants its privilege separation directory /run/sshd (normally made by the init system) and it is made
if missing. On exit the sshd and every process started through it are ended.

    with LocalSshd(tmp) as sshd:
        subprocess.run(["deepspeed", "--hostfile", ...], env={**env, "PATH": f"{sshd.bin}:{env['PATH']}"})
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd refuses to start from a relative path; Debian's openssh-server puts it here
HOSTS = ("localhost", "127.0.0.1")


def ssh_missing() -> str:
    """Why the test cannot run here ('' if it can)."""
    why = []
    if shutil.which("pdsh") is None:
        why.append("pdsh")
    if not os.access(SSHD, os.X_OK):
        why.append(f"{SSHD} (openssh-server)")
    why += [tool for tool in ("ssh", "ssh-keygen") if shutil.which(tool) is None]
    return f"not installed: {', '.join(why)} (bash .ci/setup.sh installs them as root)" if why else ""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalSshd:
    def __init__(self, root: Path, start_timeout_s: float = 20.0):
        self.root = Path(root)
        self.bin = self.root / "bin"
        self.config = self.root / "ssh_config"
        self.log = self.root / "sshd.log"
        self.port = _free_port()
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def _keygen(self, name: str) -> Path:
        key = self.root / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dreamprm-test-{name}", "-f", str(key)],
                       check=True, capture_output=True, timeout=30)
        return key

    def __enter__(self) -> "LocalSshd":
        self.root.mkdir(parents=True, exist_ok=True)
        host_key, user_key = self._keygen("host_key"), self._keygen("user_key")
        (self.root / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
        host_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        (self.root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        (self.root / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {self.port}
HostKey {host_key}
PidFile {self.root / 'sshd.pid'}
AuthorizedKeysFile {self.root / 'authorized_keys'}
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {self.user}
UsePAM no
StrictModes no
LogLevel VERBOSE
""")
        # HostName 127.0.0.1 for both names: one known_hosts entry, and no lookup of `localhost` over IPv6.
        self.config.write_text(f"""\
Host {' '.join(HOSTS)}
  HostName 127.0.0.1
  Port {self.port}
  User {self.user}
  IdentityFile {user_key}
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking yes
  UserKnownHostsFile {self.root / 'known_hosts'}
  GlobalKnownHostsFile /dev/null
  ConnectTimeout 10
  LogLevel ERROR
""")
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {self.config} "$@"\n')
        wrapper.chmod(0o755)
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
            Path("/run/sshd").mkdir(mode=0o755, parents=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_reachable()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_reachable(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            done = subprocess.run([str(self.bin / "ssh"), HOSTS[0], "true"], capture_output=True, text=True,
                                  timeout=30)
            if done.returncode == 0:
                return
            last = done.stderr
            time.sleep(0.3)
        raise RuntimeError(f"ssh to the test's sshd on 127.0.0.1:{self.port} still fails after {self.start_timeout_s} s:"
                           f"\n{last[-2000:]}\n--- sshd log ---\n{self.log.read_text()[-3000:]}")

    def logins(self) -> int:
        """Public-key logins the sshd accepted so far."""
        return self.log.read_text(errors="replace").count(f"Accepted publickey for {self.user}")

    def stop(self) -> None:
        """End the sshd and whatever still runs in its sessions."""
        if self.proc is None:
            return
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL if pid != self.proc.pid else signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.stop()
