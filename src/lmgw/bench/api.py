"""`lmgw bench` as a Python API: :class:`BenchOptions` (the CLI's flags, same names) and
:func:`run_bench`, a trio coroutine that returns the JSON-ready report.

    report = trio.run(run_bench, BenchOptions(url="http://127.0.0.1:8000", concurrency=8,
                                               requests=200))
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from .. import __version__
from ..errors import DECODE_ERRORS
from .loadgen import (
    BenchFailure,
    LoadGenerator,
    LoadPlan,
    RunResult,
    Target,
    TargetError,
    fetch_model,
)
from .report import build_report
from .workloads import (
    Dataset,
    LengthDist,
    RequestShape,
    Workload,
    WorkloadError,
    build_workload,
)


class BenchSetupError(Exception):
    """Flags or a target that cannot make a run; ``code`` is the CLI's exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class BenchOptions:
    """One run's settings; the fields are `lmgw bench`'s flags (docs/bench.md)."""

    url: str
    model: str | None = None
    api_key: str | None = None
    header: list[str] = field(default_factory=list)
    cacert: str | None = None
    concurrency: int | None = None
    rate: float | None = None
    duration: float | None = None
    requests: int | None = None
    workload: str | None = None
    dataset: str | None = None
    endpoint: str = "chat"
    input_len: int = 256
    output_len: int = 128
    len_dist: str = "fixed"
    len_spread: float = 0.5
    turns: int = 4
    prefix_len: int = 512
    prefix_groups: int = 4
    images: int = 1
    image_size: str = "256x256"
    ignore_eos: bool = False
    no_stream: bool = False
    extra_body: str | dict[str, Any] | None = None
    seed: int = 0
    timeout: float = 600.0
    include_requests: bool = True
    """Whether the report lists every request (``requests``)."""

    @classmethod
    def from_args(cls, args: Any) -> BenchOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _image_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1 or max(size) > 8192:
        raise BenchSetupError(f"--image-size {text!r}: expected WxH, e.g. 256x256")
    return size


