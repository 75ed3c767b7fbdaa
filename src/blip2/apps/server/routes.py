"""The BLIP-2 API: caption, VQA and image-text matching on uploaded images (multipart/form-data).

    POST /v1/caption   image (file), prompt (optional)  -> {"caption": "..."}
    POST /v1/ask       image (file), question           -> {"question": "...", "answer": "..."}
    POST /v1/match     image (file), text (repeatable)  -> {"scores": [{"text", "itm", "itc"}, ...]}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from blip2.apps.pipeline import question_prompt
from blip2.apps.server.service import MAX_MATCH_TEXTS, MAX_TEXT_CHARS, ApiError, Service, read_text


def add_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/caption")
    async def caption(request: Request) -> dict[str, str]:
        deadline = service.deadline()
        form = await service.read_form(request, deadline)
        return {"caption": await service.generate(form, read_text(form, "prompt", required=False), deadline)}

    @app.post("/v1/ask")
    async def ask(request: Request) -> dict[str, str]:
        deadline = service.deadline()
        form = await service.read_form(request, deadline)
        question = read_text(form, "question", required=True)
        return {"question": question, "answer": await service.generate(form, question_prompt(question), deadline)}

    @app.post("/v1/match")
    async def match(request: Request) -> dict[str, Any]:
        deadline = service.deadline()
        form = await service.read_form(request, deadline)
        texts = form.getlist("text")
        if not texts:
            raise ApiError(400, "missing form field 'text' (repeat it for several texts)")
        if len(texts) > MAX_MATCH_TEXTS or not all(isinstance(t, str) and 0 < len(t) <= MAX_TEXT_CHARS for t in texts):
            raise ApiError(422, f"'text': 1 to {MAX_MATCH_TEXTS} non-empty texts of at most {MAX_TEXT_CHARS} characters")
        scores = await service.match(form, [str(t) for t in texts], deadline)
        return {"scores": [{"text": s.text, "itm": s.itm, "itc": s.itc} for s in scores]}
