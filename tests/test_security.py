"""Security end to end: CURVE keys, identity from keys, owner-or-admin, jobs run as their users, limits.

The module's cluster (``lab``) is a master with keys (admins: carol; small limits) and one node agent,
n1, with its own key; alice, bob and carol are users with keys, played by the real ``zmgpu`` command
with a client file naming their key.  Its node runs every job as its own user (single_user), so the
users need no accounts here; the test of jobs running as their submitter creates real accounts (as
root only) and a cluster of its own whose agent switches users.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import yaml
import zmq

from conftest import Cluster, as_user, one_line_error, poll
from helpers import hold_sh, release
from zmgpu.keys import CurveClient, KeyPair, load_key_pair, load_public_key, write_key_pair
from zmgpu.node.users import Account, Refusal, UserPolicy
from zmgpu.protocol import (ENDED_PREFIX, MAGIC, MsgType, array_end_prefix, decode, encode, end_topic,
                            job_prefix)

USERS = ("alice", "bob", "carol")
LIMITS = {"max_message_bytes": 2 << 20, "max_command_bytes": 4096, "max_env_bytes": 65536,
          "max_pending_per_user": 3}
MASTER = [sys.executable, "-m", "zmgpu.master"]


class Keys:
    """Key pairs made with zmgpu's own writer, and the client files that name them."""

    def __init__(self, directory):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def make(self, *names: str) -> dict[str, str]:
        """Write a pair per name; their public keys."""
        return {name: load_public_key(write_key_pair(str(self.dir), name)[0]).decode() for name in names}

    def secret(self, name: str) -> str:
        return str(self.dir / f"{name}.key_secret")

    def pair(self, name: str) -> KeyPair:
        return load_key_pair(self.secret(name))

    def curve(self, name: str) -> CurveClient:
        return CurveClient(self.pair(name), load_public_key(str(self.dir / "master.key")))

    def node_flags(self, name: str) -> list[str]:
        return ["--secret-key-file", self.secret(name), "--master-public-key-file", str(self.dir / "master.key")]

    def as_key(self, name: str, user: str | None = None) -> dict:
        """Environment for ``zmgpu`` run by ``user`` (default: ``name``) with the key ``name``."""
        path = self.dir / f"client-{name}.yaml"
        path.write_text(yaml.safe_dump({"secret_key_file": self.secret(name),
                                        "master_public_key_file": str(self.dir / "master.key")}))
        return {**as_user(user or name), "ZMGPU_CONFIG": str(path)}

    def authorize(self, nodes: dict[str, str], users: dict[str, str]) -> None:
        (self.dir / "authorized_nodes").write_text("".join(f"{n} {k}\n" for n, k in nodes.items()))
        (self.dir / "authorized_users").write_text(
            "# user   public key\n" + "".join(f"{u} {k}  # {u}'s laptop\n" for u, k in users.items()))


def start_secure(cluster: Cluster, keys: Keys, client: str, nodes: dict[str, bool], **config) -> None:
    """Start a master with keys (``config`` in its YAML) and node agents (id -> single_user), keyed."""
    path = cluster.root / "master.yaml"
    path.write_text(yaml.safe_dump({"secret_key_file": keys.secret("master"), **config}))
    cluster.start_master(0, 0, "--config", str(path), root_jobs=config.get("allow_root_jobs", True))
    cluster.curve, cluster.user = keys.curve(client), client
    for node_id, single_user in nodes.items():
        cluster.start_node(node_id, 2, *keys.node_flags(node_id), single_user=single_user)
    cluster.wait_nodes_up(len(nodes))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    keys = Keys(root / "keys")
    public = keys.make("master", "n1", "n2", *USERS, "mallory")
    keys.authorize({"n1": public["n1"], "n2": public["n2"]}, {u: public[u] for u in USERS})
    cluster = Cluster(root / "cluster")
    try:
        start_secure(cluster, keys, "alice", {"n1": True}, admins=["carol"], **LIMITS)
        yield cluster, keys
    finally:
        cluster.close()


def master_log(cluster: Cluster) -> str:
    return cluster.master.log.read_text(errors="replace")


