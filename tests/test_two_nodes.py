"""Two nodes on one machine, for real: two torchrun launchers (``--nnodes 2``, one rank each, node ranks 0 and 1,
rendezvous at 127.0.0.1), as launch/slurm.sbatch starts one torchrun per node, under ZeRO-3 on gloo. The losses
match one plain process; kill -9 of node 1 mid-run stops node 0 within STOP_BOUND_S (no hang); relaunching both
resumes from the newest checkpoint to the same losses.

Both nodes share this machine's disk, as nodes share a cluster filesystem: one process renames each checkpoint
into place.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.test_crash_safety import SAVE_EVERY, STEPS, mark_resume_point, resumed, setup, start  # noqa: F401
from tests.test_crash_safety import stop_messages
from tests.test_distributed import LOSS_ATOL, REPO_ROOT, RUN_TIMEOUT_S, free_port, run_env, step_values

STOP_BOUND_S = 60  # node 1 killed -> node 0's launcher gone; gloo sees the closed connection at its next collective
FROZEN_TIMEOUT_S = 20  # ddp_timeout for the frozen-node test: how long a collective waits for a silent peer


def node_cmd(recipe: Path, out: Path, node: int, port: int, *extra: str, script: str = "stages/sft.py") -> list[str]:
    """What slurm.sbatch runs on node ``node``: torchrun with the stage, ZeRO-3, one rank per node, stop signals
    forwarded to the rank."""
    return ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr",
            "127.0.0.1", "--master-port", str(port), "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout", str(STOP_BOUND_S), script, "--config", str(recipe), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--deepspeed", "deepspeed_configs/zero3.json", *extra]


def start_nodes(recipe: Path, out: Path, logs: Path, name: str, *extra: str, script: str = "stages/sft.py",
                env: dict | None = None):
    port = free_port()
    return [start(node_cmd(recipe, out, node, port, *extra, script=script), logs / f"{name}-node{node}.log", env)
            for node in (0, 1)]


def signal_node(node, signum: int) -> None:
    """``signum`` to a node's launcher and every process under it (torchrun starts its ranks in sessions of their
    own, so its process group is not enough). A process that ended between listing and signalling is skipped: a
    short-lived child once did, between the listing and the SIGSTOP of the frozen-node test."""
    import psutil

    try:
        tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def kill_node(node) -> None:
    """SIGKILL to a node's whole process tree, as when the machine dies."""
    signal_node(node, signal.SIGKILL)
    node.wait()


def wait_all(nodes, timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """Every node's exit status; a node still running at the deadline is killed (with its ranks) and fails."""
    deadline = time.monotonic() + timeout
    try:
        return [node.wait(timeout=max(0.0, deadline - time.monotonic())) for node in nodes]
    finally:
        for node in nodes:
            kill_node(node)


def newest(out: Path) -> int:
    from audiollm.training import latest_checkpoint

    return int(latest_checkpoint(str(out)).rsplit("-", 1)[1])


def tail(path: Path) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-40:])


@pytest.fixture(scope="module")
def reference(setup):  # noqa: F811
    from stages.sft import main

    root, recipe = setup
    main(["--config", str(recipe), "--output_dir", str(root / "reference-single"), "--per_device_train_batch_size",
          "4"])
    return step_values(root / "reference-single")


def assert_losses_match(out: Path, expected: dict[int, float]) -> None:
    """2 ranks vs 1 process: the bound tests/test_distributed.py measured and explains."""
    got = step_values(out)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=LOSS_ATOL), (step, got, expected)


def test_two_nodes_train_like_one_process(setup, reference):
    root, recipe = setup
    out, logs = root / "two-nodes", root / "logs"
    statuses = wait_all(start_nodes(recipe, out, logs, "two-nodes"))
    assert statuses == [0, 0], tail(logs / "two-nodes-node0.log") + tail(logs / "two-nodes-node1.log")
    assert_losses_match(out, reference)
    assert (out / "model.safetensors").is_file() and (out / "training_summary.json").is_file()


def test_kill_9_of_node_1_stops_node_0_and_a_relaunch_resumes(setup, reference):
    root, recipe = setup
    out, logs = root / "two-nodes-killed", root / "logs"
    nodes = start_nodes(recipe, out, logs, "killed")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / f"checkpoint-{SAVE_EVERY}").is_dir() and nodes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_node(nodes[1])  # node 1's launcher and rank, as when the node dies
    killed = time.monotonic()
    try:
        status = nodes[0].wait(timeout=STOP_BOUND_S)
    finally:
        kill_node(nodes[0])
    stopped = time.monotonic() - killed
    print(f"node 0 stopped {stopped:.1f} s after node 1 was killed")
    assert status != 0 and stopped < STOP_BOUND_S, tail(logs / "killed-node0.log")
    assert (out / f"checkpoint-{SAVE_EVERY}").is_dir(), "the run never reached its first checkpoint"
    assert not (out / f"checkpoint-{STEPS}").exists(), "the run finished before node 1 was killed"
    checkpoint = int(mark_resume_point(out).name.rsplit("-", 1)[1])
    logged = (logs / "killed-node0.log").read_text(errors="replace").count("{'loss': ")
    print(f"steps lost: {logged - checkpoint} (node 0 logged step {logged}, the relaunch resumes at {checkpoint})")

    statuses = wait_all(start_nodes(recipe, out, logs, "relaunched"))
    assert statuses == [0, 0], tail(logs / "relaunched-node0.log") + tail(logs / "relaunched-node1.log")
    assert resumed(out), "the relaunch started over"
    assert_losses_match(out, reference)


