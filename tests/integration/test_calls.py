"""The call layer between app qubes (netstack.calls; docs/calls.md), with real bubblewrap
sandboxes (root): `netstack-call` in one qube's sandbox reaches a service in another's
only as the policy says; the source is the socket's qube; denied calls never run the
service (a marker file proves it), and each leak test has an anti-test with an `allow`
line proving the marker would be seen; copy, move and the clipboard ride on the layer;
a policy that does not parse refuses `up` and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.util import (
    ROOT,
    cli,
    new_stack_name,
    reap_zombies,
    stack_leftovers,
    wait_for,
)

pytestmark = pytest.mark.root

POLICY = """\
# the call layer's test policy
my.Echo        *      work      personal  allow
my.Touch       *      work      personal  allow
my.Mark        *      work      personal  deny
my.Mark        *      personal  work      allow
my.Asked       *      work      personal  ask
my.Big         *      work      personal  allow
my.Missing     *      work      personal  allow
my.Echo        *      personal  @default  allow target=work
qubes.Filecopy *      @tag:work personal  allow
qubes.ClipboardPaste * work     personal  allow
my.Where       *      work      @dispvm   allow
my.NoStart     *      work      @dispvm   allow autostart=no notify=yes
qubes.OpenInVM *      personal  @dispvm   deny
qubes.OpenInVM *      @anyvm    @dispvm   allow
qubes.Filecopy *      @type:DispVM work   allow
"""
SERVICES = {
    # streams both ways, its caller and argument from the layer, its own exit code
    "my.Echo": '#!/bin/sh\necho "from=$QREXEC_REMOTE_DOMAIN arg=$1"\ncat\nexit 7\n',
    # proof that a service ran: a marker named by its argument in the target's home
    "my.Touch": '#!/bin/sh\ntouch "$HOME/touched-${1:-none}"\n',
    "my.Mark": '#!/bin/sh\ntouch "$HOME/marked-by-$QREXEC_REMOTE_DOMAIN"\n',
    "my.Unlisted": '#!/bin/sh\ntouch "$HOME/unlisted-ran"\n',
    "my.Asked": '#!/bin/sh\necho asked-ran\n',
    "my.Big": '#!/bin/sh\nexec head -c 3000000 /dev/zero\n',
    "my.Where": '#!/bin/sh\nhostname\ncat\n',
    "my.NoStart": '#!/bin/sh\ntouch "$HOME/nostart-ran"\n',
}
CAP = 1000000


def make_config(tags: str = 'tags = ["work"]', policy: str = POLICY) -> str:
    """A config directory the sandboxes' account can read (services are bound from it)."""
    d = tempfile.mkdtemp(prefix="netstack-calls-", dir="/var/tmp")
    os.chmod(d, 0o755)
    base = (ROOT / "configs" / "basic.toml").read_text()
    base = base.replace("[qubes.work]\n", f"[qubes.work]\n{tags}\n")
    Path(d, "c.toml").write_text(f'[stack]\nservices = "services"\nask_timeout = 3\n'
                                 f"call_max_bytes = {CAP}\n" + base)
    Path(d, "policy.d").mkdir()
    Path(d, "policy.d", "30-test.policy").write_text(policy)
    Path(d, "services").mkdir()
    for name, text in SERVICES.items():
        p = Path(d, "services", name)
        p.write_text(text)
        p.chmod(0o755)
    os.chmod(Path(d, "services"), 0o755)
    return d


CONFIGS: dict[str, str] = {}


def _config_dir(stack: str) -> str:
    return CONFIGS[stack]


@pytest.fixture(scope="module")
def calls_stack():
    d = make_config()
    s = new_stack_name("c")
    CONFIGS[s] = d
    cli("--stack", s, "up", str(Path(d, "c.toml")), "--lab", "--no-wait")
    try:
        yield s
    finally:
        cli("--stack", s, "down", "--purge", check=False)
        reap_zombies()
        shutil.rmtree(d)
    assert not stack_leftovers(s)


