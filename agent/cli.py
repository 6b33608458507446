"""``agentctl``: a thin click CLI. Commands parse arguments and call functions; no logic here."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from agent import __version__
from agent.errors import NvmlUnavailable, RooftopError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

# --timeline without --window: one verdict per second shows how the regime moved.
TIMELINE_DEFAULT_WINDOW_S = 1.0


def friendly_errors(fn: F) -> F:
    """Turn a ``RooftopError`` into one line on stderr and exit 1: no tracebacks for users."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NvmlUnavailable as exc:
            click.echo(f"agentctl: {exc}", err=True)
            click.echo("agentctl: no GPU needed for: --replay FILE (a recording) or --fake h100",
                       err=True)
            sys.exit(1)
        except RooftopError as exc:
            click.echo(f"agentctl: error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class _Progress:
    """A one-line progress indicator on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, done: float) -> None:
        if self.enabled:
            bar = "#" * int(done * 20)
            sys.stderr.write(f"\r{self.label} [{bar:<20}] {done:4.0%}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 30) + "\r")
            sys.stderr.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentctl")
def main() -> None:
    """Rooftop: is each GPU memory-, compute- or host-bound, and what to do about it."""


# --- diagnose / record (node agent) ---------------------------------------------------

_fake_option = click.option(
    "--fake",
    metavar="PROFILE[:WORKLOAD,...]",
    help="Use the shipped fake NVML (h100 or a100) instead of a GPU, e.g. h100:gemv,gemm.",
)
_gpus_option = click.option("--gpus", default=1, show_default=True, type=click.IntRange(1, 64),
                            help="Number of fake GPUs (with --fake).")


@main.command()
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.2),
              help="How long to sample live GPUs.")
@click.option("--rate", "rate_hz", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1, max=10.0), help="Samples per second (GPM needs ≤ 10).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, nothing else.")
@click.option("--replay", type=click.Path(path_type=Path, dir_okay=False),
              help="Diagnose a recording (trace format v1) instead of live GPUs.")
@click.option("--window", "window_s", type=click.FloatRange(min=0.1),
              help="Window length in seconds (default: the whole run is one window).")
@click.option("--timeline", is_flag=True, help="Print the verdict of every window.")
@_fake_option
@_gpus_option
@friendly_errors
def diagnose(
    seconds: float,
    rate_hz: float,
    as_json: bool,
    replay: Path | None,
    window_s: float | None,
    timeline: bool,
    fake: str | None,
    gpus: int,
) -> None:
    """Say what bounds each GPU on this host: memory, compute or the host."""
    from agent import diagnose as dx  # noqa: PLC0415 — keeps `agentctl --help` fast
    from agent.render import format_table, format_timeline, verdict_json  # noqa: PLC0415
    from agent.trace import read_trace  # noqa: PLC0415

    skipped: dict[str, int] = {}
    if replay is not None:
        trace = read_trace(replay)
        records = list(trace.records)
        skipped = dict(trace.skipped_reasons)
        source = f"replay of {replay}"
    else:
        spec = dx.FakeSpec.parse(fake) if fake else None
        backend = dx.open_backend(spec, gpus)
        try:
            progress = _Progress(f"sampling {len(backend.devices())} GPU(s)", not as_json)
            records = dx.sample(backend, dx.open_host_sensor(), seconds, rate_hz, progress)
            progress.close()
        finally:
            backend.close()
        source = f"fake {fake} (no GPU)" if spec else "live NVML"
        source += f", {seconds:g} s at {rate_hz:g} Hz"
    if timeline and window_s is None:
        window_s = TIMELINE_DEFAULT_WINDOW_S
    per_window = dx.diagnose_records(records, window_s)
    latest = dx.overall(per_window)
    if as_json:
        out: dict[str, Any] = {
            "source": source,
            "skipped_records": sum(skipped.values()),
            "skipped_reasons": skipped,
            "gpus": [verdict_json(v) for v in latest],
        }
        if timeline:
            out["timeline"] = {str(i): [verdict_json(v) for v in vs]
                               for i, vs in per_window.items()}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(format_table(latest, source=source, skipped=skipped))
    if window_s is not None and not timeline:
        n = max(len(vs) for vs in per_window.values())
        click.echo(f"  (latest of {n} windows of {window_s:g} s; --timeline shows each)")
    if timeline:
        click.echo(format_timeline(per_window))


@main.command()
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option("--rate", "rate_hz", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1, max=10.0))
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Trace file to write (trace format v1, JSON Lines); '-' for stdout.")
@_fake_option
@_gpus_option
@friendly_errors
def record(
    seconds: float, rate_hz: float, out_path: Path, fake: str | None, gpus: int
) -> None:
    """Record live sensor samples to a trace file (replay it with diagnose --replay)."""
    from agent import diagnose as dx  # noqa: PLC0415
    from agent.trace import TraceWriter  # noqa: PLC0415

    spec = dx.FakeSpec.parse(fake) if fake else None
    backend = dx.open_backend(spec, gpus)
    to_stdout = str(out_path) == "-"
    stream = sys.stdout if to_stdout else out_path.open("w", encoding="utf-8")
    writer = TraceWriter(stream)
    progress = _Progress(f"recording to {out_path}", not to_stdout)
    try:
        # Records are written as they come, so an interrupted recording keeps what it had.
        dx.sample(backend, dx.open_host_sensor(), seconds, rate_hz, progress, writer.write)
    finally:
        progress.close()
        backend.close()
        if not to_stdout:
            stream.close()
    if not to_stdout:
        click.echo(f"wrote {writer.written} records to {out_path}", err=True)

# --- roofline -------------------------------------------------------------------------

# --- probe (engines) ------------------------------------------------------------------

# --- agent / collector (fleet) --------------------------------------------------------
