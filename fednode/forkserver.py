"""The node fork server: one process per launcher that imports Python, numpy, gRPC,
torch and the node's code once, then starts each node process by ``fork()`` from that
warm image.

A node started this way is still its own OS process (its own PID, session, heartbeats
and gRPC channel; SIGKILL, restarts and the training-slot locks work as before): only
its start-up differs. It skips the ~2 CPU-seconds of importing torch that a fresh
``python -m fednode`` pays, and it shares the pages of those modules with every
other node until it writes to them (copy-on-write), so idle nodes cost little memory.

Rules kept so that a fork is safe:
- the server creates no gRPC channel or server and starts no thread; its only torch
  work is one training step on one thread (no thread pool exists to be lost in the
  child), to fill torch's lazily built state once for all nodes;
- the server imports with the garbage collector off and then freezes every object
  (``gc.freeze``), so the children's collections never touch (and copy) those pages;
  it may also load the run's dataset (``BYZFED_FORK_WARM``), shared the same way;
- a child closes the server's socket, takes its node's name as its process name
  (``ps -o comm``; its command line stays the server's), resets the signal handlers, reseeds Python's,
  numpy's and torch's default generators (a forked child would otherwise share its
  siblings' streams; every seeded draw of a run comes from ``proto.seeding`` anyway),
  takes the environment, working folder and log file it was sent, and asks the kernel
  to SIGKILL it if the server dies (``PR_SET_PDEATHSIG``), as its own launcher would.

The protocol, one JSON object a line over a socket pair with the launcher
(``orchestrator/launch.py: ForkServer``): the server says ``{"ready": pid}``; a request
``{"id", "argv", "env", "log", "cwd"}`` (``argv``: the arguments of
``python -m fednode``) is answered ``{"id", "pid"}`` (or ``{"id", "error"}``); when a
child ends the server reaps it and says ``{"exit": pid, "code": c}`` (``c`` negative:
killed by that signal, as ``subprocess`` reports it).
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import traceback
from typing import Callable, Optional

WARM = ("numpy", "grpc", "torch", "torch.nn.functional", "google.protobuf", "proto.codec", "proto.layout",
        "proto.seeding", "proto.tls", "fednode.__main__", "fednode.node", "fednode.client", "fednode.byzantine",
        "fednode.churn", "fednode.training", "fednode.workload.models", "fednode.workload.datasets",
        "fednode.workload.partition", "fednode.strategies", "attacks")


def _warm() -> list[str]:
    """Import what every node imports; returns the modules that could not be imported
    (a node that needs one imports it itself, as it would without the server)."""
    import importlib

    missing = []
    for name in WARM:
        try:
            importlib.import_module(name)
        except Exception:  # (an optional part: the node pays for it as before)
            missing.append(name)
    return missing


def _preload(spec: str) -> None:
    """Load the run's dataset once and take one training step of its model on two zero
    samples (``BYZFED_FORK_WARM``: the run's dataset arguments and model, JSON). The
    nodes then share the dataset's pages instead of each holding a copy, and the memory
    torch fills at its first forward and backward pass (~100 MB: kernels chosen, tables
    built) is written once here, not once per node. One torch thread, so no OpenMP
    team exists to be lost in a child. A failure here only means the nodes do it
    themselves."""
    if not spec:
        return
    try:
        w = json.loads(spec)
        import torch

        from fednode.workload import build_model, load_dataset
        ds = load_dataset(w["dataset"], w.get("data_dir") or None, test_fraction=w["test_fraction"], seed=w["seed"])
        if w.get("model"):
            torch.set_num_threads(1)
            model = build_model(w["model"], ds.input_shape, ds.num_classes)
            opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.5)
            x = torch.zeros(2, *ds.input_shape)
            loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            del model, opt, x, loss
    except Exception:
        traceback.print_exc()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def death_signal() -> Optional[Callable[[], None]]:
    """A function that asks Linux to SIGKILL the calling process when the thread that
    started it ends (``PR_SET_PDEATHSIG``; kept across ``exec``), or None where that is not
    available. The launcher passes it as a ``preexec_fn``; a forked node calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _name_me(argv: list[str]) -> None:
    """Show the node's name as the process's name (``ps -o comm``, ``top``; 15 bytes), since
    its command line is the server's."""
    if "--name" not in argv or not sys.platform.startswith("linux"):
        return
    import ctypes

    name = argv[argv.index("--name") + 1].encode()[:15] if argv.index("--name") + 1 < len(argv) else b""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _child(sock: socket.socket, server_pid: int, req: dict, die: Optional[Callable[[], None]]) -> None:
    """In the forked child: become the node process ``req`` asks for; never returns."""
    code = 1
    try:
        sock.close()
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        import gc
        gc.enable()
        if die is not None:
            die()
        if os.getppid() != server_pid:  # (the server died between the fork and the prctl)
            os._exit(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if req.get("log"):
            out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        else:
            out = os.open(os.devnull, os.O_WRONLY)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.environ.clear()
        os.environ.update(req.get("env") or {})
        os.environ["BYZFED_FORKED"] = "1"  # (fednode/__main__.py: a light node sheds in place)
        if req.get("cwd"):
            os.chdir(req["cwd"])
        import random

        import numpy as np
        import torch
        random.seed()
        np.random.seed()
        torch.seed()
        argv = list(req["argv"])
        _name_me(argv)
        sys.argv = ["fednode", *argv]
        from fednode.__main__ import main
        try:
            code = main(argv) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(fd: int) -> int:
    """The server's loop on the socket ``fd`` (its end of the launcher's socket pair)."""
    import gc

    sock = socket.socket(fileno=fd)
    gc.disable()  # no collection in the server: the objects stay where they are until frozen
    _warm()
    _preload(os.environ.get("BYZFED_FORK_WARM", ""))
    # Every object so far into the permanent generation: a child's collections never
    # visit (and so never write to, and copy) the pages that hold them.
    gc.freeze()
    pid = os.getpid()
    die = death_signal()  # (resolved once, before any fork)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    buf = b""

    def say(msg: dict) -> None:
        sock.sendall(json.dumps(msg).encode() + b"\n")

    say({"ready": pid})
    try:
        while True:
            for _ in sel.select(timeout=0.05):
                data = sock.recv(1 << 16)
                if not data:  # the launcher is gone: so are we (the children follow, PDEATHSIG)
                    return 0
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line)
                    try:
                        child = os.fork()
                    except OSError as e:
                        say({"id": req.get("id"), "error": str(e)})
                        continue
                    if child == 0:
                        _child(sock, pid, req, die)
                    say({"id": req.get("id"), "pid": child})
            while True:  # reap every child that ended, and say so
                try:
                    done, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if done == 0:
                    break
                say({"exit": done, "code": os.waitstatus_to_exitcode(status)})
    except (BrokenPipeError, ConnectionResetError):
        return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