def run(stack: str, qube: str, *cmd: str, input: bytes | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netstack.cli", "--stack", stack, "exec",
                           qube, "--", *cmd], input=input, capture_output=True,
                          timeout=timeout, env=dict(os.environ, SUDO_USER=""))


def home_has(stack: str, qube: str, name: str) -> bool:
    return os.path.exists(f"/var/lib/netstack/{stack}/{qube}/home/{name}")


def touched(stack: str) -> list[str]:
    """my.Touch's markers in personal's home (none: the service never ran there)."""
    try:
        return [n for n in os.listdir(f"/var/lib/netstack/{stack}/personal/home")
                if n.startswith("touched-")]
    except FileNotFoundError:
        return []


def log(stack: str) -> list[dict]:
    with open(f"/run/netstack/{stack}/calls.log") as f:
        return [json.loads(x) for x in f]


def last(stack: str, service: str) -> dict:
    return [r for r in log(stack) if r["service"] == service][-1]


def test_an_allowed_call_joins_the_streams(calls_stack):
    p = run(calls_stack, "work", "netstack-call", "personal", "my.Echo+abc",
            input=b"hello\x00bytes")
    assert p.returncode == 7, p.stderr
    assert p.stdout == b"from=work arg=abc\nhello\x00bytes"
    r = last(calls_stack, "my.Echo")
    assert (r["source"], r["target"], r["verdict"], r["argument"]) == \
        ("work", "personal", "allow", "abc")
    assert r["rule"].endswith("30-test.policy:2") and r["bytes_in"] == 11 \
        and r["bytes_out"] == len(p.stdout) and r["exit"] == 7


def test_default_target_redirected(calls_stack):
    p = run(calls_stack, "personal", "netstack-call", "@default", "my.Echo", input=b"")
    assert p.returncode == 7 and p.stdout == b"from=personal arg=\n", p.stderr
    assert last(calls_stack, "my.Echo")["target"] == "work"


def test_a_denied_call_never_reaches_the_target(calls_stack):
    p = run(calls_stack, "work", "netstack-call", "personal", "my.Mark", input=b"")
    assert p.returncode == 126 and b"refused" in p.stderr
    assert not home_has(calls_stack, "personal", "marked-by-work")
    r = last(calls_stack, "my.Mark")
    assert r["verdict"] == "deny" and r["rule"].endswith(":4") and r["exit"] is None
    # anti-test: the line that allows it the other way round makes the marker
    p = run(calls_stack, "personal", "netstack-call", "work", "my.Mark", input=b"")
    assert p.returncode == 0, p.stderr
    assert home_has(calls_stack, "work", "marked-by-personal")


def test_only_policy_allowed_services_run(calls_stack):
    """A service that exists but no line names is refused and does not run; one a line
    allows that does not exist runs nothing."""
    p = run(calls_stack, "work", "netstack-call", "personal", "my.Unlisted", input=b"")
    assert p.returncode == 126
    assert not home_has(calls_stack, "personal", "unlisted-ran")
    assert last(calls_stack, "my.Unlisted")["reason"].endswith("(default deny)")
    p = run(calls_stack, "work", "netstack-call", "personal", "my.Missing", input=b"")
    assert p.returncode == 126
    r = last(calls_stack, "my.Missing")
    assert r["verdict"] == "refused" and "no service" in r["reason"]
    # and the target is the socket's qube: personal may not call work's allowed line
    p = run(calls_stack, "personal", "netstack-call", "personal", "my.Touch+self", input=b"")
    assert p.returncode == 126 and not home_has(calls_stack, "personal", "touched-self")


@pytest.mark.parametrize("arg", ["../x", "a/b", "..", ".x", "x" * 65, "a:b"])
def test_name_tricks_are_refused(calls_stack, arg):
    p = run(calls_stack, "work", "netstack-call", "personal", f"my.Touch+{arg}", input=b"")
    assert p.returncode == 126, p.stderr
    assert touched(calls_stack) == []
    assert last(calls_stack, "my.Touch")["verdict"] == "deny"