#: Sockets a test opened; closed after it, so that a refused one stops knocking at the master.
_OPEN: list[zmq.Socket] = []


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _OPEN:
        _OPEN.pop().close(0)


#: What ends a client's connection from its own side: a refused handshake, or the master hanging up.
_CUT_OFF = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)


def dealer(cluster: Cluster, curve: CurveClient | None) -> zmq.Socket:
    sock, _ = watched_dealer(cluster, curve, 0)
    return sock


def watched_dealer(cluster: Cluster, curve: CurveClient | None, events: int = _CUT_OFF):
    """A DEALER to the master's port, and a monitor of ``events`` on it (None for none) attached before it
    connects, so that none is missed."""
    sock = cluster.ctx.socket(zmq.DEALER)
    _OPEN.append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    monitor = sock.get_monitor_socket(events) if events else None
    if monitor is not None:
        _OPEN.append(monitor)
    sock.connect(f"tcp://127.0.0.1:{cluster.port}")
    return sock, monitor


def no_answer(sock: zmq.Socket, monitor: zmq.Socket, what: str) -> bool:
    """True once the master has cut this connection off (a refused handshake, or dropped it) with nothing
    received on it: no answer can come on a connection that is gone."""
    poll(lambda: monitor.poll(0), 10, what)
    return not sock.poll(0)


def subscriber(cluster: Cluster, curve: CurveClient | None, job_id: str, *before: bytes) -> zmq.Socket:
    """A SUB socket subscribed to the ``before`` topics, then to ``job_id``'s: once the job's output arrives,
    the master has ruled on the others too (it takes one socket's subscriptions in order)."""
    sock = cluster.ctx.socket(zmq.SUB)
    _OPEN.append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    for topic in (*before, job_prefix(job_id)):
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(f"tcp://127.0.0.1:{cluster.pub_port}")
    return sock


def answer(sock: zmq.Socket, user: str, timeout: float = 10, **body) -> dict | None:
    """Send a PING (or ``body``'s request) and wait for the reply body; None if nothing comes."""
    msg_type = body.pop("msg_type", MsgType.PING)
    sock.send_multipart(encode(msg_type, {"user": user, "req": 1, **body}))
    return decode(sock.recv_multipart()).body if sock.poll(int(timeout * 1000)) else None


def receive_more(sock: zmq.Socket, count: int, what: str) -> None:
    """Wait until ``count`` more messages reached ``sock`` (the chatty job's output, published to all)."""
    got = 0

    def enough() -> bool:
        nonlocal got
        while sock.poll(0):
            sock.recv_multipart()
            got += 1
        return got >= count

    poll(enough, 10, what)


def chatty_job(cluster: Cluster, keys: Keys, user: str, workdir) -> str:
    """A job of ``user`` that prints a line every 0.1 s until ``stop`` exists in ``workdir``."""
    command = "while [ ! -e stop ]; do echo tick; sleep 0.1; done"
    job_id = cluster.submit(command, cwd=workdir, env=keys.as_key(user))
    cluster.wait_job_state(job_id, "RUNNING")
    return job_id


def end_job(cluster: Cluster, workdir, job_id: str) -> None:
    release(workdir, "stop")
    assert cluster.wait_job_state(job_id, ("COMPLETED", "CANCELLED"))["state"] in ("COMPLETED", "CANCELLED")
    os.unlink(workdir / "stop")


# -- keys and authentication ----------------------------------------------------------------------

def test_keygen_writes_a_secret_only_its_owner_reads_and_keeps_existing_keys(run_program, tmp_path):
    argv = [sys.executable, "-m", "zmgpu.cli.main", "keygen", "gpu7", "--dir", str(tmp_path / "k")]
    first = run_program(argv)
    assert first.returncode == 0, first.stderr
    public, secret = tmp_path / "k" / "gpu7.key", tmp_path / "k" / "gpu7.key_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    import zmq.auth   # the files are ZeroMQ certificates: pyzmq reads them too

    key, secret_key = zmq.auth.load_certificate(str(secret))
    assert secret_key and zmq.auth.load_certificate(str(public)) == (key, None)
    assert key.decode() in first.stdout
    again = run_program(argv)
    assert "--force" in one_line_error(again, 2) and load_public_key(str(public)) == key
    assert run_program([*argv, "--force"]).returncode == 0
    assert load_public_key(str(public)) != key


