"""The earlier endpoints' request style, for serve_load.py: JSON float lists in, a JSON mask out.

Like the AWS sample's ``predictor.predict(x.tolist())`` against a SageMaker endpoint: one request is
one forward pass (no batching across requests). No ``from __future__ import annotations`` here:
FastAPI reads the route's real ``Request`` annotation.

    python bench/json_endpoint.py --bundle DIR --port 8123 [--device cpu] [--threads 1]
"""

import argparse

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def build_app(bundle: str, device: str) -> FastAPI:
    from common import ROOT  # noqa: F401  (puts the repository root on sys.path)

    from core.bundle import load_bundle

    loaded = load_bundle(bundle, device)
    model, dev = loaded.model.eval(), torch.device(device)
    size = tuple(int(n) for n in loaded.config["image_size"])  # the network's input (an ensemble checks it)
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict:
        return {"status": "ok"}

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        payload = await request.json()
        x = torch.tensor(np.asarray(payload["inputs"], dtype=np.float32), device=dev)
        with torch.inference_mode():
            logits = model(torch.nn.functional.interpolate(x, size=size, mode="area"))
            logits = torch.nn.functional.interpolate(logits, size=x.shape[2:], mode="bilinear")
            mask = (logits.sigmoid() > 0.5)[:, 0].to(torch.uint8).cpu().numpy()
        return JSONResponse({"predictions": mask.tolist()})

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.bundle, args.device), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