def test_anti_a_plain_argument_gets_through(calls_stack):
    """Anti-test of the name tricks: the same line runs the service for a plain name."""
    p = run(calls_stack, "work", "netstack-call", "personal", "my.Touch+plain", input=b"")
    assert p.returncode == 0, p.stderr
    assert home_has(calls_stack, "personal", "touched-plain")
    os.unlink(f"/var/lib/netstack/{calls_stack}/personal/home/touched-plain")


RAW = r'''
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("/run/netstack-call/sock")
s.sendall(sys.argv[1].encode("latin-1").replace(b"@NUL@", b"\0"))
s.shutdown(socket.SHUT_WR)
print(s.recv(100))
'''


@pytest.mark.parametrize("line", ["personal my.Touch+a@NUL@b\n", "personal my.Touch+a b\n",
                                  "personal my.Touch" + "x" * 300,
                                  "personal my.Touch",
                                  "personal " + "my.Touch+" + "y" * 300 + "\n",
                                  "personal my.Touch+from work\n"])
def test_raw_requests_with_tricks_are_refused(calls_stack, line):
    """A caller that skips netstack-call: NULs, spaces, long lines, no line at all (the
    layer waits HEADER_WAIT for it), a claimed source."""
    p = run(calls_stack, "work", "python3", "-c", RAW, line)
    assert p.stdout.startswith(b"b'R"), (p.stdout, p.stderr)
    assert touched(calls_stack) == []


def test_anti_a_raw_request_gets_through(calls_stack):
    """Anti-test of the raw tricks: a well-formed line through the same socket runs."""
    p = run(calls_stack, "work", "python3", "-c", RAW, "personal my.Touch+raw\n")
    assert p.stdout.startswith(b"b'X"), (p.stdout, p.stderr)
    assert touched(calls_stack) == ["touched-raw"]
    os.unlink(f"/var/lib/netstack/{calls_stack}/personal/home/touched-raw")


def test_a_host_process_is_not_a_qube(calls_stack):
    """The socket is world-readable on the host; a process outside the qube's namespace
    that connects is refused (the caller's network namespace is checked)."""
    import socket

    path = f"/run/netstack/{calls_stack}/public/calls/work/sock"
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    try:  # the daemon may refuse before it reads the request: the peer is checked first
        s.sendall(b"personal my.Touch+host\n")
        s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = s.recv(100)
    s.close()
    assert got.startswith(b"R"), got
    assert not home_has(calls_stack, "personal", "touched-host")
    assert "network namespace" in log(calls_stack)[-1]["reason"]


def _pending(stack: str, deadline: float = 20) -> dict:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        out = json.loads(cli("--stack", stack, "calls", "--json").stdout)
        if out["pending"]:
            return out["pending"][0]
        time.sleep(0.05)
    raise AssertionError("no call waited for an answer")


@pytest.mark.parametrize("answer", ["allow", "deny", None])
def test_ask_waits_for_the_host(calls_stack, answer):
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", calls_stack,
                          "exec", "work", "--", "netstack-call", "personal", "my.Asked"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, SUDO_USER=""))
    try:
        w = _pending(calls_stack)
        assert (w["source"], w["target"], w["service"]) == ("work", "personal", "my.Asked")
        if answer:
            out = cli("--stack", calls_stack, "call-answer", w["id"], answer).stdout
            assert out.startswith(f"{answer}: work -> personal my.Asked")
        out, _err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if answer == "allow":
        assert p.returncode == 0 and out == b"asked-ran\n"
    else:
        assert p.returncode == 126 and out == b""
    assert last(calls_stack, "my.Asked")["verdict"] == f"ask->{answer or 'deny'}"
    assert json.loads(cli("--stack", calls_stack, "calls", "--json").stdout)["pending"] == []
    bad = cli("--stack", calls_stack, "call-answer", w["id"], "allow", check=False)
    assert bad.returncode == 2 and "no call" in bad.stderr


def _until(fd: int, want: bytes, deadline: float = 20.0) -> bytes:
    """Read a pty's master until `want` shows (what the prompter printed)."""
    import select

    got, end = b"", time.monotonic() + deadline
    while want not in got:
        left = end - time.monotonic()
        assert left > 0, got
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 4096)
    return got


