"""``agentctl``: a thin click CLI. Commands parse arguments and call functions; no logic here."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from rooftop import __version__
from rooftop.common.errors import ConfigError, NvmlUnavailable, RooftopError

if TYPE_CHECKING:
    from rooftop.agent.daemon import BatchSink
    from rooftop.common.otlp import OtlpExport

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

# --timeline without --window: one verdict per second shows how the regime moved.
TIMELINE_DEFAULT_WINDOW_S = 1.0


# Exit statuses, as click's own: a usage error (bad option, bad value) is 2, raised as
# click.UsageError / BadParameter (option values are checked while parsing, see
# _checked_by); a failure while running (no GPU, unreachable collector, bad file) is 1.
EXIT_FAILURE = 1

# What each command that can need a GPU accepts instead of one: only its own options.
NO_GPU_HINTS: dict[str, str] = {
    "diagnose": "--replay FILE (a recording) or --fake h100",
    "record": "--fake h100",
    "agent": '--fake h100, or backend = "replay:FILE" in the config',
}


def friendly_errors(fn: F) -> F:
    """Turn a runtime failure into one line on stderr and exit 1: no tracebacks for users.

    A ``RooftopError`` or an ``OSError`` (a file, a socket) is a runtime failure; click's
    usage errors never reach here (click exits 2 for them).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NvmlUnavailable as exc:
            # One line: the reason, then only the options this command accepts.
            ctx = click.get_current_context(silent=True)
            hint = NO_GPU_HINTS.get(ctx.info_name or "", "") if ctx is not None else ""
            also = f"; without a GPU: {hint}" if hint else ""
            click.echo(f"agentctl: error: {exc.reason}{also}", err=True)
            sys.exit(EXIT_FAILURE)
        except RooftopError as exc:
            click.echo(f"agentctl: error: {exc}", err=True)
            sys.exit(EXIT_FAILURE)
        except OSError as exc:
            click.echo(f"agentctl: error: {exc}", err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


_Callback = Callable[[click.Context, click.Parameter, Any], Any]


def _checked_by(check: Callable[[str], object]) -> _Callback:
    """A click callback: ``check`` each value given, keep the values as they are.

    A ``RooftopError`` from ``check`` becomes a usage error (exit 2) naming the option.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        for item in value if isinstance(value, tuple) else (value,):
            if item is None:
                continue
            try:
                check(item)
            except RooftopError as exc:
                message = str(exc)
                for opt in param.opts:  # the option is named once, by click
                    message = message.removeprefix(opt).lstrip(": ") or message
                raise click.BadParameter(message, ctx=ctx, param=param) from None
        return value

    return callback


def _check_fake(text: str) -> None:
    from rooftop.agent.diagnose import FakeSpec  # noqa: PLC0415 — keeps `agentctl --help` fast

    FakeSpec.parse(text).check()


def _check_engine_url(text: str) -> None:
    from rooftop.agent.engines.sources import EngineEndpoint  # noqa: PLC0415

    EngineEndpoint.parse(text)


def _check_model(name: str) -> None:
    from rooftop.agent.roofline import find_model  # noqa: PLC0415

    find_model(name)


def _check_probe_url(url: str) -> None:
    from rooftop.agent.engines.probe import chat_completions_url  # noqa: PLC0415

    chat_completions_url(url)


def _check_address(text: str) -> None:
    """``HOST:PORT`` (port 0..65535), as the collector's config requires of its addresses.

    Checked while parsing, so that a typo is a usage error (2), not a failed start (1).
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")


def _check_address_or_none(text: str) -> None:
    """``HOST:PORT``, or "" for none (the Prometheus endpoint can be turned off)."""
    if text:
        _check_address(text)


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

def _engine_options(fn: F) -> F:
    """``--engine-url`` and ``--hooks``: where engine TPOT/TTFT come from while sampling."""
    fn = click.option(
        "--hooks/--no-hooks", default=True, show_default=True,
        help="Receive in-process engine hooks on $ROOFTOP_HOOK_SOCKET while sampling.")(fn)
    return click.option(
        "--engine-url", "engine_urls", multiple=True, metavar="URL[@GPU,...]",
        callback=_checked_by(_check_engine_url),
        help="Scrape an engine's /metrics (vLLM, SGLang, TGI) while sampling; @0,1 ties it "
             "to GPUs 0 and 1 (repeatable).")(fn)


def _sample_live(
    fake: str | None,
    gpus: int,
    engine_urls: tuple[str, ...],
    hooks: bool,
    seconds: float,
    rate_hz: float,
    progress: _Progress,
    on_records: Callable[[list[Any]], None] | None = None,
) -> list[Any]:
    """Open the GPU backend, host sensor and engine sources; sample; close them all."""
    from rooftop.agent import diagnose as dx  # noqa: PLC0415 — keeps `agentctl --help` fast
    from rooftop.agent.engines.sources import (  # noqa: PLC0415
        EngineEndpoint,
        EngineSources,
        default_hook_socket,
    )

    spec = dx.FakeSpec.parse(fake) if fake else None
    endpoints = [EngineEndpoint.parse(u) for u in engine_urls]
    backend = dx.open_backend(spec, gpus)
    engines = EngineSources(default_hook_socket(dict(os.environ)) if hooks else None, endpoints)
    try:
        engines.start()
        for warning in engines.warnings:
            click.echo(f"agentctl: warning: {warning}", err=True)
        progress.label = progress.label.format(gpus=len(backend.devices()))
        records = dx.sample(backend, dx.open_host_sensor(backend), seconds, rate_hz, progress,
                            on_records, engines=engines)
        # A dead or wrong --engine-url would otherwise only be a "-" under TPOT.
        for warning in engines.scrape_warnings():
            click.echo(f"agentctl: warning: {warning}", err=True)
        return records
    finally:
        progress.close()
        engines.shutdown()
        backend.close()


# --- talking to a collector (status, diagnose --collector) ------------------------------

COLLECTOR_ENV = "ROOFTOP_COLLECTOR"


def _collector_auth_options(fn: F) -> F:
    """TLS / token options for calls to a collector; env names as the agent config's keys."""
    path = click.Path(dir_okay=False, path_type=Path)
    for name, envvar, text in reversed([
        ("--ca-file", "ROOFTOP_CA_FILE", "PEM CA to verify the collector with [default: system]."),
        ("--cert-file", "ROOFTOP_CERT_FILE", "PEM client certificate (mTLS collectors)."),
        ("--key-file", "ROOFTOP_KEY_FILE", "Its private key."),
        ("--token-file", "ROOFTOP_TOKEN_FILE",
         "Bearer token file (the agents' token or the read-only one); TLS only."),
    ]):  # fmt: skip
        fn = click.option(name, type=path, envvar=envvar, show_envvar=True, help=text)(fn)
    fn = click.option("--server-name", default="", envvar="ROOFTOP_SERVER_NAME", show_envvar=True,
                      help="Name expected in the collector's certificate, if not ADDR's host.")(fn)
    fn = click.option("--insecure", is_flag=True, envvar="ROOFTOP_INSECURE", show_envvar=True,
                      help="Plaintext, for a collector started with --insecure (no token).")(fn)
    return click.option("--timeout", "timeout_s", default=10.0, show_default=True,
                        type=click.FloatRange(min=0.1), help="Seconds to wait for the answer.")(fn)


def _fleet_status(
    addresses: tuple[str, ...],
    node: str | None,
    detail: bool,
    auth: dict[str, Any],
) -> Any:
    """Ask every collector at once for the fleet's status (``rooftop.v1.Query``), merged.

    Returns ``fleet_query.FleetView``; raises (exit 1) only when none answered.
    """
    # gRPC's C core logs a failed handshake on stderr by itself (absl, INFO) beside our
    # one-line error; it reads GRPC_VERBOSITY once, when grpc is first imported: below.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from rooftop.agent.credentials import ClientAuth  # noqa: PLC0415 — grpc
    from rooftop.agent.fleet_query import query_fleets  # noqa: PLC0415

    timeout_s = auth.pop("timeout_s")
    client = ClientAuth(**auth)
    return query_fleets(addresses, client, node=node or "", detail=detail, timeout_s=timeout_s)


_by_option = click.option(
    "--by", type=click.Choice(["workload", "namespace", "node"]), default=None,
    help="One row per workload (model, else pod owner, else process), namespace or node: "
         "GPUs, verdict mix, TPOT p50/p99 against the roofline floor, what to do first.")


def _print_workloads(
    addresses: tuple[str, ...], node: str | None, by: str, as_json: bool, auth: dict[str, Any]
) -> None:
    """``--by``: the fleet grouped by workload, namespace or node."""
    from rooftop.agent.workload_view import format_workloads, workloads_json  # noqa: PLC0415

    # Detail: the newest samples carry the pods and processes, the verdicts their advice.
    view = _fleet_status(addresses, node, True, auth)
    label = ", ".join(addresses)
    if as_json:
        doc = workloads_json(view.status, collector=label, by=by, collectors=view.collectors)
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(format_workloads(view.status, collector=label, by=by,
                                    collectors=view.collectors))


# What the agent config gives besides its collectors: how to reach them.
_AGENT_AUTH_KEYS = ("ca_file", "cert_file", "key_file", "token_file", "server_name", "insecure")


def _address_list(texts: Sequence[str]) -> tuple[str, ...]:
    """The addresses in ``texts``, each a comma-separated list (blanks skipped)."""
    return tuple(a.strip() for text in texts for a in text.split(",") if a.strip())


def _collector_addresses(given: tuple[str, ...], auth: dict[str, Any]) -> tuple[str, ...]:
    """The collectors to ask (a DNS name stands for every address it resolves to).

    Every ``--collector`` (repeatable, or comma-separated),
    else ``$ROOFTOP_COLLECTOR`` (comma-separated), else the agent config's ``collectors``
    (``$ROOFTOP_CONFIG``, ``$ROOFTOP_COLLECTORS``) with its TLS files and token when no
    auth option is given.
    """
    addresses = _address_list(given) or _address_list([os.environ.get(COLLECTOR_ENV, "")])
    if addresses:
        return addresses
    from rooftop.agent.config import CONFIG_ENV, ENV_VARS, load_config  # noqa: PLC0415

    if os.environ.get(CONFIG_ENV) or os.environ.get(ENV_VARS["collectors"]):
        cfg = load_config()
        if cfg.collectors:
            if not any(auth.get(key) for key in _AGENT_AUTH_KEYS):
                auth.update({key: getattr(cfg, key) for key in _AGENT_AUTH_KEYS})
            return cfg.collectors
    raise click.UsageError(
        f"give --collector HOST:PORT or set ${COLLECTOR_ENV} (or an agent config with "
        "collectors in $ROOFTOP_CONFIG)"
    )


@main.command()
@click.option("--collector", "collectors", metavar="HOST:PORT", multiple=True,
              help="A collector's ingest address; repeat it (or give a DNS name with several "
                   "addresses) to ask several at once and merge their fleets "
                   f"[default: ${COLLECTOR_ENV}, else the agent config's collectors].")
@click.option("--node", metavar="NAME", help="Only this node (agent_id or hostname).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, nothing else.")
@_by_option
@_collector_auth_options
@friendly_errors
def status(
    collectors: tuple[str, ...], node: str | None, as_json: bool, by: str | None, **auth: Any
) -> None:
    """Every node and GPU the collectors know: verdict, last seen, lag, drops.

    Several collectors are asked at once and each node is shown once (the newest
    report); one that does not answer is marked NOT ANSWERING and the exit status
    stays 0, unless none answers (1).
    """
    from rooftop.agent.status import format_status, status_json  # noqa: PLC0415

    addresses = _collector_addresses(collectors, auth)
    if by is not None:
        _print_workloads(addresses, node, by, as_json, auth)
        return
    view = _fleet_status(addresses, node, False, auth)
    label = ", ".join(addresses)
    if as_json:
        doc = status_json(view.status, collector=label, collectors=view.collectors)
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(format_status(view.status, collector=label, collectors=view.collectors))


_fake_option = click.option(
    "--fake",
    metavar="PROFILE[:WORKLOAD,...]",
    callback=_checked_by(_check_fake),
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
@click.option("--model", "model_name", metavar="NAME", callback=_checked_by(_check_model),
              help="Served model (e.g. llama-3-8b) for the TPOT floor and application MBU.")
@click.option("--model-config", type=click.Path(path_type=Path, exists=True),
              help="HuggingFace config.json of the served model (instead of --model).")
@click.option("--dtype", "dtype_name", default="bf16", show_default=True,
              type=click.Choice(["fp16", "bf16", "fp8", "int4"]), help="Weight dtype.")
@click.option("--kv-dtype", "kv_dtype_name", type=click.Choice(["fp16", "bf16", "fp8"]),
              help="KV-cache dtype (default: as the weights, fp16/bf16).")
@click.option("--context", "context_tokens", default=0, show_default=True,
              type=click.IntRange(min=0), help="Mean tokens per request in flight.")
@click.option("--collector", "collectors", is_flag=False, flag_value="", multiple=True,
              metavar="[HOST:PORT]",
              help="Show the latest verdicts the collector holds for every node instead "
                   f"(alone: ${COLLECTOR_ENV}); repeat it to merge several; for incidents, "
                   "from anywhere.")
@click.option("--node", metavar="NAME", help="With --collector: only this node.")
@_by_option
@_collector_auth_options
@_engine_options
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
    model_name: str | None,
    model_config: Path | None,
    dtype_name: str,
    kv_dtype_name: str | None,
    context_tokens: int,
    engine_urls: tuple[str, ...],
    hooks: bool,
    fake: str | None,
    gpus: int,
    collectors: tuple[str, ...],
    node: str | None,
    by: str | None,
    **auth: Any,
) -> None:
    """Say what bounds each GPU on this host: memory, compute or the host.

    With --collector: the latest verdicts of every node (or --node) from the collector.
    """
    from rooftop.agent import diagnose as dx  # noqa: PLC0415 — keeps `agentctl --help` fast
    from rooftop.agent.health_report import (  # noqa: PLC0415
        format_health,
        health_json,
        health_of,
    )
    from rooftop.agent.render import format_table, format_timeline, verdict_json  # noqa: PLC0415
    from rooftop.agent.trace import read_trace  # noqa: PLC0415

    if collectors:  # given, with or without a value
        if replay is not None or fake is not None:
            raise click.UsageError("--collector reads the fleet; it excludes --replay and --fake")
        from rooftop.agent.status import diagnosis_json, format_diagnosis  # noqa: PLC0415

        addresses = _collector_addresses(collectors, auth)
        if by is not None:
            _print_workloads(addresses, node, by, as_json, auth)
            return
        view = _fleet_status(addresses, node, True, auth)
        label = ", ".join(addresses)
        if as_json:
            doc = diagnosis_json(view.status, collector=label, collectors=view.collectors,
                                 origins=view.origins)
            click.echo(json.dumps(doc, indent=2))
        else:
            click.echo(format_diagnosis(view.status, collector=label,
                                        collectors=view.collectors, origins=view.origins))
        return
    if node is not None:
        raise click.UsageError("--node needs --collector")
    if by is not None:
        raise click.UsageError("--by needs --collector: it groups the fleet's GPUs")
    skipped: dict[str, int] = {}
    if replay is not None:
        trace = read_trace(replay)
        records = list(trace.records)
        skipped = dict(trace.skipped_reasons)
        source = f"replay of {replay}"
    else:
        records = _sample_live(fake, gpus, engine_urls, hooks, seconds, rate_hz,
                               _Progress("sampling {gpus} GPU(s)", not as_json))
        source = f"fake {fake} (no GPU)" if fake else "live NVML"
        source += f", {seconds:g} s at {rate_hz:g} Hz"
    per_window = dx.diagnose_records(records, window_s)
    timeline_windows = per_window
    if timeline and window_s is None:
        timeline_windows = dx.diagnose_records(records, TIMELINE_DEFAULT_WINDOW_S)
    model_ctx = _model_context(model_name, model_config, dtype_name, kv_dtype_name,
                               context_tokens)
    if model_ctx is not None:
        timeline_windows = {i: [dx.with_roofline(v, model_ctx) for v in vs]
                            for i, vs in timeline_windows.items()}
        per_window = {i: [dx.with_roofline(v, model_ctx) for v in vs]
                      for i, vs in per_window.items()}
    latest = dx.overall(per_window)
    # A GPU that needs a reset (XID 79, 48...) is said before any verdict.
    health = health_of(records)
    if as_json:
        out: dict[str, Any] = {
            "source": source,
            "health": health_json(health),
            "skipped_records": sum(skipped.values()),
            "skipped_reasons": skipped,
            "gpus": [verdict_json(v) for v in latest],
        }
        if timeline:
            # Keyed "0", or "0/MIG-..." for a MIG instance of GPU 0.
            out["timeline"] = {i.label(): [verdict_json(v) for v in vs]
                               for i, vs in timeline_windows.items()}
        click.echo(json.dumps(out, indent=2))
        return
    for line in format_health(health):
        click.echo(line)
    click.echo(format_table(latest, source=source, skipped=skipped))
    if window_s is not None and not timeline:
        n = max(len(vs) for vs in per_window.values())
        click.echo(f"  (latest of {n} windows of {window_s:g} s; --timeline shows each)")
    if timeline:
        click.echo(format_timeline(timeline_windows))


def _model_context(
    model_name: str | None,
    model_config: Path | None,
    dtype_name: str,
    kv_dtype_name: str | None,
    context_tokens: int,
) -> Any:
    """The served model for the roofline, if the user named one (else None)."""
    if model_name is None and model_config is None:
        return None
    from rooftop.agent import roofline  # noqa: PLC0415
    from rooftop.agent.diagnose import ModelContext  # noqa: PLC0415

    if model_name is not None and model_config is not None:
        raise click.UsageError("give --model or --model-config, not both")
    spec = (roofline.load_hf_config(model_config) if model_config is not None
            else roofline.find_model(model_name or ""))
    return ModelContext(
        model=spec,
        dtype=roofline.parse_dtype(dtype_name),
        kv_dtype=roofline.parse_dtype(kv_dtype_name) if kv_dtype_name else None,
        context_tokens=context_tokens,
    )


@main.command()
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="How long to record.")
@click.option("--rate", "rate_hz", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1, max=10.0), help="Samples per second (GPM needs ≤ 10).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Trace file to write (trace format v1, JSON Lines); '-' for stdout.")
@_engine_options
@_fake_option
@_gpus_option
@friendly_errors
def record(
    seconds: float,
    rate_hz: float,
    out_path: Path,
    engine_urls: tuple[str, ...],
    hooks: bool,
    fake: str | None,
    gpus: int,
) -> None:
    """Record live sensor samples to a trace file (replay it with diagnose --replay)."""
    from rooftop.agent.trace import TraceWriter  # noqa: PLC0415

    to_stdout = str(out_path) == "-"
    try:
        stream = sys.stdout if to_stdout else out_path.open("w", encoding="utf-8")
    except OSError as exc:
        raise click.FileError(str(out_path), exc.strerror) from exc
    writer = TraceWriter(stream)
    try:
        # Records are written as they come, so an interrupted recording keeps what it had.
        _sample_live(fake, gpus, engine_urls, hooks, seconds, rate_hz,
                     _Progress(f"recording {{gpus}} GPU(s) to {out_path}", not to_stdout),
                     writer.write)
    finally:
        if not to_stdout:
            stream.close()
    if not to_stdout:
        click.echo(f"wrote {writer.written} records to {out_path}", err=True)


