"""`llmapi bench --profile`: the timed run's kernels under torch.profiler (KernelProfile), and with --grid each
row's steps in sampled windows (SampledProfile)."""

from __future__ import annotations

import threading
from typing import Optional


class KernelProfile:
    """--profile: the timed run under torch.profiler, device kernels only (CUDA; on the CPU, torch's CPU ops), for
    where the time goes: each kernel's summed time and calls, and their total against the run's wall time."""

    def __init__(self, device):
        from torch.profiler import ProfilerActivity, profile

        self.cuda = device.type == "cuda"
        extra = {}
        if not self.cuda:  # the steps run on the executor's thread: CPU ops are recorded per thread
            from torch._C._profiler import _ExperimentalConfig

            try:
                extra["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
            except TypeError:  # an older torch: the calling thread's ops only
                pass
        self._prof = profile(activities=[ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU], **extra)

    def __enter__(self):
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        return self._prof.__exit__(*exc)

    def summary(self, top: Optional[int] = 15) -> dict:
        """{"kernel_ms": summed self time of every kernel, "top": [{"name", "calls", "ms"}] by time (all of them
        with top=None)}."""
        rows = []
        for event in self._prof.key_averages():
            if self.cuda:
                us = getattr(event, "self_device_time_total", None)
                us = event.self_cuda_time_total if us is None else us
            else:
                us = event.self_cpu_time_total
            if us > 0:
                rows.append({"name": event.key, "calls": int(event.count), "ms": us / 1e3})
        rows.sort(key=lambda r: -r["ms"])
        return {"kernel_ms": sum(r["ms"] for r in rows), "top": rows[:top]}

    def span_ms(self) -> float:
        """From the first recorded kernel's start to the last one's end, in ms (on the CPU, of its ops); 0.0 when
        none ran: the kernels' sum against it says how busy the device was while they ran."""
        from torch.autograd import DeviceType

        kind = DeviceType.CUDA if self.cuda else DeviceType.CPU
        ranges = [e.time_range for e in self._prof.events() if e.device_type == kind]
        return (max(r.end for r in ranges) - min(r.start for r in ranges)) / 1e3 if ranges else 0.0


def format_profile(profile: dict, wall_s: float) -> str:
    what = "device kernels" if profile.get("device", True) else "CPU ops"
    lines = [f"profile: {what} {profile['kernel_ms']:.1f} ms over a {1e3 * wall_s:.1f} ms run "
             f"({100 * profile['kernel_ms'] / (1e3 * wall_s):.0f}% busy if nothing overlaps)"]
    for row in profile["top"]:
        lines.append(f"  {row['ms']:9.2f} ms {row['calls']:7d} calls  {row['name'][:100]}")
    return "\n".join(lines)


class SampledProfile:
    """--profile with --grid: the row's kernels in windows of `steps` executor steps, one window starting every
    `every` steps from the row's first (a systematic sample of all its steps: prompts, mixed and decode steps in
    the row's own proportions), each under torch.profiler (KernelProfile); the windows' kernels summed by name,
    and their span on the device (each window's first kernel's start to its last one's end) for how busy the
    device was while they ran.

    A thread reads get_stats()'s num_steps (published after every executor step) every `interval_s` and starts or
    stops the profiler as the count crosses a window's edges: a window covers at least its steps, more when the
    steps are shorter than the interval (the steps it covered are counted). Only a window's own steps pay the
    profiler's cost; the parsing of its events runs on this thread while the engine goes on."""

    def __init__(self, llm, steps: int, every: int, interval_s: float = 0.001):
        self.llm, self.steps, self.every, self.interval_s = llm, steps, every, interval_s
        self.windows = self.covered = 0
        self.span_ms = 0.0
        self.kernels: dict = {}  # name -> [calls, ms]
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmapi-bench-profile", daemon=True)

    def _count(self) -> int:
        return int(self.llm.get_stats()["num_steps"])

    def _add(self, profile, first: int, last: int) -> None:
        for k in profile.summary(top=None)["top"]:
            entry = self.kernels.setdefault(k["name"], [0, 0.0])
            entry[0] += k["calls"]
            entry[1] += k["ms"]
        self.span_ms += profile.span_ms()
        self.windows += 1
        self.covered += last - first

    def _run(self) -> None:
        from .errors import LLMAPIError

        profile, first = None, 0
        try:
            base = self._count()
            while not self._stop.wait(self.interval_s):
                step = self._count() - base
                if profile is None and step % self.every < self.steps:
                    profile, first = KernelProfile(self.llm.device).__enter__(), step
                elif profile is not None and step - first >= self.steps:
                    profile.__exit__(None, None, None)
                    self._add(profile, first, step)
                    profile = None
            if profile is not None:  # the row ended inside a window: counted if any of its steps ran
                profile.__exit__(None, None, None)
                last = self._count() - base
                if last > first:
                    self._add(profile, first, last)
        except LLMAPIError:  # the LLM died: the run itself reports why
            pass
        except Exception as e:  # noqa: BLE001 - reported with the row, not lost on a daemon thread
            self.error = e

    def __enter__(self) -> "SampledProfile":
        with KernelProfile(self.llm.device):  # the profiler's first start, on this thread: later ones run on ours
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, top: int = 15) -> dict:
        """{"steps", "every", "windows", "steps_profiled", "kernel_ms", "span_ms", "top": [{"name", "calls",
        "ms"}] by time}; RuntimeError when the profiler failed."""
        if self.error is not None:
            raise RuntimeError(f"--profile failed during the row: {self.error!r}") from self.error
        rows = sorted(({"name": n, "calls": c, "ms": ms} for n, (c, ms) in self.kernels.items()),
                      key=lambda r: -r["ms"])
        return {"steps": self.steps, "every": self.every, "windows": self.windows, "steps_profiled": self.covered,
                "kernel_ms": sum(r["ms"] for r in rows), "span_ms": self.span_ms, "top": rows[:top]}


def format_row_profile(p: dict, device: bool) -> str:
    """A row's SampledProfile summary: the windows, the kernels' sum against their span, the top kernels."""
    what = "device kernels" if device else "CPU ops"
    busy = f" ({100 * p['kernel_ms'] / p['span_ms']:.0f}% busy)" if p["span_ms"] > 0 else ""
    lines = [f"    profile: {p['steps']} of every {p['every']} steps ({p['steps_profiled']:,} steps in "
             f"{p['windows']} windows): {what} {p['kernel_ms']:,.1f} ms over their span of {p['span_ms']:,.1f} ms"
             f"{busy}"]
    for k in p["top"]:
        share = 100 * k["ms"] / p["kernel_ms"] if p["kernel_ms"] > 0 else 0.0
        lines.append(f"    {k['ms']:11,.2f} ms {share:5.1f}% {k['calls']:9,d} calls  {k['name'][:90]}")
    return "\n".join(lines)