@pytest.mark.parametrize("problem", ["bad line", "loose secret", "no list"])
def test_a_bad_key_file_stops_the_master_with_one_line(run_program, tmp_path, problem):
    keys = Keys(tmp_path / "keys")
    public = keys.make("master", "alice")
    keys.authorize({}, {"alice": public["alice"]})
    if problem == "bad line":
        with open(keys.dir / "authorized_users", "a") as fh:
            fh.write("bob not-a-key\n")
        needle = f"{keys.dir / 'authorized_users'}:3"
    elif problem == "loose secret":
        os.chmod(keys.secret("master"), 0o644)
        needle = "chmod 600"
    else:
        os.unlink(keys.dir / "authorized_nodes")
        needle = str(keys.dir / "authorized_nodes")
    proc = run_program([*MASTER, "--port", "0", "--pub-port", "0", "--state-dir", str(tmp_path / "s"),
                        "--secret-key-file", keys.secret("master")])
    assert needle in one_line_error(proc, 2)


def test_a_non_loopback_address_without_keys_refuses_to_start(run_program, tmp_path):
    proc = run_program([*MASTER, "--host", "0.0.0.0", "--port", "0", "--pub-port", "0",
                        "--state-dir", str(tmp_path / "s")])
    line = one_line_error(proc, 2)
    assert "refusing to listen on 0.0.0.0 without keys" in line and "--insecure" in line


def test_an_insecure_master_warns_in_its_log_and_in_zmgpu_nodes(bare_cluster):
    bare_cluster.start_master(0, 0, "--host", "0.0.0.0", "--insecure")
    assert "INSECURE" in master_log(bare_cluster)
    listing = bare_cluster.cli("nodes")
    assert "WARNING" in listing.stderr and "--insecure" in listing.stderr
    assert '"insecure": true' in bare_cluster.cli("nodes", "--json").stdout


def test_wrong_key_and_no_key_get_nothing_on_either_port(lab, workdir):
    cluster, keys = lab
    strangers = {"wrong key": keys.curve("mallory"), "no key": None}
    for name, curve in strangers.items():
        sock, monitor = watched_dealer(cluster, curve)
        sock.send_multipart(encode(MsgType.PING, {"user": "alice", "req": 1}))
        assert no_answer(sock, monitor, f"the master to refuse a client with {name}")
    assert answer(dealer(cluster, keys.curve("alice")), "alice")["ok"]
    poll(lambda: "unknown key" in master_log(cluster), 10, "the master to log the refused key")

    job_id = chatty_job(cluster, keys, "alice", workdir)
    try:
        subs = {name: subscriber(cluster, curve, job_id) for name, curve in strangers.items()}
        own = subscriber(cluster, keys.curve("alice"), job_id)
        # Chunks published after every subscription was made: a stranger let in would have them too.
        receive_more(own, 5, "alice's subscription to deliver her job's output")
        assert {name: sub.poll(0) for name, sub in subs.items()} == dict.fromkeys(strangers, 0)
    finally:
        end_job(cluster, workdir, job_id)


def test_a_key_acts_only_as_its_user(lab):
    cluster, keys = lab
    reply = answer(dealer(cluster, keys.curve("alice")), "bob", timeout=10)
    assert reply["error"] == "PERMISSION_DENIED" and "belongs to user alice" in reply["message"], reply
    # The command line says so in one line, with exit status 1.
    proc = cluster.cli("queue", env=keys.as_key("alice", user="bob"), check=False)
    assert "belongs to user alice" in one_line_error(proc)


