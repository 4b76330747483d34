"""The REST API: `POST /v1/generate`, `GET /v1/health`, and the validation of every request.

A request outside the served bounds, a body that is not JSON or an empty prompt gets a
4xx whose JSON `detail` says what is wrong in one line; nothing a client sends can take
the server down. `resolve` is also what the Gradio UI validates with.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import RayActorError

from wanray import models
from wanray.config import Config
from wanray.errors import RequestError
from wanray.infer.request import Cancelled, GenerationParams, StageUnavailable, image_from_base64
from wanray.sections import MAX_LORA_SCALE, MAX_STACKED_LORAS, STAGES
from wanray.wan import KINDS, ModelKind, valid_frames

logger = logging.getLogger("ray.serve")  # the ingress replica's log (logs/serve/replica_wanray_Ingress_*.log)

OutputFormat = Literal["mp4", "frames"]
MEDIA_TYPES = {"mp4": "video/mp4", "frames": "application/x-npy"}
MAX_SEED = 2**63 - 1

OnStage = Callable[[float, str], None]
"""Progress callback: (fraction done, what just finished)."""
Generate = Callable[[GenerationParams, OutputFormat, "OnStage | None"], Awaitable["Generated"]]
Queues = Callable[[], Awaitable[dict]]
"""The serving application's queues now: {"in_pipeline": n, "capacity": n, "stages": {stage: {"waiting": n,
"running": n}}}."""


@dataclass
class Generated:
    data: bytes
    """The video (mp4) or frames (.npy)."""
    seconds: dict[str, float]
    """Seconds each stage ran the request, by stage."""


class Busy(Exception):
    """The application cannot take (or keep) the request now: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):  # raised in a stage replica, re-raised in the ingress
        return Busy, (str(self), self.retry_after)


def cause(e: BaseException) -> BaseException:
    """The exception a stage replica raised, from the RayTaskError that carries it to the ingress."""
    return getattr(e, "cause", None) or e


class LoraRequest(BaseModel):
    """One adapter a request applies: a name the server loaded (GET /v1/loras) and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str
    scale: float = Field(1.0, allow_inf_nan=False)


class GenerateRequest(BaseModel):
    """Body of POST /v1/generate; a field left out takes the server's configured default."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = Field(None, allow_inf_nan=False)
    guidance_scale_2: float | None = Field(None, allow_inf_nan=False)
    seed: int | None = None
    image: str | None = None
    """Image-to-video models: the first frame, a PNG, JPEG or WebP file in base64."""
    last_image: str | None = None
    """I2V-A14B: also the last frame, likewise."""
    loras: list[LoraRequest] | None = None
    """Adapters to apply, stacked, each at its scale; left out: the server's infer.default_loras; []: none."""
    sampler: Literal["unipc", "euler"] | None = None
    """unipc, or euler (the 4-step distilled adapters' steps); left out: infer.sampler."""
    flow_shift: float | None = Field(None, allow_inf_nan=False)
    """Shift of the scheduler's flow sigmas; left out: infer.flow_shift."""
    output: OutputFormat = "mp4"
    """mp4 (H.264), or frames: the float32 (frames, height, width, 3) array in [0, 1] as .npy."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError(message)


def _check_loras(loras: tuple[tuple[str, float], ...], inf) -> None:
    names = [n for n, _ in loras]
    for name, scale in loras:
        _check(
            name in inf.loras,
            f"no adapter named {name!r} is served (served: {', '.join(sorted(inf.loras)) or 'none'}; GET /v1/loras)",
        )
        _check(
            abs(scale) <= MAX_LORA_SCALE,
            f"adapter {name}'s scale must lie in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got {scale}",
        )
    _check(len(set(names)) == len(names), f"an adapter is named twice in loras: {names}")
    most = min(MAX_STACKED_LORAS, inf.max_loaded_loras)
    _check(len(names) <= most, f"{len(names)} adapters are stacked, at most {most} are served (infer.max_loaded_loras)")


def _check_prompt(name: str, text: str, max_chars: int, required: bool) -> None:
    _check(not required or text.strip() != "", f"{name} must not be empty")
    _check(len(text) <= max_chars, f"{name} has {len(text)} characters, at most {max_chars} are served")


TOKEN_ENV = "WANRAY_API_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serving_token(cfg: Config) -> str:
    """The token serving requires: infer.api_token, else $WANRAY_API_TOKEN (read in the driver), else none."""
    return cfg.infer.api_token or os.environ.get(TOKEN_ENV, "")


def exposure_warning(cfg: Config, token: str) -> str | None:
    """A warning when the server binds beyond loopback with no token."""
    if token or cfg.infer.host in LOOPBACK:
        return None
    return (
        f"warning: serving on {cfg.infer.host} without a token: anyone who can reach port {cfg.infer.port} can "
        f"generate; set infer.api_token or {TOKEN_ENV}"
    )


def token_matches(header: str, token: str) -> bool:
    """An `Authorization: Bearer <token>` header against the token, in constant time."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


