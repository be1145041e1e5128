"""The peer bench/serve_load.py measures Ray Serve against: what a user writes instead of Serve.

A plain FastAPI app under uvicorn (one process, one event loop) with the core Predictor in-process:
the same ``POST /v1/segment`` (TIFF/PNG/NPY body; ``format=png|tiff|npy|json``; the mask and the
``X-Tumour-Pixels``/``X-Model-Version`` headers as Serve answers) and ``GET /healthz``. Each request
decodes, runs the model on its one slice in a thread (one at a time: the Predictor is not thread-safe)
and encodes; no cross-request batching, no proxy, no replicas.

    python bench/fastapi_peer.py --bundle runs/bench/bundle-lite-f16-256px --port 8123 [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

from core.formats import codecs  # noqa: E402
from core.inference.results import result_json  # noqa: E402


def build(bundle: str, device: str, threads: int) -> FastAPI:
    """The app, its Predictor loaded and warmed up."""
    import numpy as np
    import torch

    from core.inference.predictor import Predictor

    if threads > 0:
        torch.set_num_threads(threads)
    predictor = Predictor.from_bundle(bundle, device=device)
    predictor.predict(np.zeros((1, *predictor.size, 3), np.uint8))
    scale = codecs.mask_scale(predictor.config.get("class_names", []))
    names = predictor.config.get("class_names", [])
    lock = asyncio.Lock()
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "model_version": predictor.version})

    @app.post("/v1/segment")
    async def segment(request: Request, format: str = "png") -> Response:
        if format not in ("png", "tiff", "npy", "json"):
            return JSONResponse({"error": "bad_request", "detail": f"format={format!r}"}, status_code=400)
        try:
            image = codecs.decode(await request.body(), request.headers.get("content-type", ""), volume=False)
        except codecs.DecodeError as exc:
            return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)
        async with lock:
            mask = (await asyncio.to_thread(predictor.predict, image))[0]
        headers = {"X-Tumour-Pixels": str(int(np.count_nonzero(mask))), "X-Model-Version": predictor.version}
        if format == "json":
            return JSONResponse(result_json(mask[None], predictor.version, names, volume=False), headers=headers)
        if format == "npy":
            return Response(codecs.encode_npy(mask), 200, headers, codecs.NPY)
        if format == "tiff":
            return Response(codecs.encode_tiff(mask, scale), 200, headers, codecs.TIFF)
        return Response(codecs.encode_mask_png(mask, scale), 200, headers, codecs.PNG)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as a user would)")
    args = p.parse_args()
    import uvicorn

    uvicorn.run(build(args.bundle, args.device, args.threads), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