def test_the_host_prompt_answers_each_waiting_call(calls_stack):
    """`call-answer --prompt` at a terminal (Qubes' confirmation dialog): each call that
    waits is shown once, in order; `y` typed after the first allows it, `n` after the
    second denies it; a `y` typed while nothing was shown answers nothing (the next call
    still waits for its own answer); Ctrl-C on a shown call denies it (exit 130); a pipe
    is refused (it would answer calls nobody saw)."""
    import pty

    piped = cli("--stack", calls_stack, "call-answer", "--prompt", check=False)
    assert piped.returncode == 2 and "needs a terminal" in piped.stderr
    master, slave = pty.openpty()
    prompter = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack",
                                 calls_stack, "call-answer", "--prompt"],
                                stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)

    def call() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack",
                                 calls_stack, "exec", "work", "--", "netstack-call",
                                 "personal", "my.Asked"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, SUDO_USER=""))
    try:
        os.write(master, b"y\n")  # typed ahead, with nothing shown: thrown away
        first = call()
        _until(master, b"Allow? [y/N] ")
        # the early `y` answered nothing: the call still waits, nothing was said
        pending = _pending(calls_stack)
        assert json.loads(cli("--stack", calls_stack, "calls", "--json").stdout)[
            "pending"] == [pending] and first.poll() is None
        import select

        assert not select.select([master], [], [], 0.5)[0] or b"allow" not in os.read(
            master, 4096)
        os.write(master, b"y\n")
        assert first.communicate(timeout=30)[0] == b"asked-ran\n"
        second = call()
        _until(master, b"Allow? [y/N] ")
        os.write(master, b"n\n")
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 126 and out == b""
        assert last(calls_stack, "my.Asked")["verdict"] == "ask->deny"
        third = call()
        _until(master, b"Allow? [y/N] ")
        prompter.send_signal(2)  # Ctrl-C on a shown call: dismissed, denied at once
        assert b"(dismissed)" in _until(master, b"(dismissed)")
        out, _ = third.communicate(timeout=30)
        assert third.returncode == 126 and out == b""
        assert prompter.wait(10) == 130
    finally:
        for p in (prompter,):
            if p.poll() is None:
                p.kill()
                p.wait()
        os.close(master)


def test_the_size_cap_cuts_a_call(calls_stack):
    p = run(calls_stack, "work", "sh", "-c", "netstack-call personal my.Big | wc -c")
    r = last(calls_stack, "my.Big")
    assert r["exit"] == 125 and "cut" in r["reason"] and r["bytes_out"] <= CAP + 65536, r
    assert int(p.stdout) <= CAP
    p = run(calls_stack, "work", "sh", "-c",
            f"head -c {CAP + 100000} /dev/zero | netstack-call personal my.Echo >/dev/null; "
            "echo $?")
    assert p.stdout.strip() == b"125"
    # anti-test: just under the cap goes through whole
    p = run(calls_stack, "work", "sh", "-c",
            f"head -c {CAP - 100} /dev/zero | netstack-call personal my.Echo | wc -c")
    assert int(p.stdout) == CAP - 100 + len("from=work arg=\n")