def test_a_frozen_node_1_stops_node_0_after_ddp_timeout(setup):
    """A node that vanishes without closing its connections (power, network): SIGSTOP stands in for it. Node 0 waits
    in its next collective until the process group's timeout (the recipe's ddp_timeout, 1800 s by default; 20 s
    here), then stops."""
    root, recipe = setup
    out, logs = root / "two-nodes-frozen", root / "logs"
    nodes = start_nodes(recipe, out, logs, "frozen", "--ddp_timeout", str(FROZEN_TIMEOUT_S))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / f"checkpoint-{SAVE_EVERY}").is_dir() and nodes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_node(nodes[1], signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        status = nodes[0].wait(timeout=FROZEN_TIMEOUT_S + STOP_BOUND_S)
    finally:
        kill_node(nodes[0])
        kill_node(nodes[1])
    stopped = time.monotonic() - frozen
    print(f"node 0 stopped {stopped:.1f} s after node 1 froze (ddp_timeout {FROZEN_TIMEOUT_S} s)")
    log = (logs / "frozen-node0.log").read_text(errors="replace")
    assert status != 0 and FROZEN_TIMEOUT_S * 0.5 <= stopped < FROZEN_TIMEOUT_S + STOP_BOUND_S, tail(logs /
                                                                                                   "frozen-node0.log")
    assert f"(ddp_timeout={FROZEN_TIMEOUT_S} s): a peer rank or node is probably gone" in log, log[-3000:]
    assert not (out / f"checkpoint-{STEPS}").exists(), "the run finished before node 1 froze"


WATCHED = """
import sys, time
sys.path.insert(0, {root!r})
from audiollm.watchdog import StallWatchdog
dog = StallWatchdog(0.5, check_every=0.05)
for _ in range(int(sys.argv[1])):  # beats every 0.1 s for this many beats, then none
    dog.beat()
    time.sleep(0.1)
time.sleep(3)
"""


@pytest.mark.parametrize("beats", [20, 1])
def test_the_watchdog_ends_a_process_only_without_progress(beats):
    """Beats 0.1 s apart keep a 0.5 s watchdog quiet for 2 s; then silence ends the process with STALLED_EXIT
    within the timeout, long before the 3 s sleep is over."""
    import subprocess
    import sys

    from audiollm.watchdog import STALLED_EXIT

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WATCHED.format(root=str(REPO_ROOT)), str(beats)],
                          capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == STALLED_EXIT and "no training progress for" in proc.stderr
    assert (beats - 1) * 0.1 + 0.5 <= took < beats * 0.1 + 2.5, took  # the last beat, then the timeout


def test_a_stopped_watchdog_watches_again_from_its_next_beat():
    """Training stops it when ``train`` returns; the final save's beat must start it again, and stop it after."""
    from audiollm.watchdog import StallWatchdog

    dog = StallWatchdog(60, check_every=0.01)
    dog.beat()
    first = dog.thread
    dog.stop()
    first.join(timeout=5)
    assert not first.is_alive() and dog.thread is None
    dog.beat()
    assert dog.thread is not first and dog.thread.is_alive()
    dog.stop()


def test_sigusr1_to_both_nodes_saves_one_checkpoint_and_stops_both(setup):
    """SLURM's early warning as slurm.sbatch delivers it (scancel --signal=USR1 reaches every node's processes):
    both torchruns forward it, both ranks finish the same step, save it and exit; no step is lost."""
    from tests.test_preemption import DRIVER

    root, recipe = setup
    out, logs, driver = root / "two-nodes-signalled", root / "logs", root / "driver.py"
    driver.write_text(DRIVER)
    nodes = start_nodes(recipe, out, logs, "signalled", script=str(driver),
                        env=dict(run_env(), STEP_SLEEP="0.3", SIGNAL_RANK="none"))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / f"checkpoint-{SAVE_EVERY}").is_dir() and nodes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for node in nodes:
        node.send_signal(signal.SIGUSR1)
    sent = time.monotonic()
    try:
        for node in nodes:
            node.wait(timeout=STOP_BOUND_S)
    finally:
        for node in nodes:
            kill_node(node)
    print(f"both nodes stopped {time.monotonic() - sent:.1f} s after SIGUSR1")
    stops = [m for node in (0, 1) for m in stop_messages((logs / f"signalled-node{node}.log").read_text())]
    assert len(stops) == 2 and stops[0] == stops[1], tail(logs / "signalled-node0.log")
    step = newest(out)
    logged = (logs / "signalled-node0.log").read_text(errors="replace").count("{'loss': ")
    assert f"after step {step} of {STEPS}" in stops[0] and step == logged < STEPS  # nothing trained after it
    print(f"steps lost: {logged - step}")