# --- roofline -------------------------------------------------------------------------

# The choices mirror rooftop.agent.roofline.Dtype (a test holds them equal); spelled out here so
# that `agentctl --help` does not import the roofline module.
_ROOFLINE_DTYPES = ("fp16", "bf16", "fp8", "int4")


@main.command()
@click.option("--model", "model_name", metavar="NAME",
              help="A model preset, e.g. llama-3-8b, llama-3-70b, qwen2.5-72b.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True),
              help="A HuggingFace config.json (or the model directory holding it).")
@click.option("--gpu", "gpu_name", required=True, metavar="NAME",
              help="e.g. h100, h100-pcie, h200, b200, a100, l40s, a10g, rtx-4090, "
                   "or an NVML name.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Requests decoding together.")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Tokens in the KV cache per request.")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(_ROOFLINE_DTYPES),
              help="Weights' storage type.")
@click.option("--kv-dtype", type=click.Choice(_ROOFLINE_DTYPES),
              help="KV cache's storage type [default: the weights' if 16-bit, else bf16].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, nothing else.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw the roofline chart to this PNG (needs matplotlib).")
@friendly_errors
def roofline(
    model_name: str | None,
    config_path: Path | None,
    gpu_name: str,
    batch: int,
    context: int,
    dtype: str,
    kv_dtype: str | None,
    as_json: bool,
    plot_path: Path | None,
) -> None:
    """Will a model fit, and what TPOT floor does the GPU's bandwidth allow?"""
    from rooftop.agent import roofline as rl  # noqa: PLC0415 — keeps `agentctl --help` fast
    from rooftop.agent import roofline_report  # noqa: PLC0415
    from rooftop.common.errors import RooflineError  # noqa: PLC0415

    try:
        gpu = rl.find_gpu(gpu_name)
    except RooflineError as exc:
        raise click.BadParameter(str(exc), param_hint="'--gpu'") from exc
    if model_name is not None and config_path is not None:
        raise click.UsageError("give one of --model NAME or --config PATH, not both")
    if config_path is not None:
        model = rl.load_hf_config(config_path)
    elif model_name is not None:
        try:
            model = rl.find_model(model_name)
        except RooflineError as exc:
            raise click.BadParameter(str(exc), param_hint="'--model'") from exc
    else:
        raise click.UsageError("give --model NAME or --config PATH")
    result = rl.analyze(model, gpu, batch, context, dtype, kv_dtype)
    others = rl.compare(model, batch, context, dtype, kv_dtype)
    if plot_path is not None:
        roofline_report.plot_roofline(result, plot_path)
    if as_json:
        click.echo(json.dumps(roofline_report.to_dict(result, others), indent=2))
    else:
        click.echo(roofline_report.format_report(result, others))
    if plot_path is not None:
        click.echo(f"wrote roofline chart to {plot_path}", err=True)