def _headers(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise BenchSetupError(f"--header {item!r}: expected 'NAME: VALUE'")
        out.append((name, value))
    return out


@dataclass(slots=True)
class Prepared:
    """Validated options; the workload is built once the model is known."""

    options: BenchOptions
    target: Target
    plan: LoadPlan
    extra: dict[str, Any]
    model: str | None = None
    ssl_context: ssl.SSLContext | None = None
    workload: Workload | None = None
    generator: LoadGenerator | None = None

    def config(self) -> dict[str, Any]:
        o = self.options
        return {
            "url": o.url,
            "model": self.model,
            "mode": self.plan.mode,
            "concurrency": self.plan.concurrency,
            "rate": self.plan.rate,
            "duration_s": self.plan.duration_s,
            "requests": self.plan.requests,
            "timeout_s": self.plan.timeout_s,
            "seed": self.plan.seed,
            "stream": not o.no_stream,
            "ignore_eos": o.ignore_eos,
            "extra_body": self.extra or None,
            "lmgw_version": __version__,
        }

    def report(self, interrupted: bool = False) -> dict[str, Any]:
        """The report of what ran (so far, when ``interrupted``)."""
        gen = self.generator
        if gen is None:
            result = RunResult(records=[], elapsed_s=0.0, cpu_s=0.0, started_at=0.0)
        else:
            result = gen.result(interrupted=interrupted)
        workload = self.workload.describe() if self.workload is not None else {}
        return build_report(
            result,
            config=self.config(),
            workload=workload,
            include_requests=self.options.include_requests,
        )


def prepare(args: Any) -> Prepared:
    """Check the options (an argparse namespace or :class:`BenchOptions`) without I/O beyond
    reading a dataset. Raises BenchSetupError."""
    o = args if isinstance(args, BenchOptions) else BenchOptions.from_args(args)
    api_key = o.api_key if o.api_key is not None else os.environ.get("OPENAI_API_KEY") or None
    try:
        target = Target.from_url(o.url, api_key=api_key, headers=_headers(o.header))
    except TargetError as exc:
        raise BenchSetupError(str(exc)) from None
    try:
        plan = LoadPlan(
            concurrency=o.concurrency,
            rate=o.rate,
            duration_s=o.duration,
            requests=o.requests,
            timeout_s=o.timeout,
            seed=o.seed,
        )
    except ValueError as exc:
        raise BenchSetupError(str(exc)) from None
    extra: dict[str, Any] = {}
    if isinstance(o.extra_body, dict):
        extra = dict(o.extra_body)
    elif o.extra_body:
        try:
            extra = msgspec.json.decode(o.extra_body)
        except DECODE_ERRORS as exc:
            raise BenchSetupError(f"--extra-body is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise BenchSetupError("--extra-body must be a JSON object")
    prepared = Prepared(o, target, plan, extra, model=o.model)
    if target.scheme == "https" or o.cacert:
        try:
            prepared.ssl_context = ssl.create_default_context(cafile=o.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise BenchSetupError(f"--cacert {o.cacert}: {exc}") from None
    if o.dataset is None:
        try:  # the flags' checks now, with a placeholder model (built for real in resolve)
            _build(prepared, o.model or "?", check_only=True)
        except WorkloadError as exc:
            raise BenchSetupError(str(exc)) from None
    else:
        try:  # a dataset whose lines all name their model needs no --model
            prepared.workload = Dataset(o.dataset, o.model, extra)
        except WorkloadError as exc:
            if o.model is not None or "no --model given" not in str(exc):
                raise BenchSetupError(str(exc)) from None
    return prepared


def _build(prepared: Prepared, model: str, check_only: bool = False) -> Workload:
    o = prepared.options
    if o.dataset is not None:
        return Dataset(o.dataset, model, prepared.extra)
    shape = RequestShape(
        model=model,
        endpoint=o.endpoint,
        stream=not o.no_stream,
        ignore_eos=o.ignore_eos,
        extra=prepared.extra,
    )
    return build_workload(
        o.workload or "synthetic",
        shape,
        input_len=LengthDist(o.input_len, o.len_dist, o.len_spread),
        output_len=LengthDist(o.output_len, o.len_dist, o.len_spread),
        seed=o.seed,
        turns=o.turns,
        prefix_len=o.prefix_len,
        prefix_groups=o.prefix_groups,
        images=o.images,
        image_size=_image_size(o.image_size),
        check_only=check_only,
    )


async def resolve(prepared: Prepared) -> None:
    """Ask the target for its model if needed, and build the workload (once). Raises
    BenchSetupError."""
    if prepared.workload is not None:
        return
    if prepared.model is None:
        try:
            prepared.model = await fetch_model(prepared.target, ssl_context=prepared.ssl_context)
        except BenchFailure as exc:
            raise BenchSetupError(
                f"cannot find the model to use: {exc} (give --model)", 1
            ) from None
    try:
        prepared.workload = _build(prepared, prepared.model)
    except WorkloadError as exc:
        raise BenchSetupError(str(exc)) from None


async def run_prepared(prepared: Prepared, *, progress: bool = False) -> dict[str, Any]:
    """Resolve the model if needed, build the workload, run, and return the report."""
    await resolve(prepared)
    assert prepared.workload is not None
    gen = LoadGenerator(
        prepared.target, prepared.workload, prepared.plan, ssl_context=prepared.ssl_context
    )
    prepared.generator = gen
    if progress:
        from .progress import LiveProgress

        live = LiveProgress(gen)
        async with trio.open_nursery() as nursery:
            await nursery.start(live.run)
            await gen.run()
            nursery.cancel_scope.cancel()
    else:
        await gen.run()
    return prepared.report()


async def run_bench(options: BenchOptions, *, progress: bool = False) -> dict[str, Any]:
    """Run `lmgw bench` with ``options``; the report (see docs/bench.md). Raises
    BenchSetupError for options or a target that cannot make a run."""
    return await run_prepared(prepare(options), progress=progress)
