"""Run the stages in order with their hooks, breaks, console lines and rescue.

A failed stage prints stage, cause and hint, then ``seed.rescue`` decides: ``shell`` opens
a shell on the console and retries the stage when it exits (fix it by hand, then ``exit``);
``reboot`` waits a few seconds (so the message can be read) and reboots.
``rd.seed.break=STAGE`` opens a shell before STAGE; leaving it goes on with the boot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from seedboot.agent import hooks
from seedboot.agent.errors import SeedError
from seedboot.agent.procfs import machine_cpu
from seedboot.agent.stages import STAGE_NAMES, Context

log = logging.getLogger(__name__)

REBOOT_DELAY = 5.0
MAX_RETRIES = 3


class RescueExit(SystemExit):
    """Raised off PID 1 (tests, a manual run) where the agent must not reboot the machine."""


def hook_dirs(ctx: Context) -> list[Path]:
    dirs = [ctx.paths.hooks]
    if ctx.cache_kind == "disk":
        dirs.append(ctx.paths.cache / "hooks")
    return dirs


def run_hooks(ctx: Context, point: str, stage: str) -> None:
    hooks.run_point(point, hook_dirs(ctx), ctx.hook_env(stage))


def shell(ctx: Context, why: str) -> None:
    """An interactive busybox shell on the console; returns when the user leaves it."""
    ctx.console.note(f"{why}: starting a shell (type 'exit' to continue)")
    env = {"PATH": hooks.PATH, "PS1": "seedboot# ", "HOME": "/", "TERM": "linux", **ctx.hook_env("rescue")}
    sh = ctx.paths.shell
    cttyhack = os.path.join(os.path.dirname(sh), "cttyhack")
    argv = [cttyhack, sh] if os.path.exists(cttyhack) else [sh]
    try:
        # A session of its own, so cttyhack can make the console its controlling tty (job
        # control, Ctrl-C reaches the shell's jobs and never PID 1).
        subprocess.run(argv, env=env, check=False, start_new_session=True)
    except OSError as e:
        ctx.console.note(f"cannot start {sh}: {e.strerror}")
        time.sleep(10)


def rescue(ctx: Context, stage: str) -> None:
    """After a failure: a shell (then the caller retries) or a reboot (never returns)."""
    if ctx.cmdline.rescue == "shell" and os.path.exists(ctx.paths.shell):
        shell(ctx, f"boot stopped in stage {stage}")
        return
    if os.getpid() != 1:
        raise RescueExit(1)
    ctx.console.note(f"rebooting in {REBOOT_DELAY:.0f}s (seed.rescue=reboot)")
    time.sleep(REBOOT_DELAY)
    from seedboot.agent.stages import syscalls

    syscalls.reboot()


def run_stage(ctx: Context, name: str) -> None:
    start = time.monotonic()
    mod = importlib.import_module(f"seedboot.agent.stages.{name}")
    detail: str = mod.run(ctx)
    took = time.monotonic() - start
    ctx.timings[name] = took
    ctx.console.stage(name, "ok", took, detail)


def run_all(ctx: Context, stages: Sequence[str] = STAGE_NAMES) -> None:
    for name in stages:
        if ctx.cmdline.break_before == name:
            shell(ctx, f"rd.seed.break={name}")
        for attempt in range(MAX_RETRIES + 1):
            start = time.monotonic()
            try:
                run_hooks(ctx, f"pre-{name}", name)
                run_stage(ctx, name)
                if name != "switch":
                    run_hooks(ctx, f"post-{name}", name)
                break
            except SeedError as e:
                ctx.console.failure(name, time.monotonic() - start, e.message, e.hint)
            except Exception as e:
                log.exception("stage %s crashed", name)
                ctx.console.failure(
                    name,
                    time.monotonic() - start,
                    f"internal error: {type(e).__name__}: {e}",
                    "a seedboot bug",
                )
            if attempt == MAX_RETRIES:
                ctx.console.note(f"stage {name} failed {MAX_RETRIES + 1} times; giving up")
                ctx.cmdline = dataclasses.replace(ctx.cmdline, rescue="reboot")
            rescue(ctx, name)
            ctx.console.note(f"retrying stage {name}")


def init_exec_time(kmsg: str = "/dev/kmsg") -> float | None:
    """When the kernel exec'd /init, in seconds since boot, from its "Run /init as init process"
    message. (PID 1's start time in /proc is useless: the kernel creates PID 1 long before.)"""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        for _ in range(5000):
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                return None
            except OSError:
                continue  # EPIPE: a record was overwritten; go on with the next
            # "PRIO,SEQ,USEC,FLAGS;MESSAGE"
            head, _, msg = rec.decode("utf-8", "replace").partition(";")
            if msg.startswith("Run /") and msg.rstrip().endswith("as init process"):
                return int(head.split(",")[2]) / 1e6
    finally:
        os.close(fd)
    return None


def init(args: Sequence[str]) -> int:
    """PID 1's work: the stages, then (from the switch stage) exec of the new root's init."""
    from seedboot.agent.cmdline import Cmdline
    from seedboot.agent.console import Console, uptime
    from seedboot.agent.main import version

    if os.getpid() != 1 and "--force" not in args:
        print(
            "seedboot-agent init: runs as PID 1 in the miniroot (it mounts, and switches root)",
            file=sys.stderr,
        )
        print("  hint: --force to run it anyway (only in a throw-away machine)", file=sys.stderr)
        return 2
    console = Console(sys.stdout)
    at = uptime()
    handoff = init_exec_time()
    ctx = Context(Cmdline(), console)
    ctx.timings["first-line"] = at
    ctx.timings["handoff"] = handoff if handoff is not None else 0.0
    with contextlib.suppress(OSError):
        # where the CPU goes from here to the switch (the timing line splits it)
        ctx.timings["cpu:busy"], ctx.timings["cpu:idle"] = machine_cpu()
        ctx.timings["cpu:agent"] = time.process_time()
    console.note(
        f"agent {version()} up at {at:.2f}s (kernel ran /init at {handoff:.2f}s)"
        if handoff is not None
        else f"agent {version()} up at {at:.2f}s"
    )
    try:
        run_all(ctx)
    except RescueExit as e:
        return int(e.code or 1)
    except Exception as e:  # PID 1 must not exit: the kernel would panic
        log.exception("the agent crashed")
        console.note(f"internal error: {type(e).__name__}: {e}")
    # Only reached when the switch did not happen. As PID 1, never return (a panic says less).
    while os.getpid() == 1:
        if ctx.cmdline.rescue == "shell" and os.path.exists(ctx.paths.shell):
            shell(ctx, "the boot did not switch root")
        else:
            ctx.cmdline = dataclasses.replace(ctx.cmdline, rescue="reboot")
            rescue(ctx, "init")
    console.note("boot finished without switching root")
    return 1