# --- probe (engines) ------------------------------------------------------------------


@main.command()
@click.argument("url", callback=_checked_by(_check_probe_url))
@click.option("--model", "-m", "model_name", required=True, help="Model name to request.")
@click.option("--prompt", default=None,
              help="User message [default: one that makes the model emit many tokens].")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=2),
              help="Completion length cap (TPOT needs at least 2 tokens).")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Connect timeout and longest silence, seconds.")
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, nothing else.")
@friendly_errors
def probe(
    url: str,
    model_name: str,
    prompt: str | None,
    max_tokens: int,
    timeout_s: float,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Time one streamed completion from an OpenAI-compatible server: TTFT and TPOT.

    URL is the server's base URL (http://host:8000, …/v1 or the full
    …/v1/chat/completions). Works with vLLM, SGLang, TGI or any compatible API.
    """
    from rooftop.agent.engines import probe as pr  # noqa: PLC0415 — keeps `agentctl --help` fast

    result = pr.probe(url, model_name, prompt=prompt or pr.DEFAULT_PROMPT,
                      max_tokens=max_tokens, timeout_s=timeout_s, api_key=api_key)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else pr.format_probe(result))


# --- agent / collector (fleet) --------------------------------------------------------


@main.command("collector")
@click.option("--config", "config_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Collector TOML config [default: built-in defaults].")
@click.option("--listen", default=None, metavar="ADDR", callback=_checked_by(_check_address),
              help="gRPC ingest HOST:PORT, overriding the config (port 0 picks one).")
@click.option("--prometheus", "prometheus_listen", default=None, metavar="ADDR",
              callback=_checked_by(_check_address_or_none),
              help='Prometheus endpoint HOST:PORT, overriding the config ("" disables).')
@click.option("--insecure", is_flag=True, default=False,
              help="Accept agents over plaintext gRPC (no TLS, no token): ask for it explicitly. "
                   "Binds to 127.0.0.1 unless --listen or the config gives an address.")
@click.option("--allow-unauthenticated", is_flag=True, default=False,
              help="Serve a mode that authenticates no agent (plaintext, or TLS with neither "
                   "client certificates nor a token) on a non-loopback address "
                   "(allow_unauthenticated = true); refused without it.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@friendly_errors
def collector_command(
    config_path: Path | None,
    listen: str | None,
    prometheus_listen: str | None,
    insecure: bool,
    allow_unauthenticated: bool = False,
    log_level: str = "info",
) -> None:
    """Run the fleet collector until SIGTERM: agents stream in, OTLP and Prometheus out."""
    import logging  # noqa: PLC0415

    from rooftop.collector.config import load_config
    from rooftop.collector.service import run

    config = load_config(config_path, listen=listen, prometheus_listen=prometheus_listen,
                         insecure=True if insecure else None,
                         allow_unauthenticated=True if allow_unauthenticated else None)
    # Refusals (once per peer), certificate and token reloads are logged on stderr.
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    run(config, echo=click.echo)


# gRPC experiments the agent process runs with unless GRPC_EXPERIMENTS is set.
_AGENT_GRPC_EXPERIMENTS = "-event_engine_client"


@main.command("agent")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config (default: $ROOFTOP_CONFIG; ROOFTOP_<KEY> variables override it).",
)
@_fake_option
@click.option("--gpus", "fake_gpus", type=click.IntRange(1, 64), default=None,
              help="Number of fake GPUs (with --fake).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@friendly_errors
def agent_command(
    config_path: Path | None, fake: str | None, fake_gpus: int | None, log_level: str
) -> None:
    """Run the node agent: sample, classify and stream to the collector until SIGTERM."""
    # Before grpc is imported, which is when its C core reads the variable (an
    # operator's own value wins). EventEngine's client endpoint woke its thread pool
    # ~40 times for the agent's one batch and ack a second, ~0.15 % of a core of the
    # 0.5 % budget (docs/PERFORMANCE.md); the older TCP client wakes ~15 times.
    os.environ.setdefault("GRPC_EXPERIMENTS", _AGENT_GRPC_EXPERIMENTS)
    from rooftop.agent.daemon import run_agent  # noqa: PLC0415 — keeps grpc off the other commands

    sys.exit(
        run_agent(
            config_path,
            fake=fake,
            fake_gpus=fake_gpus,
            log_level=log_level,
            direct_otlp=direct_otlp_sink,
        )
    )


def direct_otlp_sink(export: OtlpExport, host_name: str) -> BatchSink:
    """The agent's ``[otlp]`` export: the collector's fleet and OTLP code, in this process.

    ``host_name`` is the resource's ``host.name``: the node's name.
    """
    # Imported only then: the OTel SDK and exporters add ~6 MiB of RSS (measured).
    from rooftop.collector.direct import DirectExporter  # noqa: PLC0415

    return DirectExporter(export, host_name=host_name)


@main.command("alive")
@click.argument("heartbeat_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--max-age-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fail when the last sampling tick is older than this [default: 30].")
def alive_command(heartbeat_file: Path, max_age_s: float | None) -> None:
    """Exit 0 if the agent's sampling loop ticked recently (an exec probe; heartbeat_file)."""
    from rooftop.agent.heartbeat import DEFAULT_MAX_AGE_S, heartbeat_problem  # noqa: PLC0415

    problem = heartbeat_problem(heartbeat_file, max_age_s or DEFAULT_MAX_AGE_S)
    if problem is not None:
        click.echo(f"agentctl: not alive: {problem}", err=True)
        sys.exit(EXIT_FAILURE)