def test_copy_and_move_ride_on_the_layer(calls_stack):
    s = calls_stack
    run(s, "work", "sh", "-c", "printf 'a\\0b' > ~/f1; echo g > ~/g1; ln -sf /etc/passwd ~/l1;"
        " echo x > ~/m1")
    p = cli("--stack", s, "copy", "work:f1", "personal", env={"SUDO_USER": ""})
    assert "~/Incoming/work/f1" in p.stdout
    with open(f"/var/lib/netstack/{s}/personal/home/Incoming/work/f1", "rb") as f:
        assert f.read() == b"a\0b"
    for src, says in (("work:l1", "outside the home"), ("work:nope", "no such file"),
                      ("work:f1", "did not take it"), ("sys-net:x", "service qube")):
        p = cli("--stack", s, "copy", src, "personal", check=False, env={"SUDO_USER": ""})
        assert p.returncode == 2 and says in p.stderr and p.stderr.count("\n") == 1, \
            (src, p.stderr)
    # the policy has no line for personal -> work: refused, nothing lands
    run(s, "personal", "sh", "-c", "echo p > ~/p1")
    p = cli("--stack", s, "copy", "personal:p1", "work", check=False, env={"SUDO_USER": ""})
    assert p.returncode == 2 and "refused by the policy" in p.stderr
    assert not os.path.exists(f"/var/lib/netstack/{s}/work/home/Incoming/personal/p1")
    # move: the source's file goes once the destination has it, and stays when it failed
    cli("--stack", s, "move", "work:g1", "personal", env={"SUDO_USER": ""})
    assert not home_has(s, "work", "g1") and home_has(s, "personal", "Incoming/work/g1")
    run(s, "work", "sh", "-c", "echo again > ~/g1")
    p = cli("--stack", s, "move", "work:g1", "personal", check=False, env={"SUDO_USER": ""})
    assert p.returncode == 2 and home_has(s, "work", "g1")
    p = cli("--stack", s, "move", "personal:p1", "work", check=False, env={"SUDO_USER": ""})
    assert p.returncode == 2 and home_has(s, "personal", "p1")


def test_the_clipboard_pastes_once(calls_stack):
    s = calls_stack
    data = bytes(range(256)) * 4 + b"\x1b]0;title\x07"
    run(s, "work", "sh", "-c", "cat > ~/.clipboard", input=data)
    cli("--stack", s, "clipboard", "copy", "work")
    assert json.loads(cli("--stack", s, "calls", "--json").stdout)["clipboard"] == \
        {"from": "work", "bytes": len(data)}
    p = cli("--stack", s, "clipboard", "paste", "personal")
    assert "pasted into personal" in p.stdout
    with open(f"/var/lib/netstack/{s}/personal/home/.clipboard", "rb") as f:
        assert f.read() == data
    p = cli("--stack", s, "clipboard", "paste", "personal", check=False)
    assert p.returncode == 2 and "empty" in p.stderr
    # no line lets personal's clipboard into work: refused, and the buffer is kept
    run(s, "personal", "sh", "-c", "echo secret > ~/.clipboard")
    cli("--stack", s, "clipboard", "copy", "personal")
    p = cli("--stack", s, "clipboard", "paste", "work", check=False)
    assert p.returncode == 2 and "refused by the policy" in p.stderr
    with open(f"/var/lib/netstack/{s}/work/home/.clipboard", "rb") as f:
        assert f.read() == data  # its own, as it was
    assert json.loads(cli("--stack", s, "calls", "--json").stdout)["clipboard"]["from"] \
        == "personal"
    run(s, "work", "sh", "-c", "head -c 256001 /dev/zero > ~/.clipboard")
    p = cli("--stack", s, "clipboard", "copy", "work", check=False)
    assert p.returncode == 2 and "larger than 256000" in p.stderr
    # what the qube offers must be a regular file: a pipe hung the host's command, a link
    # pointed at files that are not the qube's to offer
    for make in ("mkfifo ~/.clipboard", "ln -s /etc/shadow ~/.clipboard"):
        run(s, "work", "sh", "-c", f"rm -f ~/.clipboard; {make}")
        p = cli("--stack", s, "clipboard", "copy", "work", check=False, timeout=60)
        assert p.returncode == 2 and "not a regular file" in p.stderr, (make, p.stderr)
    run(s, "work", "sh", "-c", "rm -f ~/.clipboard")