IMAGE_DECODES = 2
"""Requests whose images the ingress decodes at once: an 8192 x 8192 image takes about 400 MB to decode, and a
burst of them in the default thread pool (up to 32 threads) would take the ingress node's memory."""


def max_body_bytes(cfg: Config) -> int:
    """The largest request body served: a /v1/generate body with both images at infer.max_image_bytes (base64:
    4/3 of that) and both prompts at infer.max_prompt_chars of JSON's longest escapes, plus 64 KiB."""
    inf = cfg.infer
    return 2 * math.ceil(inf.max_image_bytes * 4 / 3) + 2 * 12 * inf.max_prompt_chars + 64 * 2**10


class TokenGate:
    """ASGI middleware: a 401 for any HTTP request without the bearer token, except under `open_prefix`. It
    answers from the headers alone, so a body (up to the size limit) is never read, or parsed, for a client
    without the token; FastAPI reads and parses a body before a route's dependencies run."""

    def __init__(self, app, token: str, open_prefix: str | None = None):
        self.app, self.token, self.open_prefix = app, token, open_prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self._open(scope):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not token_matches(header, self.token):
                refused = JSONResponse(
                    {"detail": "missing or wrong bearer token (Authorization: Bearer <infer.api_token>)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _open(self, scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")  # the app's own path: Serve's route prefix off
        path, prefix = path[len(root) :] if path.startswith(root) else path, self.open_prefix
        return prefix is not None and (path == prefix or path.startswith(prefix.rstrip("/") + "/"))


def served_split(cfg: Config) -> int:
    """What every served request's tokens must divide: the device counts of the expert stages."""
    return math.lcm(cfg.infer.stages.high.devices, cfg.infer.stages.low.devices)


def resolve(req: GenerateRequest, cfg: Config, kind: ModelKind = KINDS["t2v-a14b"], split: int = 1) -> GenerationParams:
    """The request with the configured defaults filled in for a model of `kind`; RequestError names the
    first bound it breaks (an image given to a text-to-video model, or none to an image-to-video one, or
    a size whose tokens the `split` devices of an expert stage cannot share evenly)."""
    inf, data = cfg.infer, cfg.data
    pick = lambda value, default: default if value is None else value
    p = GenerationParams(
        prompt=req.prompt,
        negative_prompt=pick(req.negative_prompt, inf.negative_prompt),
        height=pick(req.height, data.height),
        width=pick(req.width, data.width),
        num_frames=pick(req.num_frames, data.num_frames),
        num_inference_steps=pick(req.num_inference_steps, inf.num_inference_steps),
        guidance_scale=pick(req.guidance_scale, inf.guidance_scale),
        guidance_scale_2=pick(req.guidance_scale_2, inf.guidance_scale_2),
        seed=pick(req.seed, inf.seed),
        image=req.image,
        last_image=req.last_image,
        loras=tuple((u.name, u.scale) for u in (inf.default_loras if req.loras is None else req.loras)),
        sampler=pick(req.sampler, inf.sampler),
        flow_shift=pick(req.flow_shift, inf.flow_shift),
    )
    _check_loras(p.loras, inf)
    _check(p.flow_shift is None or 0 < p.flow_shift <= 100, f"flow_shift must lie in (0, 100], got {p.flow_shift}")
    _check(req.image is None or kind.image != "none", f"{kind.title} takes no image: leave image out")
    _check(req.image is not None or kind.image != "required", f"{kind.title} needs an image: the video's first frame")
    _check(req.last_image is None or kind.takes_last_image, f"{kind.title} takes no last_image: leave it out")
    _check(req.last_image is None or req.image is not None, "last_image needs image, the first frame")
    for name, encoded in (("image", req.image), ("last_image", req.last_image)):
        if encoded is not None:
            _check(
                len(encoded) * 3 // 4 <= inf.max_image_bytes,
                f"{name} has about {len(encoded) * 3 // 4} bytes, at most {inf.max_image_bytes} are served",
            )
            image_from_base64(encoded, name)  # a RequestError when it is no image
    _check_prompt("prompt", p.prompt, inf.max_prompt_chars, required=True)
    _check_prompt("negative_prompt", p.negative_prompt, inf.max_prompt_chars, required=False)
    for name, value, most in (("height", p.height, inf.max_height), ("width", p.width, inf.max_width)):
        m = kind.size_multiple
        _check(value % m == 0, f"{name} must be a multiple of {m} for {kind.title}, got {value}")
        _check(m <= value <= most, f"{name} must lie in [{m}, {most}], got {value}")
    _check(valid_frames(p.num_frames), f"num_frames must be 4n+1 (1, 5, ..., 81), got {p.num_frames}")
    _check(1 <= p.num_frames <= inf.max_frames, f"num_frames must lie in [1, {inf.max_frames}], got {p.num_frames}")
    frames_bytes = p.num_frames * p.height * p.width * 3 * 4
    _check(
        req.output != "frames" or frames_bytes <= inf.max_frames_output_bytes,
        f'"output": "frames" of {p.num_frames}x{p.height}x{p.width} is {frames_bytes / 1e6:.1f} MB of float32, at '
        f"most {inf.max_frames_output_bytes / 1e6:.1f} MB are served (infer.max_frames_output_bytes): ask for mp4",
    )
    _check(
        req.last_image is None or p.num_frames >= 5,
        f"last_image needs num_frames of 5 or more (a first and a last frame), got {p.num_frames}",
    )
    tokens = kind.tokens(p.num_frames, p.height, p.width)
    _check(
        tokens % split == 0,
        f"{p.num_frames}x{p.height}x{p.width} is {tokens} tokens, which the {split} devices "
        "of an expert stage cannot share evenly: pick another size",
    )
    _check(
        1 <= p.num_inference_steps <= inf.max_steps,
        f"num_inference_steps must lie in [1, {inf.max_steps}], got {p.num_inference_steps}",
    )
    for name in ("guidance_scale", "guidance_scale_2"):
        value = getattr(p, name)
        _check(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
    _check(0 <= p.seed <= MAX_SEED, f"seed must lie in [0, 2**63-1], got {p.seed}")
    return p


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's error list as one line; a body that is not JSON is a 400, a wrong field a 422."""
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            at = e.get("loc", ("body", "?"))[-1]
            reason = e.get("ctx", {}).get("error", e.get("msg"))
            return 400, f"request body is not valid JSON: {reason} (at character {at})"
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
        parts.append(f"{where}: {e.get('msg')}")
    return 422, "; ".join(parts)


def _logged(
    response: Response | None,
    req: GenerateRequest,
    params: GenerationParams | None,
    start: float,
    stages: dict[str, float] | None = None,
    outcome: str = "",
) -> Response | None:
    """The response, after one line in the ingress replica's log: prompt length, size, steps, seconds (in
    all, and per stage when it ran), outcome. Serve prefixes it with the request's id, which it also returns
    as X-Request-Id (a client's own X-Request-Id is kept)."""
    size = (
        f"{params.num_frames}x{params.height}x{params.width}, {params.num_inference_steps} steps"
        if params
        else "not resolved"
    )
    per_stage = f" ({', '.join(f'{k} {v:.2f}' for k, v in stages.items())})" if stages else ""
    logger.info(
        "generate: prompt %d chars, %s, %.2f s%s, %s",
        len(req.prompt),
        size,
        time.perf_counter() - start,
        per_stage,
        outcome or f"status {response.status_code if response is not None else 'none'}",
    )
    return response


def build_api(
    generate: Generate,
    cfg: Config,
    model_dir: str,
    token: str = "",
    queues: Queues | None = None,
    count: Callable[[str, float], None] = lambda outcome, seconds: None,
    loras: dict[str, dict[str, str]] | None = None,
    open_prefix: str | None = None,
) -> FastAPI:
    """The FastAPI app of the ingress; `generate` moves one request through the stages, `queues` reports
    their depths in /v1/health, `count(outcome, seconds)` records each /v1/generate, `loras` (name -> expert
    -> file) is what GET /v1/loras lists. With a `token`, every path but those under `open_prefix` (the
    UI, behind its own login) answers 401 unless the request carries it as a bearer token."""
    loras = loras or {}
    kind = models.read_kind(model_dir)

    app = FastAPI(
        title="wanray",
        description=f"{kind.title} from {model_dir}",
        max_body_size=max_body_bytes(cfg),  # a 413 once a body passes it, before the rest is read
    )
    if token:
        app.add_middleware(TokenGate, token=token, open_prefix=open_prefix)
    decoding = asyncio.Semaphore(IMAGE_DECODES)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)

    @app.get("/v1/health")
    async def health() -> dict:
        stages = {
            name: {"device": s.device, "dtype": s.dtype, "devices": s.devices, "replicas": s.replicas}
            for name in STAGES
            if name != "low" or not kind.one_transformer
            for s in (cfg.infer.stages[name],)
        }
        experts = cfg.infer.stages.high  # device and dtype at the top: the high-noise expert's
        out = {
            "status": "ok",
            "model": model_dir,
            "kind": kind.name,
            "image": kind.image,
            "device": experts.device,
            "dtype": experts.dtype,
            "stages": stages,
            "loras": sorted(loras),
        }
        if queues is not None:
            now = await queues()
            for name, depth in now.pop("stages").items():
                stages[name].update(depth)
            out["queue"] = now
        return out

    @app.get("/v1/loras")
    async def list_loras() -> dict:
        """The adapters a request may name, each expert's file, and what a request naming none gets."""
        return {
            "loras": [{"name": name, "experts": loras[name]} for name in sorted(loras)],
            "default": [{"name": u.name, "scale": u.scale} for u in cfg.infer.default_loras],
            "max_stacked": min(MAX_STACKED_LORAS, cfg.infer.max_loaded_loras),
        }

    @app.post("/v1/generate", responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}})
    async def generate_video(req: GenerateRequest) -> Response:
        start = time.perf_counter()

        def answer(outcome: str, response: Response | None, stages: dict | None = None, note: str = ""):
            count(outcome, time.perf_counter() - start)
            return _logged(response, req, params, start, stages, note)

        params = None
        try:
            if req.image is None and req.last_image is None:
                params = resolve(req, cfg, kind, served_split(cfg))
            else:  # in a thread (an image's decode would hold every request's event loop), IMAGE_DECODES at once
                async with decoding:
                    params = await asyncio.to_thread(resolve, req, cfg, kind, served_split(cfg))
        except RequestError as e:
            return answer("invalid", JSONResponse({"detail": str(e)}, status_code=422))
        try:
            out = await generate(params, req.output, None)
        except asyncio.CancelledError:  # the client went away: the stages drop or stop the request
            answer("cancelled", None, note="cancelled: the client disconnected")
            raise
        except Exception as error:  # a failed generation answers this request only; the server keeps serving
            reason = cause(error)
            if isinstance(reason, Busy):
                return answer(
                    "busy",
                    JSONResponse(
                        {"detail": str(reason)}, status_code=503, headers={"Retry-After": str(reason.retry_after)}
                    ),
                )
            if isinstance(reason, Cancelled):
                return answer("cancelled", JSONResponse({"detail": str(reason)}, status_code=503))
            if isinstance(reason, StageUnavailable):
                detail = f"{reason}: try again"
                return answer("busy", JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "10"}))
            if isinstance(reason, RayActorError):  # a stage's replica stopped under the request: another takes it
                detail = f"a stage's replica stopped while running the request ({type(reason).__name__}): try again"
                return answer(
                    "failed", JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "10"})
                )
            logger.exception("generation failed")
            return answer(
                "failed",
                JSONResponse({"detail": f"generation failed: {type(reason).__name__}: {reason}"}, status_code=500),
            )
        return answer("ok", Response(out.data, media_type=MEDIA_TYPES[req.output]), out.seconds)

    return app