# --- demo -----------------------------------------------------------------------------


@main.command()
@click.option("--seconds", type=click.FloatRange(min=1), default=None,
              help="Stop after this long (default: until Ctrl-C).")
@click.option("--prometheus", "prometheus_listen", default="127.0.0.1:9464", show_default=True,
              callback=_checked_by(_check_address_or_none),
              help='Where the collector serves /metrics (port 0: any free port; "" none).')
@friendly_errors
def demo(seconds: float | None, prometheus_listen: str) -> None:
    """Collector + two agents replaying real H100 recordings, with a live fleet view. No GPU."""
    from rooftop.demo import run_demo  # noqa: PLC0415

    tty = sys.stdout.isatty()
    run_demo(seconds=seconds, prometheus_listen=prometheus_listen, clear_screen=tty,
             echo=lambda text: click.echo(text if tty else text + "\n" + "-" * 40))


# --- config ---------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check a configuration file, or print a commented default one."""


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--kind", type=click.Choice(["agent", "collector"]),
              help="Which daemon the file is for (default: detected from its shape).")
@click.option("--quiet", "-q", is_flag=True, help="Only the exit status and errors.")
@friendly_errors
def config_check(path: Path, kind: str | None, quiet: bool) -> None:
    """Validate PATH as the daemon would at start (environment overrides included)."""
    from rooftop.config_check import check_config  # noqa: PLC0415

    detected, summary = check_config(path, kind, dict(os.environ))  # type: ignore[arg-type]
    if not quiet:
        # A TOML comment: the whole output is a file that loads to the same settings.
        click.echo(f"# {path}: valid {detected} configuration; effective settings:")
        click.echo(summary)


@config.command("example")
@click.argument("kind", type=click.Choice(["agent", "collector"]))
def config_example(kind: str) -> None:
    """Print a commented configuration with every key at its default."""
    from rooftop.config_check import example_text  # noqa: PLC0415

    click.echo(example_text(kind), nl=False)  # type: ignore[arg-type]