def test_a_bad_policy_refuses_up(own_stack):
    d = make_config(policy="my.Echo * work personal allow\nmy.Echo * work persnal allow\n")
    try:
        s = own_stack("p")
        p = cli("--stack", s, "up", str(Path(d, "c.toml")), "--lab", check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert "policy.d/30-test.policy:2: no app qube 'persnal'" in p.stderr
        assert not stack_leftovers(s) and not os.path.exists(f"/run/netstack/{s}")
    finally:
        shutil.rmtree(d)


def test_the_client_is_readonly_and_on_path(calls_stack):
    p = run(calls_stack, "work", "sh", "-c", "command -v netstack-call; "
            "touch /run/netstack-call/x 2>/dev/null && echo writable || echo readonly")
    assert p.stdout.split() == [b"/run/netstack-call/netstack-call", b"readonly"]
    st_ = os.stat(f"/run/netstack/{calls_stack}/public/calls")
    assert stat.S_IMODE(st_.st_mode) == 0o711


def disposables(stack: str) -> list[str]:
    from tests.integration.util import load_state

    return [q.name for q in load_state(stack).plan.qubes if q.settings.get("disposable")]


def test_open_in_a_disposable(calls_stack):
    """qvm-open-in-dvm: the file is opened by the command in a new disposable, gone after;
    a changed file comes back only as the policy allows the disposable's qubes.Filecopy."""
    s = calls_stack
    run(s, "work", "sh", "-c", "printf 'v1\\n' > ~/doc.txt")
    edit = ["sh", "-c", 'cat "$1"; echo v2 >> "$1"; hostname', "edit"]
    p = cli("--stack", s, "open-in-disposable", "work:doc.txt", "--", *edit,
            env={"SUDO_USER": ""})
    lines = p.stdout.split()
    assert lines[0] == "v1" and lines[1].startswith("disp"), p.stdout
    disp = lines[1]
    assert disp not in disposables(s) and "went back to work" in p.stderr
    with open(f"/var/lib/netstack/{s}/work/home/Incoming/{disp}/doc.txt") as f:
        assert f.read() == "v1\nv2\n"
    r = last(s, "qubes.OpenInVM")
    assert (r["source"], r["target"], r["verdict"]) == ("work", disp, "allow")
    back = last(s, "qubes.Filecopy")
    assert (back["source"], back["target"], back["verdict"]) == (disp, "work", "allow")
    # the policy re-read: without the DispVM line the change stays in the disposable
    shutil.rmtree(f"/var/lib/netstack/{s}/work/home/Incoming/{disp}")  # (names come again)
    pol = Path(_config_dir(s), "policy.d", "30-test.policy")
    text = pol.read_text()
    pol.write_text(text.replace("qubes.Filecopy *      @type:DispVM work   allow\n", ""))
    try:
        p = cli("--stack", s, "open-in-disposable", "work:doc.txt", "--", *edit,
                env={"SUDO_USER": ""})
        disp2 = p.stdout.split()[1]
        assert "not taken back" in p.stderr and disp2 not in disposables(s)
        assert not os.path.exists(f"/var/lib/netstack/{s}/work/home/Incoming/{disp2}")
        back = last(s, "qubes.Filecopy")
        assert (back["source"], back["verdict"]) == (disp2, "deny")
    finally:
        pol.write_text(text)
    # a qube the policy denies: no disposable is made, the command never runs
    run(s, "personal", "sh", "-c", "echo p > ~/doc.txt")
    p = cli("--stack", s, "open-in-disposable", "personal:doc.txt", "--", "touch",
            "/tmp/x", check=False, env={"SUDO_USER": ""})
    assert p.returncode == 2 and "refused by the policy" in p.stderr
    assert disposables(s) == []


def test_one_qube_cannot_take_every_slot(calls_stack):
    """12 calls at once from work, each waiting for an answer: 8 wait, the rest are
    refused at once; personal's call still goes through meanwhile."""
    s = calls_stack
    before = len(log(s))
    flood = subprocess.Popen(
        [sys.executable, "-m", "netstack.cli", "--stack", s, "exec", "work", "--", "sh", "-c",
         "for i in $(seq 12); do netstack-call personal my.Asked </dev/null >/dev/null "
         "2>&1 & done; wait"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, SUDO_USER=""))
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            waiting = json.loads(cli("--stack", s, "calls", "--json").stdout)["pending"]
            busy = [r for r in log(s)[before:] if r["reason"] == "too many calls at once"]
            if len(waiting) == 8 and len(busy) == 4:
                break
            time.sleep(0.05)
        assert len(waiting) == 8 and len(busy) == 4, (waiting, busy)
        assert {r["source"] for r in busy} == {"work"}
        p = run(s, "personal", "netstack-call", "@default", "my.Echo", input=b"")
        assert p.returncode == 7, p.stderr
    finally:
        flood.wait(timeout=30)  # the waiting calls are denied after ask_timeout (3 s)
    assert json.loads(cli("--stack", s, "calls", "--json").stdout)["pending"] == []


def test_leaktest_sees_the_call_socket(calls_stack, monkeypatch):
    """leaktest's row (netstack.leaktest.callcheck): a call the policy denies, and an `ask`
    answered deny, never arrive; anti-tests (FORCE: sent though allowed, `ask` answered
    allow) show the row sees a call that gets through."""
    from netstack.leaktest import callcheck
    from tests.integration.util import kernel

    k = kernel()
    s = calls_stack
    (r,) = callcheck.run(k, s, "personal")  # no line personal -> work: deny
    assert (r.target, r.leak, r.error) == ("work", None, None) and r.note.startswith("deny")
    assert last(s, "qubes.Filecopy")["verdict"] == "deny"
    (r,) = callcheck.run(k, s, "work")  # @tag:work -> personal: allowed, not tried
    assert r.leak is None and "allowed, not tried" in r.note
    monkeypatch.setattr(callcheck, "FORCE", True)
    (r,) = callcheck.run(k, s, "work")
    assert r.leak and "the file arrived" in r.leak, r
    pol = Path(_config_dir(s), "policy.d", "30-test.policy")
    text = pol.read_text()
    pol.write_text("qubes.Filecopy * personal work ask\n" + text)
    try:
        monkeypatch.setattr(callcheck, "FORCE", False)
        (r,) = callcheck.run(k, s, "personal")
        assert r.leak is None and r.error is None and r.note.startswith("ask")
        assert last(s, "qubes.Filecopy")["verdict"] == "ask->deny"
        monkeypatch.setattr(callcheck, "FORCE", True)
        (r,) = callcheck.run(k, s, "personal")
        assert r.leak and last(s, "qubes.Filecopy")["verdict"] == "ask->allow"
    finally:
        pol.write_text(text)


def test_a_policy_broken_after_up_denies_everything(calls_stack):
    """The policy is read for every call: a file that stops parsing denies every call
    (fail closed) until it is fixed; the anti-test is the same call before and after."""
    s = calls_stack
    bad = Path(_config_dir(s), "policy.d", "10-broken.policy")
    assert run(s, "work", "netstack-call", "personal", "my.Touch+before", input=b"")\
        .returncode == 0
    bad.write_text("my.Touch * work personal alow\n")
    try:
        p = run(s, "work", "netstack-call", "personal", "my.Touch+broken", input=b"")
        assert p.returncode == 126 and "touched-broken" not in touched(s)
        assert "does not parse" in last(s, "my.Touch")["reason"]
        assert "10-broken.policy:1: unknown action 'alow'" in last(s, "my.Touch")["reason"]
    finally:
        bad.unlink()
    assert run(s, "work", "netstack-call", "personal", "my.Touch+after", input=b"")\
        .returncode == 0
    for m in ("before", "after"):
        os.unlink(f"/var/lib/netstack/{s}/personal/home/touched-{m}")


def test_a_call_to_a_new_disposable(calls_stack):
    """`netstack-call @dispvm SERVICE` from a qube: a disposable made for the call runs the
    service and is gone after; a qube without a line gets no disposable."""
    s = calls_stack
    p = run(s, "work", "netstack-call", "@dispvm", "my.Where", input=b"in")
    assert p.returncode == 0, p.stderr
    name, rest = p.stdout.split(b"\n", 1)
    assert name.startswith(b"disp") and rest == b"in"
    r = last(s, "my.Where")
    assert (r["source"], r["target"], r["verdict"]) == ("work", name.decode(), "allow")
    # the caller has its exit code when the service ends; the daemon removes the
    # disposable right after (a live change of its own): gone within a deadline
    wait_for(lambda: disposables(s) == [], 20, 0.1, "the call's disposable to be removed")
    p = run(s, "personal", "netstack-call", "@dispvm", "my.Where", input=b"")
    assert p.returncode == 126 and disposables(s) == []
    r = last(s, "my.Where")
    assert (r["source"], r["target"], r["verdict"]) == ("personal", "@dispvm", "deny")


def test_autostart_no_and_notify(calls_stack):
    """`autostart=no`: a call that needs a new disposable is refused before one is made
    (the service never runs); `notify=yes`, and a deny by default, mark the call's line
    (and go to the host's journal); an allow without notify= does not."""
    s = calls_stack
    p = run(s, "work", "netstack-call", "@dispvm", "my.NoStart", input=b"")
    assert p.returncode == 126 and disposables(s) == []
    r = last(s, "my.NoStart")
    assert (r["verdict"], r["notify"]) == ("refused", True) and "autostart=no" in r["reason"]
    assert not any(os.path.exists(f"/var/lib/netstack/{s}/{q}/home/nostart-ran")
                   for q in ("work", "personal"))
    run(s, "work", "netstack-call", "personal", "my.Mark", input=b"")
    assert (last(s, "my.Mark")["verdict"], last(s, "my.Mark")["notify"]) == ("deny", True)
    run(s, "work", "netstack-call", "personal", "my.Echo", input=b"")
    assert (last(s, "my.Echo")["verdict"], last(s, "my.Echo")["notify"]) == ("allow", False)


def test_calls_listing_never_prints_a_qubes_escapes(calls_stack):
    """What a qube sends (a target, a service name) is shown escaped: a qube cannot write
    to the host's terminal through `netstack calls`."""
    s = calls_stack
    p = run(s, "work", "python3", "-c", RAW, "\x1b]0;owned\x07 my.Touch\x1b[2J\n")
    assert p.stdout.startswith(b"b'R"), p.stdout
    out = cli("--stack", s, "calls").stdout
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;owned" in out, out[-500:]
    assert json.loads(cli("--stack", s, "calls", "--json").stdout)["calls"][-1]["target"] \
        == "\x1b]0;owned\x07"


def test_a_withdrawn_call_is_one_record_saying_so(calls_stack):
    """The caller killed while its call waits for an answer: the call leaves the pending
    list and is logged once, as withdrawn (not as denied on the host, and no second
    record of a reply nobody could read)."""
    s = calls_stack
    before = len(log(s)) if os.path.exists(f"/run/netstack/{s}/calls.log") else 0
    p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s, "exec",
                          "work", "--", "netstack-call", "personal", "my.Asked"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=dict(os.environ, SUDO_USER=""))
    w = _pending(s)
    p.send_signal(15)  # exec hands SIGTERM to the command: netstack-call ends
    p.wait(30)
    got = wait_for(lambda: [r for r in log(s)[before:] if r["id"] == w["id"]], 10, 0.05,
                   "the withdrawn call's record")
    assert len(got) == 1 and got[0]["verdict"] == "ask->deny", got
    assert "withdrawn: the caller went away" in got[0]["reason"], got
    assert not [r for r in log(s)[before:] if "Broken pipe" in r["reason"]]
    assert json.loads(cli("--stack", s, "calls", "--json").stdout)["pending"] == []


def test_copy_when_the_policy_asks(calls_stack):
    """Qubes' default for qubes.Filecopy is `ask` (configs/policy.d): copy says how to
    answer, waits, and lands once the host allows it."""
    s = calls_stack
    pol = Path(_config_dir(s), "policy.d", "30-test.policy")
    text = pol.read_text()
    pol.write_text("qubes.Filecopy * personal work ask\n" + text)
    run(s, "personal", "sh", "-c", "echo asked > ~/q1")
    try:
        p = subprocess.Popen([sys.executable, "-m", "netstack.cli", "--stack", s, "copy",
                              "personal:q1", "work"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, SUDO_USER=""))
        w = _pending(s)
        assert (w["source"], w["target"], w["service"]) == ("personal", "work",
                                                            "qubes.Filecopy")
        cli("--stack", s, "call-answer", w["id"], "allow")
        out, err = p.communicate(timeout=60)
    finally:
        pol.write_text(text)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "call-answer ID allow" in err, err
    assert home_has(s, "work", "Incoming/personal/q1")