def test_the_ends_of_an_arrays_tasks_are_its_owners_to_follow_with_one_subscription(lab, workdir):
    cluster, keys = lab
    marker = chatty_job(cluster, keys, "bob", workdir)
    array_id = cluster.submit(hold_sh("task.$ZMGPU_ARRAY_TASK_ID"), "--array", "0-1", cwd=workdir,
                              env=keys.as_key("bob"))
    try:
        tasks = array_end_prefix(array_id)
        snooper = subscriber(cluster, keys.curve("alice"), marker, tasks)
        owner = subscriber(cluster, keys.curve("bob"), marker, tasks)
        poll(lambda: f"refused a subscription to {job_prefix(marker).decode()!r}" in master_log(cluster), 10,
             "the master to refuse alice's subscriptions")
        assert f"refused a subscription to {tasks.decode()!r}" in master_log(cluster)
        receive_more(owner, 5, "bob's subscriptions to be granted")
    finally:
        end_job(cluster, workdir, marker)
        release(workdir, "task.0", "task.1")
    ended = set()

    def both_tasks_heard():
        while owner.poll(0):
            topic = owner.recv_multipart()[0]
            if topic.startswith(tasks):
                ended.add(topic)
        return ended == {end_topic(f"{array_id}_{i}") for i in (0, 1)}

    poll(both_tasks_heard, 20, "bob to hear both tasks end under the array's prefix")
    assert not snooper.poll(0), "alice heard bob's tasks"


def test_a_user_cannot_cancel_or_read_another_users_job(lab, workdir):
    cluster, keys = lab
    job_id = chatty_job(cluster, keys, "bob", workdir)
    try:
        alice = keys.as_key("alice")
        for command in (["cancel", job_id], ["logs", job_id], ["attach", job_id]):
            line = one_line_error(cluster.cli(*command, env=alice, check=False))
            assert f"permission denied: job {job_id} belongs to bob" in line, (command, line)
        assert cluster.job(job_id)["state"] == "RUNNING"
        # Every job's end, and this one's, are bob's and admins' to follow, not alice's.
        ends = (ENDED_PREFIX, end_topic(job_id))
        snooper = subscriber(cluster, keys.curve("alice"), job_id, *ends)
        owner = subscriber(cluster, keys.curve("bob"), job_id, end_topic(job_id))
        # Her job prefix came last on her socket: once it is refused, the topics before it were ruled on.
        refused = f"refused a subscription to {job_prefix(job_id).decode()!r}"
        poll(lambda: refused in master_log(cluster), 10, "the master to refuse alice's subscription")
        receive_more(owner, 5, "bob's subscription to deliver his job's output")
        assert not snooper.poll(0), "alice received bob's output"
        # The owner reads it; an admin (carol) reads and cancels it.
        assert "tick" in cluster.cli("logs", job_id, env=keys.as_key("bob")).stdout
        assert "tick" in cluster.cli("logs", job_id, env=keys.as_key("carol")).stdout
        cluster.cli("cancel", job_id, env=keys.as_key("carol"))
        job = cluster.wait_job_state(job_id, "CANCELLED")
        assert job["reason"] == "cancelled by carol"
        poll(lambda: any(owner.recv_multipart()[0] == end_topic(job_id) for _ in iter(lambda: owner.poll(0), 0)),
             10, "bob's job's end on its ended topic")
        assert not snooper.poll(0), "alice heard bob's job end"
        # A subscriber that leaves takes its grants along (XPUB's own unsubscriptions carry no key).
        owner.close(0)
        snooper.close(0)
        assert answer(dealer(cluster, keys.curve("alice")), "alice", timeout=10)["ok"]
        assert cluster.master.alive()
    finally:
        release(workdir, "stop")


def test_a_node_key_registers_only_as_its_own_node(lab):
    cluster, keys = lab
    for key, refusal in (("n1", "the key of node n1 cannot speak for node n2"),
                         ("alice", "the key of user alice cannot send REGISTER")):
        impostor = cluster.start_node("n2", 2, *keys.node_flags(key))
        try:
            poll(lambda: refusal in master_log(cluster), 10, f"the master to refuse n2 with {key}'s key")
            assert cluster.node("n2") is None and cluster.node("n1")["state"] == "UP"
        finally:
            cluster.stop(impostor)
    node = cluster.start_node("n2", 2, *keys.node_flags("n2"))
    try:
        cluster.wait_node_state("n2", "UP")
    finally:
        cluster.stop(node)
    cluster.wait_node_state("n2", "DOWN")


