"""A stream shared between threads, and processes forked while gru_fast's locks are held.

The README promises that a stream may be shared: ``step``, ``reset`` and ``state`` take the stream's lock,
so every output is a whole step from a state that some sequence of whole steps and resets produced, and
every ``state`` read is such a state.  A process forked while another thread holds one of gru_fast's locks
(a step, a bound call) gets a free lock in the child, not one held by a thread that does not exist there.

Authority: PyTorch's ``nn.GRU`` run one step from the candidate previous states (the stream's h0 after a
reset, or the previous output); for fork, the child's exit status within a timeout.
"""

from __future__ import annotations

import textwrap
import threading

import numpy as np

from conftest import TOLERANCE, convert_torch, last_json_line, run_python, run_torch, torch_gru


def test_stepping_and_resetting_threads_produce_only_whole_steps():
    """One thread steps a shared stream 1,000 times while another resets it and reads its state.  Every
    output must equal PyTorch's step from h0 (a reset came first) or from the previous output, and every
    state read must be h0 or one of the outputs, bit for bit (single layer: the state is the output).
    Without the lock in reset and state, up to 2% of the outputs and 0.1% of the reads were neither."""
    H, B, steps = 128, 16, 1000  # a step long enough (a parallel kernel) for a reset to land inside it
    module = torch_gru(8, H, seed=3)
    model = convert_torch(module)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 8)).astype(np.float32)
    h0 = rng.uniform(-1, 1, (1, B, H)).astype(np.float32)
    stream = model.stream(batch_size=B, h0=h0)
    outputs, states = [], []
    done = threading.Event()

    def step():
        try:
            for _ in range(steps):
                outputs.append(stream.step(x))
        finally:
            done.set()

    def reset():
        while not done.is_set():
            stream.reset()
            states.append(hash(stream.state[0].tobytes()))  # a hash: there are 100,000s of reads

    threads = [threading.Thread(target=step), threading.Thread(target=reset)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outputs) == steps and len(states) > 10, (len(outputs), len(states))

    from_h0 = run_torch(module, x[None], h0)[0][0]
    tol = TOLERANCE[np.dtype(np.float32)]
    previous = h0[0]
    impossible = []
    for index, y in enumerate(outputs):
        if np.max(np.abs(y - from_h0)) > tol:
            from_previous = run_torch(module, x[None], previous[None])[0][0]
            if np.max(np.abs(y - from_previous)) > tol:
                impossible.append(index)
        previous = y
    assert not impossible, f"{len(impossible)} of {steps} outputs are no whole step (first: {impossible[:5]})"
    produced = {hash(h0[0].tobytes())} | {hash(y.tobytes()) for y in outputs}
    torn = [i for i, state in enumerate(states) if state not in produced]
    assert not torn, f"{len(torn)} of {len(states)} state reads are no state the stream was in"


FORK_CHILD = textwrap.dedent(
    """
    import json, os, signal, threading, time
    import numpy as np
    import gru_fast

    rng = np.random.default_rng(0)
    I, H = 64, 256  # a step of one row stays serial (below the parallel threshold) and takes ~10-20 us
    model = gru_fast.GRU([(rng.uniform(-0.1, 0.1, (1, 3 * H, I)).astype(np.float32),
                           rng.uniform(-0.1, 0.1, (1, 3 * H, H)).astype(np.float32), None)])
    stream = model.stream(batch_size=1)
    x_t = np.ones(I, np.float32)
    x = np.ones((4, 1, I), np.float32)
    bound = model.bind(x)
    stream.step(x_t), bound(), model(x)  # kernels loaded first: a fork during Numba's own compile or cache
    stream.reset()                       # load would inherit Numba's compiler lock, not one of gru_fast's
    stop = threading.Event()

    def step():
        while not stop.is_set():
            stream.step(x_t)

    def call():
        while not stop.is_set():
            bound()

    workers = [threading.Thread(target=step), threading.Thread(target=call)]
    for w in workers:
        w.start()
    statuses = []
    for attempt in range(12):
        time.sleep(0.01)
        pid = os.fork()
        if pid == 0:  # the child: every lock the other threads may have held at fork must be free
            stream.step(x_t)
            stream.reset()
            stream.state
            bound()
            model(x)
            os._exit(0)
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                statuses.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                statuses.append("hung")
                break
            time.sleep(0.01)
        if statuses[-1] == "hung":
            break  # one is enough to fail, and each costs the full timeout
    stop.set()
    for w in workers:
        w.join()
    print(json.dumps({"statuses": statuses}))
    """
)


def test_child_forked_while_other_threads_step_and_call_finishes():
    """Twelve forks while one thread steps a shared stream and another runs a bound call: each child's
    first step, reset, state read, bound call and plain call finish (exit 0 within 20 s)."""
    report = last_json_line(run_python(FORK_CHILD, timeout=400))
    assert report["statuses"] == [0] * 12, report  # "hung" before the fix: the first child blocked forever