def test_an_oversized_message_is_dropped_and_the_master_keeps_serving(lab):
    cluster, keys = lab
    sock, monitor = watched_dealer(cluster, keys.curve("alice"), zmq.EVENT_DISCONNECTED)
    big = b'{"user": "alice", "req": 1, "pad": "' + b"x" * (3 << 20) + b'"}'
    sock.send_multipart([MAGIC, MsgType.PING.value, big])
    assert no_answer(sock, monitor, "the master to drop the client that sent an oversized frame")
    assert cluster.master.alive()
    assert cluster.request(MsgType.PING)["ok"]
    assert answer(sock, "alice", timeout=10)["ok"]   # the cut-off client may connect again


def test_submits_over_the_limits_are_refused_with_a_clear_error(lab, workdir):
    cluster, keys = lab
    alice = keys.as_key("alice")
    line = one_line_error(cluster.cli("submit", "echo " + "x" * 5000, cwd=workdir, env=alice, check=False))
    assert "max_command_bytes" in line and "4096" in line
    line = one_line_error(cluster.cli("submit", "true", cwd=workdir, env={**alice, "BIG": "x" * 70000},
                                      check=False))
    assert "max_env_bytes" in line
    held = cluster.submit(hold_sh("held"), cwd=workdir, env=alice)
    try:
        waiting = [cluster.submit("true", "--after", held, cwd=workdir, env=alice) for _ in range(3)]
        line = one_line_error(cluster.cli("submit", "true", cwd=workdir, env=alice, check=False))
        assert "max_pending_per_user" in line and "3" in line
        assert cluster.submit("true", cwd=workdir, env=keys.as_key("bob"))   # other users are not held back
    finally:
        release(workdir, "held")
    assert {job["state"] for job in cluster.wait_jobs_ended([held, *waiting]).values()} == {"COMPLETED"}


def test_sighup_rereads_the_key_lists(lab):
    cluster, keys = lab
    users = keys.dir / "authorized_users"
    before = users.read_text()
    public = {**{u: load_public_key(str(keys.dir / f"{u}.key")).decode() for u in USERS}, **keys.make("dave")}
    bob = cluster.client(timeout=5, user="bob", secret_key_file=keys.secret("bob"),
                         master_public_key_file=str(keys.dir / "master.key"))

    def hup(count: int) -> None:
        cluster.master.signal(signal.SIGHUP)
        poll(lambda: master_log(cluster).count("SIGHUP:") >= count, 10, "the master to read its lists again")

    reloads = master_log(cluster).count("SIGHUP:")
    try:
        assert bob.ping()["version"] == 1
        users.write_text(before.replace(f"bob {public['bob']}", f"dave {public['dave']}"))
        hup(reloads + 1)
        # Taken off the list: refused at once, on the connection already open.
        with pytest.raises(Exception) as refused:
            bob.ping()
        assert "no longer listed" in str(refused.value)
        assert answer(dealer(cluster, keys.curve("dave")), "dave", timeout=10)["ok"]
        users.write_text(before + "eve not-a-key\n")
        hup(reloads + 2)
        assert "the keys read before stay in force" in master_log(cluster)
        assert answer(dealer(cluster, keys.curve("dave")), "dave", timeout=10)["ok"]
    finally:
        bob.close()
        users.write_text(before)
        hup(reloads + 3)


# -- running jobs as their users ------------------------------------------------------------------

def test_root_jobs_are_refused_unless_the_master_allows_them(bare_cluster, workdir):
    bare_cluster.start_master(0, 0, root_jobs=False)
    bare_cluster.start_node("n1", 2)   # single_user, run by whoever runs the tests
    bare_cluster.wait_nodes_up(1)
    line = one_line_error(bare_cluster.cli("submit", "true", cwd=workdir, env=as_user("root"), check=False))
    assert "jobs do not run as root" in line and "allow_root_jobs" in line
    if os.geteuid() == 0:
        # A user's job on a node whose agent runs every job as itself, root: the node refuses it.
        job_id = bare_cluster.submit("true", cwd=workdir, env=as_user("zmgpu-someone"))
        job = bare_cluster.wait_job_state(job_id, "FAILED")
        assert "would run as root" in job["reason"] and "allow_root_jobs" in job["reason"], job


def test_a_node_picks_the_account_by_its_own_rules():
    root = pwd.getpwuid(0).pw_name
    as_root = UserPolicy("n1", single_user=False, uid=0, name=root)
    assert as_root.run_as("zmgpu-nosuch-user", False) == Refusal("user zmgpu-nosuch-user is unknown on node n1")
    assert isinstance(as_root.run_as(root, False), Refusal)
    assert as_root.run_as(root, True) == Account.of(pwd.getpwuid(0))
    ordinary = UserPolicy("n1", single_user=False, uid=1234, name="alice")
    assert ordinary.run_as("alice", False) is None
    assert ordinary.run_as("bob", False) == Refusal("node n1 runs jobs only for alice (its agent is not root), "
                                                    "not for bob")
    assert UserPolicy("n1", single_user=True, uid=1234, name="alice").run_as("bob", False) is None
    assert isinstance(UserPolicy("n1", single_user=True, uid=0, name=root).run_as("bob", False), Refusal)


TEST_USER, TEST_GROUP, GHOST = "zmgpu-sec-u", "zmgpu-sec-g", "zmgpu-sec-ghost"


@pytest.fixture
def test_user():
    """A real account (with a supplementary group) on this machine, removed afterwards; root only."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to create a user")

    def remove():
        subprocess.run(["userdel", TEST_USER], capture_output=True)
        subprocess.run(["groupdel", TEST_GROUP], capture_output=True)

    remove()
    try:
        subprocess.run(["groupadd", TEST_GROUP], check=True, capture_output=True)
        subprocess.run(["useradd", "--no-create-home", "--groups", TEST_GROUP, TEST_USER], check=True,
                       capture_output=True)
        yield pwd.getpwnam(TEST_USER)
    finally:
        remove()


def test_a_root_agent_runs_each_job_as_its_submitter(bare_cluster, test_user, tmp_path):
    keys = Keys(tmp_path / "keys")
    public = keys.make("master", "n1", TEST_USER, GHOST, "root")
    keys.authorize({"n1": public["n1"]}, {u: public[u] for u in (TEST_USER, GHOST, "root")})
    start_secure(bare_cluster, keys, TEST_USER, {"n1": False}, allow_root_jobs=False)
    shared = tempfile.mkdtemp(prefix="zmgpu-sec-")   # under /tmp, which the test user may enter
    try:
        os.chmod(shared, 0o777)
        user = keys.as_key(TEST_USER)
        out = bare_cluster.cli("submit", "-i", "id -u; id -g; id -G", cwd=shared, env=user).stdout.split("\n")
        groups = set(os.getgrouplist(TEST_USER, test_user.pw_gid))
        assert grp.getgrnam(TEST_GROUP).gr_gid in groups
        assert (int(out[0]), int(out[1]), set(map(int, out[2].split()))) == (test_user.pw_uid, test_user.pw_gid,
                                                                             groups), out
        ghost = bare_cluster.submit("true", cwd=shared, env=keys.as_key(GHOST))
        assert bare_cluster.wait_job_state(ghost, "FAILED")["reason"] == f"user {GHOST} is unknown on node n1"
        # pytest's own directory (mode 0700, root's) is no place the user may enter.
        locked = bare_cluster.submit("true", cwd=tmp_path, env=user)
        reason = bare_cluster.wait_job_state(locked, "FAILED")["reason"]
        assert f"user {TEST_USER} cannot enter the working directory {tmp_path}" in reason, reason
        line = one_line_error(bare_cluster.cli("submit", "true", cwd=shared, env=keys.as_key("root"), check=False))
        assert "jobs do not run as root" in line
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_root_agent_without_keys_refuses_to_start(bare_cluster, run_program):
    """Without keys the master takes any claimed name, so a root agent would run jobs as anyone."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    proc = run_program([sys.executable, "-m", "zmgpu.node", "--node-id", "n1", "--simulate-gpus", "1",
                        "--state-dir", str(bare_cluster.root / "node")])
    assert proc.returncode == 2
    assert "without keys the master takes any name" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
